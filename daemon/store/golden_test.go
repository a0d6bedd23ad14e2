package store

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// goldenKey is the store key of the golden store. keywardd derives its own
// from the HSM and never stores it; any 32 bytes do for the format.
var goldenKey = func() []byte {
	k := make([]byte, KeySize)
	for i := range k {
		k[i] = byte(i)
	}
	return k
}()

// goldenStore is testdata/golden.json: everything in testdata/golden.db
// as keyward reads it, with what each value contributes to the digest.
type goldenStore struct {
	StoreKey  string            `json:"store_key_hex"`
	RecordKey string            `json:"record_key_hex"`
	SetKey    string            `json:"set_key_hex"`
	Buckets   []goldenBucket    `json:"buckets"`
	Values    []goldenValue     `json:"values"`
	Writes    uint64            `json:"writes"`
	Digest    string            `json:"digest_hex"`
	Integrity string            `json:"integrity_hex"`
	Schema    uint64            `json:"schema_version"`
	Records   map[string]string `json:"-"`
}

// goldenBucket is a bucket's sequence number and its share of the digest.
type goldenBucket struct {
	Name     string `json:"name"`
	Sequence uint64 `json:"sequence"`
	Element  string `json:"element_hex"`
}

// goldenValue is a sealed value: 01 || tag || record, and its element.
type goldenValue struct {
	Bucket  string `json:"bucket"`
	Key     string `json:"key"`
	Record  string `json:"record_hex"`
	Sealed  string `json:"sealed_hex"`
	Element string `json:"element_hex"`
}

// goldenWrites writes the golden store's content through the Store as
// keywardd's packages write theirs: a root key, revoked tokens, an API
// key's three writes, a credential with two outbox events in the same
// transaction, a plugin's cursor, and a revoked token dropped. The records
// are samples of their packages' formats (which those packages' golden
// vectors pin); what is pinned here is how the store seals and counts them.
func goldenWrites(t *testing.T, s *Store) {
	t.Helper()
	put := func(bucket string, recs map[string][]byte) {
		t.Helper()
		if err := s.UpdateEach(bucket, slices.Sorted(maps.Keys(recs)), func(k string, _ []byte) ([]byte, error) { return recs[k], nil }); err != nil {
			t.Fatal(err)
		}
	}
	put(BucketKeys, map[string][]byte{"payments": []byte(`{"name":"payments","purpose":"encrypt","algorithm":"aes256-gcm","state":"enabled","versions":[{"number":1,"created":"2026-11-29T12:00:00Z","reserved":4096}],"min_decryption_version":1,"created":"2026-11-29T12:00:00Z"}`)})
	put(BucketRevokedTokens, map[string][]byte{"AAECAwQFBgcICQoLDA0ODw": binary.BigEndian.AppendUint64(nil, 1795953900), "_-_-_-_-_-_-_-_-_-_-_w": binary.BigEndian.AppendUint64(nil, 1795957200)})
	put(BucketAPIKeyHints, map[string][]byte{"b6f9ee30ae17b518": {1}})
	put(BucketAPIKeyMACs, map[string][]byte{"6ba4e4f85734046e937f462704a2d960b11b1cbe453f19c215fdfc17e2ad9167": []byte(`{"id":"ak_000102030405060708090a0b","secret":0}`)})
	put(BucketAPIKeys, map[string][]byte{"ak_000102030405060708090a0b": []byte(`{"id":"ak_000102030405060708090a0b","owner":"team-a","name":"billing","environment":"prod","permissions":["read-only"],"state":"active","created":"2026-11-29T12:00:00Z","secrets":[{"mac":"a6Tk+Fc0BG6Tf0YnBKLZYLEbHL5FPxnCFf38F+KtkWc=","created":"2026-11-29T12:00:00Z"}]}`)})
	err := s.UpdateEachEmit(BucketCredentials, []string{"db-main"}, func(string, []byte) ([]byte, [][]byte, error) {
		return []byte(`{"plugin":"postgres","config":{"role":"app"},"state":"revoked","created":"2026-11-29T12:00:00Z"}`), [][]byte{
			[]byte(`{"kind":"credential","id":"db-main","subject":"db-main","time":"2026-11-29T12:00:01Z","nonce":"0001020304050607"}`),
			[]byte(`{"kind":"api_key","id":"ak_000102030405060708090a0b","subject":"team-a","time":"2026-11-29T12:00:01Z","nonce":"08090a0b0c0d0e0f"}`),
		}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	put(BucketOutboxCursors, map[string][]byte{"webhook": []byte("1")})
	put(BucketRevokedTokens, map[string][]byte{"AAECAwQFBgcICQoLDA0ODw": nil})
}

// docMAC is HMAC-SHA256 under key of the parts, lengths written where
// docs/formats.md writes them: apart from the sealer, to hold the two to
// each other.
func docMAC(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

func docLen(b string) []byte { return binary.BigEndian.AppendUint32(nil, uint32(len(b))) }

// readGolden reads a store file as docs/formats.md describes it, with plain
// bbolt and without the Store: every bucket's sequence, every value split
// into its version, tag and record, each tag and element checked against
// the documented MACs, and the integrity record against the documented
// digest.
func readGolden(t *testing.T, path string, key []byte) goldenStore {
	t.Helper()
	recKey := docMAC(key, []byte("keyward store v1 record key"))
	setKey := docMAC(key, []byte("keyward store v1 set key"))
	g := goldenStore{StoreKey: hex.EncodeToString(key), RecordKey: hex.EncodeToString(recKey), SetKey: hex.EncodeToString(setKey), Records: map[string]string{}}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var d [32]byte
	xor := func(e []byte) {
		for i := range d {
			d[i] ^= e[i]
		}
	}
	var integrity []byte
	err = db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			e := docMAC(setKey, []byte("keyward store sequence v1\x00"), docLen(string(name)), name, binary.BigEndian.AppendUint64(nil, b.Sequence()))
			xor(e)
			g.Buckets = append(g.Buckets, goldenBucket{Name: string(name), Sequence: b.Sequence(), Element: hex.EncodeToString(e)})
			return b.ForEach(func(k, v []byte) error {
				if string(name) == metaBucket && string(k) == integrityKey {
					integrity = bytes.Clone(v)
					return nil
				}
				if len(v) < 33 || v[0] != 1 {
					return fmt.Errorf("%s/%s: not 01 || tag || record", name, k)
				}
				tag, rec := v[1:33], v[33:]
				if !hmac.Equal(tag, docMAC(recKey, []byte("keyward store record v1\x00"), docLen(string(name)), name, docLen(string(k)), k, rec)) {
					return fmt.Errorf("%s/%s: the tag is not the documented HMAC", name, k)
				}
				e := docMAC(setKey, []byte("keyward store element v1\x00"), tag)
				xor(e)
				g.Values = append(g.Values, goldenValue{Bucket: string(name), Key: string(k), Record: hex.EncodeToString(rec), Sealed: hex.EncodeToString(v), Element: hex.EncodeToString(e)})
				g.Records[string(name)+"/"+string(k)] = string(rec)
				return nil
			})
		})
	})
	if err != nil {
		t.Fatalf("reading %s as documented: %v", path, err)
	}
	if len(integrity) != 41 || integrity[0] != 1 {
		t.Fatalf("%s: the integrity record %x is not 01 || writes || MAC", path, integrity)
	}
	g.Writes = binary.BigEndian.Uint64(integrity[1:9])
	if !hmac.Equal(integrity[9:], docMAC(recKey, []byte("keyward store integrity v1\x00"), integrity[1:9], d[:])) {
		t.Fatalf("%s: the integrity MAC is not the documented one over the digest", path)
	}
	g.Digest, g.Integrity = hex.EncodeToString(d[:]), hex.EncodeToString(integrity)
	if rec := g.Records[metaBucket+"/"+schemaKey]; len(rec) == 8 {
		g.Schema = binary.BigEndian.Uint64([]byte(rec))
	}
	return g
}

