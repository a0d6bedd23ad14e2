package store

import (
	"bytes"
	"errors"
	"hash/fnv"
	"os"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// loopPage is a branch page whose only child is itself: bbolt follows it
// until its stack overflows, a fatal error no recover catches.
func loopPage(size int, id uint64) []byte {
	p := make([]byte, size)
	le.PutUint64(p, id)
	le.PutUint16(p[8:], branchPage)
	le.PutUint16(p[10:], 1)
	le.PutUint32(p[16:], 16) // the key, right after the one element
	le.PutUint32(p[20:], 4)
	le.PutUint64(p[24:], id)
	copy(p[32:], "meta")
	return p
}

// writeMeta writes a valid meta (magic, version, checksum: all bbolt
// checks) into page with the header id given.
func writeMeta(page []byte, headerID uint64, pageSize uint32, root, freelist, pgid, txid uint64) {
	le.PutUint64(page, headerID)
	le.PutUint16(page[8:], metaPage)
	m := page[pageHeaderSize:]
	le.PutUint32(m[0:], boltMagic)
	le.PutUint32(m[4:], boltVersion)
	le.PutUint32(m[8:], pageSize)
	le.PutUint64(m[16:], root)
	le.PutUint64(m[32:], freelist)
	le.PutUint64(m[40:], pgid)
	le.PutUint64(m[48:], txid)
	h := fnv.New64a()
	h.Write(m[:metaChecksumAt])
	le.PutUint64(m[metaChecksumAt:], h.Sum64())
}

// TestCraftedMetasRefused: files made so that bbolt would pick another
// meta page than a careless check does, and walk an unchecked tree that
// loops. Found by review: checkFile must pick the meta page, and the page
// size, exactly as bbolt does.
func TestCraftedMetasRefused(t *testing.T) {
	const ps = 4096
	for _, tc := range []struct {
		name  string
		craft func(file []byte) []byte
	}{
		{"a valid meta in a page whose header says another page", func(file []byte) []byte {
			m0, _ := parseMeta(file[0:])
			m1, _ := parseMeta(file[ps:])
			older, txid := 1, m0.txid
			if m1.txid > m0.txid {
				older, txid = 0, m1.txid
			}
			id := uint64(len(file) / ps)
			file = append(file, loopPage(ps, id)...)
			writeMeta(file[older*ps:older*ps+ps], 0xdead, ps, id, m0.freelist, id+1, txid+1)
			return file
		}},
		{"the first meta damaged, a valid one at a 1 KiB page size", func(file []byte) []byte {
			const small = 1024
			file[pageHeaderSize+metaChecksumAt] ^= 1
			id := uint64(len(file) / small)
			free := make([]byte, small)
			le.PutUint64(free, id+1)
			le.PutUint16(free[8:], freelistPage)
			file = append(append(file, loopPage(small, id)...), free...)
			for len(file)%ps != 0 {
				file = append(file, 0)
			}
			writeMeta(file[small:2*small], 1, small, id, id+1, id+2, 1<<40)
			return file
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			file, _ := os.ReadFile(f.path)
			os.WriteFile(f.path, tc.craft(file), 0o600)
			// A crash here would end the test's process.
			if _, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes}); !errors.Is(err, ErrDamaged) {
				t.Fatalf("a crafted file: %v", err)
			}
		})
	}
}

// TestDowngradeRefused: someone with the file but not the key cuts the
// seals off every record, removes the integrity record, says schema 6 and
// edits what they like (undoes a revocation, forgets a revoked token).
// Unless keywardd allows an unsealed store (its store key is new, or the
// operator says so with -accept-unsealed-store) it is refused, with or
// without an audit log to compare with, and -accept-store-rollback does
// not let it through.
func TestDowngradeRefused(t *testing.T) {
	f := newFixture(t)
	db, err := bolt.Open(f.path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		tx.Bucket([]byte(metaBucket)).Delete([]byte(integrityKey))
		tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			var ks, vs [][]byte
			b.ForEach(func(k, v []byte) error {
				ks, vs = append(ks, bytes.Clone(k)), append(vs, bytes.Clone(v[sealOverhead:]))
				return nil
			})
			for i := range ks {
				b.Put(ks[i], vs[i])
			}
			return nil
		})
		tx.Bucket([]byte(metaBucket)).Put([]byte(schemaKey), []byte{0, 0, 0, 0, 0, 0, 0, 6})
		tx.Bucket([]byte(BucketAPIKeys)).Put([]byte("ak_03"), []byte(`{"id":"ak_03","owner":"shop","state":"ACTIVE"}`))
		return tx.Bucket([]byte(BucketRevokedTokens)).Delete([]byte("jti-05"))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []Options{{Acknowledged: 0}, {Acknowledged: f.writes}, {Acknowledged: f.writes, AcceptRollback: true}} {
		o.Key = testKey
		if _, err := Open(f.path, o); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "not sealed") {
			t.Fatalf("a downgraded store, %+v: %v", o, err)
		}
	}
}

// TestNewerSchemaWithNewBucket: a store of a newer keywardd, whose schema
// adds a bucket, is "newer", not damaged.
func TestNewerSchemaWithNewBucket(t *testing.T) {
	s, path := open(t)
	s.Close()
	s, err := Open(path, Options{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	seal, d, w := s.seal, s.digest, s.Writes()+1
	s.Close()
	db, _ := bolt.Open(path, 0o600, nil)
	db.Update(func(tx *bolt.Tx) error {
		tx.CreateBucket([]byte("future_bucket"))
		d.xor(seal.sequence([]byte("future_bucket"), 0))
		meta := tx.Bucket([]byte(metaBucket))
		_, old, _ := seal.open([]byte(metaBucket), []byte(schemaKey), meta.Get([]byte(schemaKey)))
		d.xor(seal.element(old))
		v, tag := seal.seal([]byte(metaBucket), []byte(schemaKey), []byte{0, 0, 0, 0, 0, 0, 0, SchemaVersion + 1})
		d.xor(seal.element(tag))
		meta.Put([]byte(schemaKey), v)
		return meta.Put([]byte(integrityKey), seal.integrity(w, &d))
	})
	db.Close()
	if _, err := Open(path, Options{Key: testKey}); err == nil || !strings.Contains(err.Error(), "newer than this keywardd") {
		t.Fatalf("a newer store: %v", err)
	}
}

// TestCutWhileServing: the file cut short under a running keywardd (a
// backup copied over it): reads fail as damaged, and GetStatus's schema
// read too, rather than a SIGBUS ending the process.
func TestCutWhileServing(t *testing.T) {
	f := newFixture(t)
	s, err := Open(f.path, Options{Key: testKey, Acknowledged: f.writes})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	os.Truncate(f.path, 8192)
	if _, err := s.SchemaVersion(); err == nil {
		t.Fatal("the schema of a cut file read")
	}
	if _, err := s.Get(BucketKeys, "tenant-001"); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a record of a cut file: %v", err)
	}
}
