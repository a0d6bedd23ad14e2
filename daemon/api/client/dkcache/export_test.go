package dkcache

// Hooks for the tests of package dkcache_test.

// SetWiped sets the hook that sees a key's memory right after it is
// cleared; nil removes it.
func SetWiped(f func(key []byte)) { wiped = f }

// SetBeforeUnmap sets the hook that sees the arena right before Close
// unmaps it; nil removes it.
func SetBeforeUnmap(f func(mem []byte)) { beforeUnmap = f }

// SealEntryKey is the memory of the cached Seal key of keyName and encCtx
// (a slice of the arena, not a copy), nil if there is none.
func (c *Cache) SealEntryKey(keyName string, encCtx map[string]string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[sealID(keyName, canonicalContext(encCtx))]; e != nil {
		return e.key
	}
	return nil
}

// SetWaiting sets the hook called when a caller starts waiting for
// another's call to keywardd; nil removes it.
func SetWaiting(f func()) { waiting = f }

// SetAEADMade sets the hook called each time an AES-GCM of a data key is
// built; nil removes it.
func SetAEADMade(f func()) { aeadMade = f }

// SealWaiters is how many callers wait for the call to keywardd under way
// for the Seal key of keyName and encCtx, and the bytes it is counted for
// (the fetcher's record and theirs); ok is false if there is no call.
func (c *Cache) SealWaiters(keyName string, encCtx map[string]string) (waiters int, bytes uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.inflight[sealID(keyName, canonicalContext(encCtx))]
	if f == nil {
		return 0, 0, false
	}
	return f.waiters, f.bytes, true
}