// TestGoldenStore: today's Store, given the golden writes, makes a file
// whose content (every bucket's sequence, every sealed value, the
// integrity record) is testdata/golden.json value for value; the file
// testdata/golden.db, as an older keywardd left it, holds that same content
// and opens with today's Open; and the sealer, given golden.json's values
// alone, opens every one and vouches for the digest. A change here is a
// change of the store's format: a new schema with a migration.
func TestGoldenStore(t *testing.T) {
	jsonPath, dbPath := filepath.Join("testdata", "golden.json"), filepath.Join("testdata", "golden.db")
	fresh := filepath.Join(t.TempDir(), "keyward.db")
	s, err := Open(fresh, Options{Key: goldenKey})
	if err != nil {
		t.Fatal(err)
	}
	goldenWrites(t, s)
	s.Close()
	made := readGolden(t, fresh, goldenKey)
	want := golden.JSON(t, jsonPath, made)
	if golden.Update() {
		f, err := os.ReadFile(fresh)
		if err != nil {
			t.Fatal(err)
		}
		golden.File(t, dbPath, f)
	}
	compareGolden(t, "today's Store wrote", made, want, jsonPath)

	// The golden file: its content is golden.json's, and today's Open
	// checks and serves it.
	copyPath := filepath.Join(t.TempDir(), "keyward.db")
	f, err := os.ReadFile(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(copyPath, f, 0o600); err != nil {
		t.Fatal(err)
	}
	old := readGolden(t, copyPath, goldenKey)
	compareGolden(t, dbPath+" holds", old, want, jsonPath)
	s, err = Open(copyPath, Options{Key: goldenKey, Acknowledged: want.Writes})
	if err != nil {
		t.Fatalf("today's Open refuses %s: %v", dbPath, err)
	}
	if v, err := s.SchemaVersion(); err != nil || v != SchemaVersion || s.Writes() != want.Writes {
		t.Fatalf("%s opens with schema %d (%v) and %d writes; want %d and %d", dbPath, v, err, s.Writes(), SchemaVersion, want.Writes)
	}
	for _, v := range want.Values {
		if v.Bucket == metaBucket {
			continue
		}
		rec, err := s.Get(v.Bucket, v.Key)
		if err != nil || hex.EncodeToString(rec) != v.Record {
			t.Fatalf("today's Get(%s, %s) of %s = %x, %v; want %s", v.Bucket, v.Key, dbPath, rec, err, v.Record)
		}
	}
	s.Close()
	if _, err := Open(copyPath, Options{Key: goldenKey, Acknowledged: want.Writes + 1}); !errors.Is(err, ErrRolledBack) {
		t.Fatalf("%s opened after write %d was acknowledged: %v, want ErrRolledBack", dbPath, want.Writes+1, err)
	}
	if _, err := Open(copyPath, Options{Key: testKey}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("%s opened under another key: %v, want ErrDamaged", dbPath, err)
	}
	openGoldenValues(t, want)
}

// openGoldenValues: the sealer opens every golden value to its record and
// tag, and the golden integrity record vouches for the XOR of the golden
// elements, its write count included.
func openGoldenValues(t *testing.T, g goldenStore) {
	t.Helper()
	key, _ := hex.DecodeString(g.StoreKey)
	seal, err := newSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	var d digest
	for _, b := range g.Buckets {
		e, _ := hex.DecodeString(b.Element)
		d.xor([32]byte(e))
	}
	for _, v := range g.Values {
		sealed, _ := hex.DecodeString(v.Sealed)
		rec, tag, err := seal.open([]byte(v.Bucket), []byte(v.Key), sealed)
		if err != nil || hex.EncodeToString(rec) != v.Record {
			t.Fatalf("today's sealer does not open the golden value %s/%s: %v", v.Bucket, v.Key, err)
		}
		if _, _, err := seal.open([]byte(v.Bucket), []byte(v.Key+"x"), sealed); err == nil {
			t.Fatalf("the golden value %s/%s opens under another key", v.Bucket, v.Key)
		}
		e := seal.element(tag)
		d.xor(e)
	}
	integrity, _ := hex.DecodeString(g.Integrity)
	writes, err := seal.checkIntegrity(integrity, &d)
	if err != nil || writes != g.Writes || hex.EncodeToString(d[:]) != g.Digest {
		t.Fatalf("today's sealer: the golden integrity record gives %d writes, %v; digest %x, want %s", writes, err, d, g.Digest)
	}
}

// compareGolden fails naming each bucket, value or field of got that is
// not the golden one.
func compareGolden(t *testing.T, what string, got, want goldenStore, path string) {
	t.Helper()
	fail := func(field, g, w any) {
		t.Errorf("the store's format changed: %s %s\n  %v\nwhere %s has\n  %v\n(a change there is a format change; go test -update rewrites it)", what, field, g, path, w)
	}
	for _, f := range []struct {
		name string
		g, w any
	}{
		{"store_key_hex", got.StoreKey, want.StoreKey}, {"record_key_hex", got.RecordKey, want.RecordKey}, {"set_key_hex", got.SetKey, want.SetKey},
		{"writes", got.Writes, want.Writes}, {"digest_hex", got.Digest, want.Digest}, {"integrity_hex", got.Integrity, want.Integrity},
		{"schema_version", got.Schema, want.Schema}, {"the number of buckets", len(got.Buckets), len(want.Buckets)}, {"the number of values", len(got.Values), len(want.Values)},
	} {
		if f.g != f.w {
			fail(f.name, f.g, f.w)
		}
	}
	for i := range min(len(got.Buckets), len(want.Buckets)) {
		g, w := got.Buckets[i], want.Buckets[i]
		for _, f := range []struct{ name, g, w string }{
			{"name", g.Name, w.Name}, {"sequence", fmt.Sprint(g.Sequence), fmt.Sprint(w.Sequence)}, {"element_hex", g.Element, w.Element},
		} {
			if f.g != f.w {
				fail(fmt.Sprintf("%s of the bucket %s", f.name, w.Name), f.g, f.w)
			}
		}
	}
	for i := range min(len(got.Values), len(want.Values)) {
		g, w := got.Values[i], want.Values[i]
		for _, f := range []struct{ name, g, w string }{
			{"bucket", g.Bucket, w.Bucket}, {"key", g.Key, w.Key}, {"record_hex", g.Record, w.Record}, {"sealed_hex", g.Sealed, w.Sealed}, {"element_hex", g.Element, w.Element},
		} {
			if f.g != f.w {
				fail(fmt.Sprintf("%s of the value %s/%s", f.name, w.Bucket, w.Key), f.g, f.w)
			}
		}
	}
}
