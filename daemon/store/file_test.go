package store

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestBboltFilesPass: every file bbolt writes passes checkFile, whatever
// was put, replaced and deleted (values small and large, keys short and
// long, buckets inline and not, nested ones), after every commit: the
// check is no stricter than bbolt, or keywardd would refuse a sound store.
func TestBboltFilesPass(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	names := [][]byte{[]byte("a"), []byte("keys"), []byte("usage"), []byte("z")}
	keys := map[string][][]byte{}
	randBytes := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte('a' + rng.IntN(26))
		}
		return b
	}
	for round := range 300 {
		err := db.Update(func(tx *bolt.Tx) error {
			for range 1 + rng.IntN(40) {
				name := names[rng.IntN(len(names))]
				b, err := tx.CreateBucketIfNotExists(name)
				if err != nil {
					return err
				}
				if rng.IntN(20) == 0 { // a nested bucket, often inline
					nb, err := b.CreateBucketIfNotExists([]byte("nested"))
					if err != nil {
						return err
					}
					if err := nb.Put(randBytes(1+rng.IntN(8)), randBytes(rng.IntN(50))); err != nil {
						return err
					}
					continue
				}
				have := keys[string(name)]
				switch op := rng.IntN(10); {
				case op < 3 && len(have) > 0: // delete a run of keys
					for range 1 + rng.IntN(30) {
						if len(have) == 0 {
							break
						}
						i := rng.IntN(len(have))
						if err := b.Delete(have[i]); err != nil {
							return err
						}
						have = append(have[:i], have[i+1:]...)
					}
				default:
					k := randBytes(1 + rng.IntN(40))
					size := rng.IntN(300)
					if rng.IntN(30) == 0 {
						size = 5000 + rng.IntN(10000) // an overflow page
					}
					if err := b.Put(k, randBytes(size)); err != nil {
						return err
					}
					have = append(have, k)
				}
				keys[string(name)] = have
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = checkFile(f, nil)
		f.Close()
		if err != nil {
			t.Fatalf("after commit %d checkFile refused a file bbolt wrote: %v", round, err)
		}
	}
	file, _ := os.ReadFile(path)
	kinds := map[uint16]int{}
	for p := 0; p+4096 <= len(file); p += 4096 {
		if le.Uint64(file[p:]) == uint64(p/4096) {
			kinds[le.Uint16(file[p+8:])]++
		}
	}
	if kinds[branchPage] == 0 || kinds[leafPage] < 10 {
		t.Fatalf("the file has too few branch and leaf pages to have tried anything: %v", kinds)
	}
}

// FuzzCheckFile: whatever the bytes, checkFile returns; and a file it
// passes is one bbolt opens, reads whole and writes to without crashing
// the process (a crash ends the fuzzer: that is the finding).
func FuzzCheckFile(f *testing.F) {
	dir := f.TempDir()
	seed := filepath.Join(dir, "seed.db")
	db, err := bolt.Open(seed, 0o600, nil)
	if err != nil {
		f.Fatal(err)
	}
	for i := range 3 {
		db.Update(func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucketIfNotExists([]byte("keys"))
			for j := range 40 {
				b.Put(fmt.Appendf(nil, "key-%02d-%02d", i, j), bytes.Repeat([]byte{byte(j)}, 90))
			}
			return nil
		})
	}
	db.Close()
	b, _ := os.ReadFile(seed)
	f.Add(b)
	f.Add(b[:8192])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		// A file of its own each time: bbolt keeps its lock if it panics
		// while opening (recovered below; keywardd then exits).
		path := filepath.Join(t.TempDir(), "fuzz.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		fh, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = checkFile(fh, nil)
		fh.Close()
		if err != nil || len(data) == 0 {
			return
		}
		guard(func() error {
			db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
			if err != nil {
				return err
			}
			defer db.Close()
			db.View(func(tx *bolt.Tx) error {
				return tx.ForEach(func(_ []byte, b *bolt.Bucket) error {
					return b.ForEach(func(_, _ []byte) error { return nil })
				})
			})
			return db.Update(func(tx *bolt.Tx) error {
				b, err := tx.CreateBucketIfNotExists([]byte("keys"))
				if err != nil {
					return err
				}
				return b.Put([]byte("key-00-05"), []byte("after"))
			})
		})
	})
}
