// Package storetest is the conformance suite of store.Backend (Run), which
// every backend passes, and gives tests of the domain packages a store key:
// the store authenticates every record under a key keywardd derives from
// its HSM, which tests that do not start keywardd do not have.
package storetest

import (
	"bytes"
	"fmt"

	"github.com/keyward/keyward/daemon/store"
)

// Key is a fixed store key for tests; every reopen of a test's store must
// use it.
var Key = bytes.Repeat([]byte{0x6b}, store.KeySize)

// Options are store.Options with Key.
func Options() store.Options { return store.Options{Key: Key} }

// Strict is b refusing, with store.ErrTooLarge and nothing written, a
// transaction of more than store.MaxTxKeys keys: what a backend may do
// (etcd's does), and bbolt does not. Tests of callers whose transactions
// grow with the state run on it, so that one that forgot to split its
// writes fails here rather than on a fleet.
func Strict(b store.Backend) store.Backend { return strict{b} }

type strict struct{ store.Backend }

func tooLarge(keys []string) error {
	if len(keys) > store.MaxTxKeys {
		return fmt.Errorf("%w: %d keys in one transaction; the contract promises %d", store.ErrTooLarge, len(keys), store.MaxTxKeys)
	}
	return nil
}

func (s strict) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	if err := tooLarge(keys); err != nil {
		return err
	}
	return s.Backend.UpdateEach(bucket, keys, fn)
}

func (s strict) UpdateEachEmit(bucket string, keys []string, fn func(string, []byte) ([]byte, [][]byte, error)) error {
	if err := tooLarge(keys); err != nil {
		return err
	}
	return s.Backend.UpdateEachEmit(bucket, keys, fn)
}
