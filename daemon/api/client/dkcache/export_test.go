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
	if e := c.entries["s"+string(appendString(nil, keyName))+string(canonicalContext(encCtx))]; e != nil {
		return e.key
	}
	return nil
}
