// Package storetest is the conformance suite of store.Backend (Run), which
// every backend passes, and gives tests of the domain packages a store key:
// the store authenticates every record under a key keywardd derives from
// its HSM, which tests that do not start keywardd do not have.
package storetest

import (
	"bytes"

	"github.com/keyward/keyward/daemon/store"
)

// Key is a fixed store key for tests; every reopen of a test's store must
// use it.
var Key = bytes.Repeat([]byte{0x6b}, store.KeySize)

// Options are store.Options with Key.
func Options() store.Options { return store.Options{Key: Key} }
