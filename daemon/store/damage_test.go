package store

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// fixture is a small store written the way keywardd writes one (records
// updated and deleted, events emitted, a record larger than a page), so
// that its file has every kind of page: meta, freelist, branch, leaf and
// overflow pages, and free pages left by old versions of records.
type fixture struct {
	path   string
	writes uint64            // the last acknowledged write
	state  map[string]string // bucket/key -> record, as acknowledged
	older  []byte            // the file as it was some writes before
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	s, path := open(t)
	put := func(b, k, v string) {
		t.Helper()
		if err := s.Update(b, k, func([]byte) ([]byte, error) { return []byte(v), nil }); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 60 {
		put(BucketKeys, fmt.Sprintf("tenant-%03d", i), fmt.Sprintf(`{"name":"tenant-%03d","versions":[1,2],"state":"ENABLED","pad":%q}`, i, strings.Repeat("k", 60)))
	}
	for i := range 10 {
		put(BucketAPIKeys, fmt.Sprintf("ak_%02d", i), fmt.Sprintf(`{"id":"ak_%02d","owner":"shop","state":"ACTIVE"}`, i))
		put(BucketRevokedTokens, fmt.Sprintf("jti-%02d", i), "1767225600")
	}
	older, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	put(BucketBaselines, "ak_00", strings.Repeat("b", 6000)) // an overflow page
	for i := range 3 {
		put(BucketRevokedTokens, fmt.Sprintf("jti-%02d", i), "") // emptied, then deleted below
		s.Update(BucketRevokedTokens, fmt.Sprintf("jti-%02d", i), func([]byte) ([]byte, error) { return nil, nil })
	}
	// The revocation the issue saw come back: acknowledged, then lost.
	err = s.UpdateEachEmit(BucketAPIKeys, []string{"ak_03"}, func(string, []byte) ([]byte, [][]byte, error) {
		return []byte(`{"id":"ak_03","owner":"shop","state":"REVOKED"}`), [][]byte{[]byte("revoked ak_03")}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	f := fixture{path: path, writes: s.Writes(), older: older}
	f.state = dump(t, s)
	s.Close()
	return f
}

// dump reads every record of every bucket.
func dump(t *testing.T, s *Store) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, b := range buckets {
		if err := s.ForEach(b, "", func(k string, v []byte) error { out[b+"/"+k] = string(v); return nil }); err != nil {
			t.Fatalf("reading %s: %v", b, err)
		}
	}
	return out
}

// served opens the file at path as keywardd would after acknowledging
// f.writes, and checks that it either serves exactly f.state or is refused
// with ErrDamaged or ErrRolledBack and the runbook. It returns which.
func (f fixture) served(t *testing.T, path string, what string) string {
	t.Helper()
	s, err := Open(path, Options{Key: testKey, Acknowledged: f.writes})
	if err != nil {
		switch {
		case !strings.Contains(err.Error(), Runbook):
			t.Errorf("%s: refused without the runbook: %v", what, err)
		case errors.Is(err, ErrDamaged):
			return "damaged"
		case errors.Is(err, ErrRolledBack):
			return "rolled back"
		default:
			t.Errorf("%s: refused with neither ErrDamaged nor ErrRolledBack: %v", what, err)
		}
		return "error"
	}
	defer s.Close()
	got := dump(t, s)
	if !maps.Equal(got, f.state) || s.Writes() != f.writes {
		var diff []string
		for k, v := range got {
			if f.state[k] != v {
				diff = append(diff, fmt.Sprintf("%s=%.40q (want %.40q)", k, v, f.state[k]))
			}
		}
		for k := range f.state {
			if _, ok := got[k]; !ok {
				diff = append(diff, k+" missing")
			}
		}
		t.Errorf("%s: served another state than the last acknowledged one (writes %d, want %d): %v", what, s.Writes(), f.writes, diff)
		return "other state"
	}
	return "served"
}

// positions picks the bytes to flip: every byte of both meta pages' headers
// and metas, every page header, every element of every branch, leaf and
// freelist page, and a sample of each page's data.
func positions(t *testing.T, file []byte) []int {
	t.Helper()
	const ps = 4096
	rng := rand.New(rand.NewPCG(12, 34))
	var out []int
	kinds := map[uint16]int{}
	for p := 0; p+ps <= len(file); p += ps {
		page := file[p : p+ps]
		flags, count := le.Uint16(page[8:]), int(le.Uint16(page[10:]))
		if le.Uint64(page) != uint64(p/ps) {
			continue // an overflow page's continuation or an unused one: sampled below
		}
		kinds[flags]++
		n := pageHeaderSize
		switch flags {
		case metaPage:
			n += metaChecksumAt + 8
		case branchPage, leafPage:
			n += min(count*elemSize, 512)
		case freelistPage:
			n += min(count*8, 512)
		}
		for i := range n {
			out = append(out, p+i)
		}
		for range 24 {
			out = append(out, p+n+rng.IntN(ps-n))
		}
	}
	for _, k := range []uint16{metaPage, freelistPage, branchPage, leafPage} {
		if kinds[k] == 0 {
			t.Fatalf("the fixture has no page of kind %#x: %v", k, kinds)
		}
	}
	return out
}

// TestEveryFlip flips bytes all over a small store, each alone, with three
// masks (KEYWARD_FLIP_ALL=1: every byte of the file), and opens each copy: every start serves the last acknowledged
// state or refuses with the runbook; none crashes (a SIGBUS, a SIGSEGV or
// a stack overflow would end this test's process).
func TestEveryFlip(t *testing.T) {
	f := newFixture(t)
	file, err := os.ReadFile(f.path)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "flipped.db")
	outcomes := map[string]int{}
	pos := positions(t, file)
	if os.Getenv("KEYWARD_FLIP_ALL") != "" { // every byte: about a minute
		pos = make([]int, len(file))
		for i := range pos {
			pos[i] = i
		}
	}
	for _, at := range pos {
		for _, mask := range []byte{0x01, 0x80, 0xff} {
			b := bytes.Clone(file)
			b[at] ^= mask
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			outcomes[f.served(t, path, fmt.Sprintf("byte %d (page %d) ^ %#02x", at, at/4096, mask))]++
			if t.Failed() {
				t.FailNow()
			}
		}
	}
	t.Logf("%d flips of a %d-byte store: %v", 3*len(pos), len(file), outcomes)
	if outcomes["damaged"] == 0 || outcomes["rolled back"] == 0 || outcomes["served"] == 0 {
		t.Fatalf("expected flips that are refused as damaged, as rolled back (a newest meta page) and that change nothing served: %v", outcomes)
	}
}

// TestTruncated: a store cut at any length is refused; cut to nothing it is
// a new, empty store, which is behind the audit log.
func TestTruncated(t *testing.T) {
	f := newFixture(t)
	file, _ := os.ReadFile(f.path)
	path := filepath.Join(t.TempDir(), "cut.db")
	inUse := 0 // bytes of the pages in use; bbolt grows the file beyond them
	for _, m := range []int{0, 4096} {
		if meta, err := parseMeta(file[m:]); err == nil {
			inUse = max(inUse, int(meta.pgid)*4096)
		}
	}
	for _, n := range []int{0, 1, 100, 4095, 4096, 8192, 8193, 12288, 16384, len(file) / 2, inUse - 4096, inUse - 1, inUse, len(file) - 1} {
		if err := os.WriteFile(path, file[:n], 0o600); err != nil {
			t.Fatal(err)
		}
		got := f.served(t, path, fmt.Sprintf("cut to %d bytes", n))
		want := "damaged"
		switch {
		case n == 0:
			want = "rolled back"
		case n >= inUse:
			want = "served" // only unused space was cut
		}
		if got != want {
			t.Errorf("cut to %d bytes: %s, want %s", n, got, want)
		}
	}
}

// TestOlderCopyRefused: an older copy of the store put in its place is
// refused as rolled back, and opens once an operator accepts the rollback.
func TestOlderCopyRefused(t *testing.T) {
	f := newFixture(t)
	abandoned, _ := os.ReadFile(f.path)
	if err := os.WriteFile(f.path, f.older, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes})
	if !errors.Is(err, ErrRolledBack) || !strings.Contains(err.Error(), "-accept-store-rollback") {
		t.Fatalf("an older copy: %v", err)
	}
	s, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes, AcceptRollback: true})
	if err != nil {
		t.Fatalf("an accepted rollback: %v", err)
	}
	// Accepted, the store's count moves past the acknowledged one: the
	// store it replaced, were it put back, is behind.
	if s.Writes() != f.writes+1 {
		t.Fatalf("after an accepted rollback the count is %d, want %d", s.Writes(), f.writes+1)
	}
	if err := s.Update(BucketKeys, "after", func([]byte) ([]byte, error) { return []byte("x"), nil }); err != nil {
		t.Fatal(err)
	}
	acked := s.Writes()
	s.Close()
	os.WriteFile(f.path, abandoned, 0o600)
	if _, err := Open(f.path, Options{Key: testKey, Acknowledged: acked}); !errors.Is(err, ErrRolledBack) {
		t.Fatalf("the store an accepted rollback replaced, put back: %v", err)
	}
}

