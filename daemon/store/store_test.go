package store

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

var testKey = bytes.Repeat([]byte{7}, KeySize)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keyward.db")
	s, err := Open(path, Options{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestRecords(t *testing.T) {
	s, path := open(t)
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("store file mode %04o, want 0600", fi.Mode().Perm())
	}
	if v, _ := s.SchemaVersion(); v != SchemaVersion {
		t.Fatalf("schema %d, want %d", v, SchemaVersion)
	}
	if _, err := s.Get(BucketKeys, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of nothing: %v", err)
	}
	for _, k := range []string{"b", "a", "ab", "c"} {
		if err := s.Update(BucketKeys, k, func(old []byte) ([]byte, error) {
			if old != nil {
				t.Fatalf("old record for a new key %q", k)
			}
			return []byte("v-" + k), nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	// fn's error writes nothing.
	boom := errors.New("boom")
	if err := s.Update(BucketKeys, "a", func(old []byte) ([]byte, error) { return []byte("changed"), boom }); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if v, _ := s.Get(BucketKeys, "a"); string(v) != "v-a" {
		t.Fatalf("a = %q after a failed update", v)
	}
	var seen []string
	s.ForEach(BucketKeys, "a", func(k string, v []byte) error { seen = append(seen, k+"="+string(v)); return nil })
	if strings.Join(seen, ",") != "a=v-a,ab=v-ab" {
		t.Fatalf("ForEach(a) = %v", seen)
	}
	for after, want := range map[string]string{"": "a,ab,b,c", "a": "ab,b,c", "aa": "ab,b,c", "ab": "b,c", "c": ""} {
		seen = nil
		s.ForEachAfter(BucketKeys, after, func(k string, _ []byte) error { seen = append(seen, k); return nil })
		if strings.Join(seen, ",") != want {
			t.Errorf("ForEachAfter(%q) = %v, want %s", after, seen, want)
		}
	}
	// UpdateEach: all of it or, if fn fails for one key, none of it.
	if err := s.UpdateEach(BucketKeys, []string{"a", "zz"}, func(k string, old []byte) ([]byte, error) {
		if k == "zz" {
			return nil, boom
		}
		return []byte("changed"), nil
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if v, _ := s.Get(BucketKeys, "a"); string(v) != "v-a" {
		t.Fatalf("a = %q after a failed UpdateEach", v)
	}
	if err := s.UpdateEach(BucketKeys, []string{"y", "z"}, func(k string, old []byte) ([]byte, error) { return []byte(k + string(old)), nil }); err != nil {
		t.Fatal(err)
	}
	if v, _ := s.Get(BucketKeys, "z"); string(v) != "z" {
		t.Fatalf("z = %q after UpdateEach", v)
	}
	s.UpdateEach(BucketKeys, []string{"y", "z"}, func(string, []byte) ([]byte, error) { return nil, nil })
	s.Update(BucketKeys, "ab", func([]byte) ([]byte, error) { return nil, nil })
	if _, err := s.Get(BucketKeys, "ab"); !errors.Is(err, ErrNotFound) {
		t.Fatal("a nil record did not delete")
	}
	if _, err := s.Get("nope", "a"); !errors.Is(err, ErrUnknownBucket) || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("unknown bucket: %v", err)
	}
	if _, err := s.Get(metaBucket, schemaKey); !errors.Is(err, ErrUnknownBucket) {
		t.Fatal("the meta bucket is reachable")
	}
	// Records survive a reopen.
	s.Close()
	s2, err := Open(path, Options{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if v, _ := s2.Get(BucketKeys, "c"); string(v) != "v-c" {
		t.Fatalf("after reopen c = %q", v)
	}
}

func TestSecondOpenRefused(t *testing.T) {
	_, path := open(t)
	start := time.Now()
	_, err := Open(path, Options{Key: testKey, LockTimeout: 100 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second Open: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("the second Open did not give up")
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	s, path := open(t)
	s.putSealed(t, metaBucket, schemaKey, []byte{0, 0, 0, 0, 0, 0, 0, 9})
	s.Close()
	if _, err := Open(path, Options{Key: testKey}); err == nil || !strings.Contains(err.Error(), "schema version 9, newer than this keywardd's "+strconv.Itoa(SchemaVersion)) {
		t.Fatalf("newer schema: %v", err)
	}
}

func TestDamagedFileRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pages []int // page numbers to overwrite
	}{
		{"meta pages", []int{0, 1}},
		{"data pages", []int{3, 4, 5, 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, path := open(t)
			for i := range 300 {
				s.Update(BucketKeys, fmt.Sprintf("key-%04d", i), func([]byte) ([]byte, error) { return make([]byte, 300), nil })
			}
			s.Close()
			b, _ := os.ReadFile(path)
			for _, p := range tc.pages {
				copy(b[p*4096+8:p*4096+64], strings.Repeat("\xa5", 56))
			}
			os.WriteFile(path, b, 0o600)
			s2, err := Open(path, Options{Key: testKey})
			if err == nil {
				s2.Close()
				t.Fatal("a damaged store opened")
			}
			if !strings.Contains(err.Error(), "restore it from a backup") {
				t.Fatalf("damaged store: %v", err)
			}
		})
	}
}

func TestMissingDataDir(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "nope", "keyward.db"), Options{Key: testKey})
	if err == nil || !strings.Contains(err.Error(), "data directory") {
		t.Fatalf("missing data directory: %v", err)
	}
}

// TestMigration: a schema-1 store (keys only) opens as the current schema
// with the buckets added since, its records intact.
func TestMigration(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyward.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		meta, _ := tx.CreateBucket([]byte(metaBucket))
		meta.Put([]byte(schemaKey), []byte{0, 0, 0, 0, 0, 0, 0, 1})
		keys, _ := tx.CreateBucket([]byte(BucketKeys))
		return keys.Put([]byte("kek"), []byte(`{"name":"kek"}`))
	})
	db.Close()
	s, err := Open(path, Options{Key: testKey, AllowUnsealed: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, _ := s.SchemaVersion(); v != SchemaVersion {
		t.Fatalf("schema %d after migration", v)
	}
	if rec, err := s.Get(BucketKeys, "kek"); err != nil || string(rec) != `{"name":"kek"}` {
		t.Fatalf("the schema-1 record: %q, %v", rec, err)
	}
	for _, b := range []string{BucketRevokedTokens, BucketAPIKeys, BucketAPIKeyMACs, BucketAPIKeyUsage, BucketAPIKeyHints, BucketCredentials} {
		if err := s.Update(b, "x", func([]byte) ([]byte, error) { return []byte{1}, nil }); err != nil {
			t.Fatalf("the new bucket %s: %v", b, err)
		}
	}
}

// TestMigrationLegacyAPIKeys: a schema-3 store with API keys is marked, so
// that keys issued before the hints still verify; one without is not.
func TestMigrationLegacyAPIKeys(t *testing.T) {
	for _, withKeys := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "keyward.db")
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error {
			meta, _ := tx.CreateBucket([]byte(metaBucket))
			meta.Put([]byte(schemaKey), []byte{0, 0, 0, 0, 0, 0, 0, 3})
			for _, b := range []string{BucketKeys, BucketRevokedTokens, BucketAPIKeys, BucketAPIKeyMACs, BucketAPIKeyUsage} {
				tx.CreateBucket([]byte(b))
			}
			if withKeys {
				tx.Bucket([]byte(BucketAPIKeys)).Put([]byte("ak_1"), []byte("{}"))
			}
			return nil
		})
		db.Close()
		s, err := Open(path, Options{Key: testKey, AllowUnsealed: true})
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Get(BucketAPIKeyHints, LegacyAPIKeys)
		if withKeys != (err == nil) {
			t.Errorf("with keys %v: legacy mark %v", withKeys, err)
		}
		s.Close()
	}
}

// putSealed writes a record as keywardd would, into any bucket (the meta
// bucket too), keeping the digest and the integrity record right.
func (s *Store) putSealed(t *testing.T, bucketName, key string, rec []byte) {
	t.Helper()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	d, writes := s.digest, s.writes.Load()+1
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketName))
		if v := b.Get([]byte(key)); v != nil {
			_, tag, err := s.seal.open([]byte(bucketName), []byte(key), v)
			if err != nil {
				return err
			}
			d.xor(s.seal.element(tag))
		}
		sealed, tag := s.seal.seal([]byte(bucketName), []byte(key), rec)
		d.xor(s.seal.element(tag))
		if err := b.Put([]byte(key), sealed); err != nil {
			return err
		}
		return tx.Bucket([]byte(metaBucket)).Put([]byte(integrityKey), s.seal.integrity(writes, &d))
	})
	if err != nil {
		t.Fatal(err)
	}
	s.digest = d
	s.writes.Store(writes)
}
