package anomaly

// SetMaxKeys sets how many keys a detector holds in memory, for a test;
// the returned func puts it back.
func SetMaxKeys(n int) func() {
	old := maxKeys
	maxKeys = n
	return func() { maxKeys = old }
}

// Held is how many keys the detector holds in memory.
func (d *Detector) Held() int {
	n := 0
	for i := range d.shards {
		d.shards[i].mu.Lock()
		n += len(d.shards[i].keys)
		d.shards[i].mu.Unlock()
	}
	return n
}