// TestNewestMetaDamaged is the first finding: a flipped bit in the
// newest meta page's transaction ID made bbolt open the transaction before,
// and an acknowledged revocation was undone. It is refused, and says why.
func TestNewestMetaDamaged(t *testing.T) {
	f := newFixture(t)
	file, _ := os.ReadFile(f.path)
	newest := 0
	if le.Uint64(file[4096+pageHeaderSize+48:]) > le.Uint64(file[pageHeaderSize+48:]) {
		newest = 4096
	}
	file[newest+pageHeaderSize+48] ^= 0x04 // a bit of the txid
	os.WriteFile(f.path, file, 0o600)
	_, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes})
	if !errors.Is(err, ErrRolledBack) || !strings.Contains(err.Error(), "newest meta page is damaged") {
		t.Fatalf("newest meta page damaged: %v", err)
	}
}

// TestEditedRecordsRefused: records changed by someone with the file but
// not the key: swapped, moved to another bucket, removed, put back as they
// were, their integrity record removed.
func TestEditedRecordsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(tx *bolt.Tx, older *bolt.Tx) error
	}{
		{"two records swapped", func(tx, _ *bolt.Tx) error {
			b := tx.Bucket([]byte(BucketAPIKeys))
			a, c := bytes.Clone(b.Get([]byte("ak_01"))), bytes.Clone(b.Get([]byte("ak_02")))
			b.Put([]byte("ak_01"), c)
			return b.Put([]byte("ak_02"), a)
		}},
		{"a record moved to another bucket", func(tx, _ *bolt.Tx) error {
			v := bytes.Clone(tx.Bucket([]byte(BucketAPIKeys)).Get([]byte("ak_01")))
			return tx.Bucket([]byte(BucketCredentials)).Put([]byte("ak_01"), v)
		}},
		{"a record removed", func(tx, _ *bolt.Tx) error {
			return tx.Bucket([]byte(BucketRevokedTokens)).Delete([]byte("jti-05"))
		}},
		{"a revocation undone with the record as it was", func(tx, older *bolt.Tx) error {
			was := bytes.Clone(older.Bucket([]byte(BucketAPIKeys)).Get([]byte("ak_03")))
			return tx.Bucket([]byte(BucketAPIKeys)).Put([]byte("ak_03"), was)
		}},
		{"an unknown bucket", func(tx, _ *bolt.Tx) error {
			_, err := tx.CreateBucket([]byte("kEyward-apikeys"))
			return err
		}},
		{"the outbox's sequence moved back", func(tx, _ *bolt.Tx) error {
			return tx.Bucket([]byte(BucketOutbox)).SetSequence(0)
		}},
		{"the integrity record removed", func(tx, _ *bolt.Tx) error {
			return tx.Bucket([]byte(metaBucket)).Delete([]byte(integrityKey))
		}},
		{"a key's record changed (a bucket of branch pages)", func(tx, older *bolt.Tx) error {
			b := tx.Bucket([]byte(BucketKeys))
			if b.Stats().BranchPageN == 0 {
				return errors.New("the fixture's keys bucket has no branch page")
			}
			v := bytes.Clone(b.Get([]byte("tenant-031")))
			v[len(v)-2] ^= 1
			return b.Put([]byte("tenant-031"), v)
		}},
		{"an empty bucket inside a bucket (inline)", func(tx, _ *bolt.Tx) error {
			_, err := tx.Bucket([]byte(BucketAPIKeys)).CreateBucket([]byte("ak_99"))
			return err
		}},
		{"a bucket of pages inside a bucket", func(tx, _ *bolt.Tx) error {
			n, err := tx.Bucket([]byte(BucketKeys)).CreateBucket([]byte("tenant-999"))
			if err != nil {
				return err
			}
			for i := range 100 {
				if err := n.Put([]byte(fmt.Sprintf("k%03d", i)), bytes.Repeat([]byte("v"), 100)); err != nil {
					return err
				}
			}
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			olderPath := filepath.Join(t.TempDir(), "older.db")
			os.WriteFile(olderPath, f.older, 0o600)
			odb, err := bolt.Open(olderPath, 0o600, &bolt.Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			otx, _ := odb.Begin(false)
			db, err := bolt.Open(f.path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(func(tx *bolt.Tx) error { return tc.edit(tx, otx) }); err != nil {
				t.Fatal(err)
			}
			otx.Rollback()
			odb.Close()
			db.Close()
			through := boltVerified.Load()
			for _, ack := range []uint64{f.writes, 0} {
				_, err := Open(f.path, Options{Key: testKey, Acknowledged: ack})
				if !errors.Is(err, ErrDamaged) && !(ack > 0 && errors.Is(err, ErrRolledBack)) {
					t.Fatalf("acknowledged %d: %v", ack, err)
				}
			}
			// Found by the walk of the file with plain reads, not through
			// bbolt's map.
			if boltVerified.Load() != through {
				t.Fatal("Open verified the records through bbolt, not in checkFile's walk")
			}
		})
	}
}

// TestOtherKeyRefused: a store opened with another key (another HSM
// token's) is refused and says so.
func TestOtherKeyRefused(t *testing.T) {
	f := newFixture(t)
	_, err := Open(f.path, Options{Key: bytes.Repeat([]byte{9}, KeySize), Acknowledged: f.writes})
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "another HSM token") {
		t.Fatalf("another key: %v", err)
	}
}

