package store_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

// TestConformance runs the contract's suite on a bbolt file.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) func() store.Backend {
		path := filepath.Join(t.TempDir(), "keyward.db")
		return func() store.Backend {
			t.Helper()
			s, err := store.Open(path, storetest.Options())
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	})
}

// TestLimitsCoverCallers: the largest transaction a request makes fits in
// what every backend takes.
func TestLimitsCoverCallers(t *testing.T) {
	if apikeys.MaxCreateBatch > store.MaxTxKeys {
		t.Errorf("apikeys.MaxCreateBatch %d > store.MaxTxKeys %d: CreateMany writes more than every backend takes", apikeys.MaxCreateBatch, store.MaxTxKeys)
	}
}

// A mutant is a bbolt store with one promise of the contract broken: the
// suite must fail on each (TestSuiteBites).
type mutant struct {
	*store.Store
	name string
}

var mutants = map[string]string{
	// name: the subtest that must fail
	"lost-update": "ConcurrentWriters",
	"not-atomic":  "AtomicUpdateEach",
	"unordered":   "Order",
	"nil-kept":    "Delete",
	"closed-raw":  "Close",
	"no-writes":   "Writes",
	"no-events":   "Events",
}

func (m mutant) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	switch m.name {
	case "lost-update": // read, then write in another transaction
		for _, k := range keys {
			old, err := m.Store.Get(bucket, k)
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			rec, err := fn(k, old)
			if err != nil {
				return err
			}
			if err := m.Store.Update(bucket, k, func([]byte) ([]byte, error) { return rec, nil }); err != nil {
				return err
			}
		}
		return nil
	case "not-atomic": // a transaction per key
		for _, k := range keys {
			if err := m.Store.UpdateEach(bucket, []string{k}, fn); err != nil {
				return err
			}
		}
		return nil
	case "nil-kept":
		return m.Store.UpdateEach(bucket, keys, func(k string, old []byte) ([]byte, error) {
			rec, err := fn(k, old)
			if rec == nil {
				rec = []byte{}
			}
			return rec, err
		})
	}
	return m.Store.UpdateEach(bucket, keys, fn)
}

func (m mutant) Update(bucket, key string, fn func([]byte) ([]byte, error)) error {
	return m.UpdateEach(bucket, []string{key}, func(_ string, old []byte) ([]byte, error) { return fn(old) })
}

func (m mutant) UpdateEachEmit(bucket string, keys []string, fn func(string, []byte) ([]byte, [][]byte, error)) error {
	if m.name == "no-events" {
		return m.UpdateEach(bucket, keys, func(k string, old []byte) ([]byte, error) {
			rec, _, err := fn(k, old)
			return rec, err
		})
	}
	return m.Store.UpdateEachEmit(bucket, keys, fn)
}

func (m mutant) ForEach(bucket, prefix string, fn func(string, []byte) error) error {
	if m.name != "unordered" {
		return m.Store.ForEach(bucket, prefix, fn)
	}
	var ks []string
	var rs [][]byte
	if err := m.Store.ForEach(bucket, prefix, func(k string, r []byte) error { ks, rs = append(ks, k), append(rs, r); return nil }); err != nil {
		return err
	}
	for i := len(ks) - 1; i >= 0; i-- {
		if err := fn(ks[i], rs[i]); err != nil {
			return err
		}
	}
	return nil
}

func (m mutant) Get(bucket, key string) ([]byte, error) {
	rec, err := m.Store.Get(bucket, key)
	if m.name == "closed-raw" && errors.Is(err, store.ErrClosed) {
		return nil, errors.New("closed")
	}
	return rec, err
}

func (m mutant) Writes() uint64 {
	if m.name == "no-writes" {
		return 1
	}
	return m.Store.Writes()
}

// TestMutant runs the suite on the mutant STORETEST_MUTANT names (run by
// TestSuiteBites, in a process of its own).
func TestMutant(t *testing.T) {
	name := os.Getenv("STORETEST_MUTANT")
	if name == "" {
		t.Skip("run by TestSuiteBites")
	}
	storetest.Run(t, func(t *testing.T) func() store.Backend {
		path := filepath.Join(t.TempDir(), "keyward.db")
		return func() store.Backend {
			s, err := store.Open(path, storetest.Options())
			if err != nil {
				t.Fatal(err)
			}
			return mutant{s, name}
		}
	})
}

// TestSuiteBites runs the suite on each mutant: the subtest of the promise
// it breaks must fail.
func TestSuiteBites(t *testing.T) {
	for name, sub := range mutants {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestMutant$/^"+sub+"$", "-test.count=1", "-test.v")
			cmd.Env = append(os.Environ(), "STORETEST_MUTANT="+name)
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), "--- FAIL: TestMutant/"+sub) {
				t.Errorf("the suite's %s passed a backend that breaks its promise (%v):\n%s", sub, err, out)
			}
		})
	}
}
