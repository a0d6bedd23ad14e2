package anomaly

import "fmt"

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

// Commit writes n baselines in one commit, as a shard's flush does with n
// keys changed (a shard holds more than its share of maxKeys while its
// evictions fail).
func Commit(d *Detector, n int) error {
	snap := make(map[string]copied, n)
	for i := range n {
		snap[fmt.Sprintf("ak_%024x", i)] = copied{ver: 1, b: []byte(`{"since":"2026-03-02T00:00:00Z"}`)}
	}
	return d.commit(snap)
}