// TestDamagedWhileServing: a record damaged under a running keywardd is
// refused when read, and from then on the store refuses everything.
func TestDamagedWhileServing(t *testing.T) {
	f := newFixture(t)
	s, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	file, _ := os.ReadFile(f.path)
	at := bytes.Index(file, []byte(`"name":"tenant-007"`))
	if at < 0 {
		t.Fatal("the record is not in the file")
	}
	w, err := os.OpenFile(f.path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteAt([]byte("X"), int64(at+2))
	w.Close()
	_, err = s.Get(BucketKeys, "tenant-007")
	if !errors.Is(err, ErrDamaged) || strings.Contains(err.Error(), f.path) {
		t.Fatalf("a damaged record: %v (the answer must not hold the file's path)", err)
	}
	if err := s.Update(BucketKeys, "tenant-001", func(old []byte) ([]byte, error) { return old, nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a write after damage was found: %v", err)
	}
	if _, err := s.Get(BucketAPIKeys, "ak_01"); !errors.Is(err, ErrDamaged) || s.Err() == nil {
		t.Fatalf("a sound record after damage was found: %v", err)
	}
}

// TestLegacyStoreSealed: a store of schema 6 (records unsealed) is sealed
// on its first open, its records intact, and from then on verified.
func TestLegacyStoreSealed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyward.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		for v := range 6 {
			legacyMigrations[v](tx)
		}
		meta, _ := tx.CreateBucket([]byte(metaBucket))
		meta.Put([]byte(schemaKey), []byte{0, 0, 0, 0, 0, 0, 0, 6})
		ob := tx.Bucket([]byte(BucketOutbox))
		seq, _ := ob.NextSequence()
		ob.Put([]byte(OutboxKey(seq)), []byte("event"))
		return tx.Bucket([]byte(BucketKeys)).Put([]byte("kek"), []byte(`{"name":"kek"}`))
	})
	db.Close()
	if _, err := Open(path, Options{Key: testKey}); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "-accept-unsealed-store") {
		t.Fatalf("an unsealed store, not allowed: %v", err)
	}
	s, err := Open(path, Options{Key: testKey, AllowUnsealed: true})
	if err != nil {
		t.Fatal(err)
	}
	if rec, err := s.Get(BucketKeys, "kek"); err != nil || string(rec) != `{"name":"kek"}` {
		t.Fatalf("the legacy record: %q, %v", rec, err)
	}
	if err := s.UpdateEachEmit(BucketKeys, []string{"kek2"}, func(string, []byte) ([]byte, [][]byte, error) {
		return []byte("{}"), [][]byte{[]byte("second")}, nil
	}); err != nil {
		t.Fatal(err)
	}
	var events []string
	s.ForEach(BucketOutbox, "", func(k string, v []byte) error { events = append(events, k+"="+string(v)); return nil })
	if want := []string{OutboxKey(1) + "=event", OutboxKey(2) + "=second"}; !slices.Equal(events, want) {
		t.Fatalf("outbox %v, want %v", events, want)
	}
	writes := s.Writes()
	s.Close()
	s, err = Open(path, Options{Key: testKey, Acknowledged: writes})
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := s.SchemaVersion(); v != SchemaVersion {
		t.Fatalf("schema %d", v)
	}
	s.Close()
	// Sealed records in a store without its integrity record are not
	// sealed a second time: that is a damaged store.
	db, _ = bolt.Open(path, 0o600, nil)
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte(metaBucket)).Delete([]byte(integrityKey)) })
	db.Close()
	if _, err := Open(path, Options{Key: testKey, AllowUnsealed: true}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a sealed store without its integrity record: %v", err)
	}
}

// TestChangedAfterWalk: a store file written between checkFile's walk and
// bbolt's open, by a writer that does not take the lock, is not the file
// that was walked: Open checks what bbolt opened again, through bbolt, and
// refuses it. A revocation put back in place with the older sealed record
// (same length, so nothing but the bytes moves) during the walk, and one
// undone through bbolt after it, are both refused.
func TestChangedAfterWalk(t *testing.T) {
	// A record whose older sealed form has the same length as its newer.
	mk := func(t *testing.T) (path string, writes uint64, older, newer []byte) {
		s, path := open(t)
		for i := range 40 {
			s.Update(BucketAPIKeys, fmt.Sprintf("ak_%02d", i), func([]byte) ([]byte, error) {
				return []byte(fmt.Sprintf(`{"id":"ak_%02d","state":"ACTIVE!"}`, i)), nil
			})
		}
		raw := func() []byte {
			var v []byte
			s.db.View(func(tx *bolt.Tx) error {
				v = bytes.Clone(tx.Bucket([]byte(BucketAPIKeys)).Get([]byte("ak_07")))
				return nil
			})
			return v
		}
		older = raw()
		s.Update(BucketAPIKeys, "ak_07", func([]byte) ([]byte, error) { return []byte(`{"id":"ak_07","state":"REVOKED"}`), nil })
		newer = raw()
		writes = s.Writes()
		s.Close()
		return path, writes, older, newer
	}
	for _, tc := range []struct {
		name  string
		hook  *func(string)
		write func(t *testing.T, path string, older, newer []byte)
	}{
		{"in place, without the lock, during the walk", &duringWalk, func(t *testing.T, path string, older, newer []byte) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			at := bytes.Index(b, newer)
			if at < 0 || len(older) != len(newer) {
				t.Fatal("the fixture's sealed record is not in the file, or its older form differs in length")
			}
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(older, int64(at)); err != nil {
				t.Fatal(err)
			}
		}},
		{"through bbolt, after the walk", &beforeOpen, func(t *testing.T, path string, older, _ []byte) {
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte(BucketAPIKeys)).Put([]byte("ak_07"), older) }); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, writes, older, newer := mk(t)
			*tc.hook = func(p string) { *tc.hook = nil; tc.write(t, p, older, newer) }
			defer func() { *tc.hook = nil }()
			through := boltVerified.Load()
			_, err := Open(path, Options{Key: testKey, Acknowledged: writes})
			if !errors.Is(err, ErrDamaged) {
				t.Fatalf("a store written after its walk opened: %v", err)
			}
			if boltVerified.Load() != through+1 {
				t.Fatal("the store written after its walk was not checked again through bbolt")
			}
		})
	}
	// And the sound path: an unchanged store opens without bbolt's walk.
	path, writes, _, _ := mk(t)
	through := boltVerified.Load()
	s, err := Open(path, Options{Key: testKey, Acknowledged: writes})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if boltVerified.Load() != through {
		t.Fatal("an unchanged store was verified through bbolt")
	}
}

// TestWalkedAnotherTransaction: a walk that followed another transaction
// than the one bbolt serves is not used: the records are checked through
// bbolt.
func TestWalkedAnotherTransaction(t *testing.T) {
	f := newFixture(t)
	seal, err := newSealer(testKey)
	if err != nil {
		t.Fatal(err)
	}
	walked := newDigester(seal).parallel(2)
	rep, err := checkPath(f.path, time.Second, walked)
	walked.finish()
	if err != nil {
		t.Fatal(err)
	}
	s := &Store{path: f.path, seal: seal}
	if s.db, err = bolt.Open(f.path, 0o600, nil); err != nil {
		t.Fatal(err)
	}
	defer s.db.Close()
	through := boltVerified.Load()
	rep.txid++
	if err := s.load(rep, Options{Key: testKey, Acknowledged: f.writes}, walked); err != nil {
		t.Fatal(err)
	}
	if boltVerified.Load() != through+1 {
		t.Fatal("a walk of another transaction was used")
	}
}
