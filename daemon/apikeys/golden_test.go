package apikeys

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// knownPepper is HMAC-SHA256 under a known key, for the pepper only.
// keyward's pepper never leaves the HSM, so the golden MACs and hints are
// made by Go's HMAC-SHA256, as the HSM would make them
// (hsm.TestCrossCheckGoCrypto holds the two equal).
type knownPepper []byte

func (k knownPepper) HMACSHA256(_ context.Context, id hsm.KeyID, msg []byte) ([]byte, error) {
	if id != pepper {
		return nil, fmt.Errorf("known pepper: no key %s", id)
	}
	m := hmac.New(sha256.New, k)
	m.Write(msg)
	return m.Sum(nil), nil
}

// keyVector is one golden API key: the randomness Generate read and the
// key it made, its MAC under the pepper, its hint, and the store's records
// of it (the apikeys record, with that MAC as its current secret, and the
// apikey_macs entry). All are strings, compared and named field by field.
type keyVector struct {
	Name       string `json:"name"`
	Prefix     string `json:"prefix"`
	Random     string `json:"random_hex"`
	Pepper     string `json:"pepper_hex"`
	Key        string `json:"key"`
	Checksum   string `json:"checksum"`
	MAC        string `json:"mac_hex"`
	Hint       string `json:"hint_hex"`
	Record     string `json:"record_json"`
	IndexEntry string `json:"index_json"`
}

// goldenKeyInput is a vector's inputs: a record whose last secret is the
// key made (its MAC is filled in).
type goldenKeyInput struct {
	name, prefix string
	random       []byte
	pepper       []byte
	rec          Record
}

// countFrom is the stream start, start+1, ... (mod 256), n bytes.
func countFrom(start byte, n int) []byte {
	b := make([]byte, n)
	c := counting{n: start}
	c.Read(b)
	return b
}

var goldenCreated = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

func goldenKeyInputs() []goldenKeyInput {
	oldMAC := bytes.Repeat([]byte{0x0d}, 32)
	// 64 bytes that look random (two SHA-256 sums), among them bytes from
	// 248 up, which are skipped.
	var random []byte
	for i := range 2 {
		s := sha256.Sum256(fmt.Appendf(nil, "keyward %d", i))
		random = append(random, s[:]...)
	}
	return []goldenKeyInput{
		{name: "default prefix, a key as CreateAPIKey makes it with defaults", prefix: "kw", random: countFrom(0, 64), pepper: bytes.Repeat([]byte{0x11}, 32),
			rec: Record{ID: "ak_000102030405060708090a0b", Owner: "team-a", Name: "billing", Environment: "prod", Permissions: []string{"read-only"},
				Limits: DefaultLimits["read-only"], State: Active, Created: goldenCreated, Secrets: []Secret{{Created: goldenCreated}}}},
		{name: "bytes 248 to 255 skipped, a rotated key", prefix: "kwprod", random: countFrom(240, 128), pepper: bytes.Repeat([]byte{0x22}, 32),
			rec: Record{ID: "ak_ffeeddccbbaa998877665544", Owner: "svc:orders@example.com", Name: "orders", Environment: "staging", Permissions: []string{"orders:write", "admin"},
				State: Active, Created: goldenCreated, Secrets: []Secret{
					{MAC: oldMAC, Created: goldenCreated, NotAfter: goldenCreated.Add(14 * 24 * time.Hour)},
					{Created: goldenCreated.Add(7 * 24 * time.Hour)},
				}}},
		{name: "the longest prefix, every field of a record", prefix: "k0123456789abcde", random: random, pepper: []byte("keyward golden pepper, 32 bytes!"),
			rec: Record{ID: "ak_5a5a5a5a5a5a5a5a5a5a5a5a", Owner: "team-b", Name: "ingest \"batch\" <eu>", Environment: "prod",
				Permissions: []string{"*:read", "events:write"}, Expires: goldenCreated.AddDate(1, 0, 0),
				AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")},
				Limits:     []ratelimit.Layer{{Limit: 5, Per: time.Second, Burst: 10}, {Limit: 1000, Per: time.Hour, Burst: 1000}},
				Quota:      &Quota{Remaining: 99, Refill: 100, RefillEvery: 24 * time.Hour, LastRefill: goldenCreated},
				Tags:       []string{"eu", "batch"}, Metadata: map[string]string{"ticket": "OPS-1", "cost-centre": "42"},
				State: Active, Created: goldenCreated, Secrets: []Secret{{Created: goldenCreated}}}},
	}
}

// goldenManager is a Manager on a fresh store with a known pepper.
func goldenManager(t *testing.T, prefix string, pep []byte, now time.Time) (*Manager, *store.Store) {
	t.Helper()
	s, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	m, err := NewManager(s, knownPepper(pep), pepper, Options{Prefix: prefix, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

// makeKeyVector computes a vector from its inputs with today's code.
func makeKeyVector(t *testing.T, in goldenKeyInput) keyVector {
	t.Helper()
	key, err := Generate(in.prefix, bytes.NewReader(in.random))
	if err != nil {
		t.Fatalf("%s: Generate: %v (does it read more randomness than the vector holds?)", in.name, err)
	}
	mac, _ := knownPepper(in.pepper).HMACSHA256(context.Background(), pepper, []byte(key))
	m, _ := goldenManager(t, in.prefix, in.pepper, goldenCreated)
	rec := in.rec
	rec.Secrets = append([]Secret(nil), in.rec.Secrets...)
	rec.Secrets[len(rec.Secrets)-1].MAC = mac
	recJSON, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	index, _ := json.Marshal(secretRef{ID: rec.ID, Secret: len(rec.Secrets) - 1})
	return keyVector{Name: in.name, Prefix: in.prefix, Random: hex.EncodeToString(in.random), Pepper: hex.EncodeToString(in.pepper),
		Key: key, Checksum: key[len(key)-checksumLen:], MAC: hex.EncodeToString(mac), Hint: m.hint(key), Record: string(recJSON), IndexEntry: string(index)}
}

// TestGolden: today's code makes testdata/golden.json's API keys, MACs,
// hints and records from their inputs, field for field, and a Manager
// whose store holds a vector's records verifies its key as VALID. A change
// here is a change of the API key format or of its records.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	var made []keyVector
	for _, in := range goldenKeyInputs() {
		made = append(made, makeKeyVector(t, in))
	}
	vectors := golden.JSON(t, path, made)
	if len(vectors) != len(made) {
		t.Fatalf("%s holds %d vectors, the test makes %d (go test -update rewrites it)", path, len(vectors), len(made))
	}
	for i, v := range vectors {
		t.Run(v.Name, func(t *testing.T) {
			got := made[i]
			for _, f := range []struct{ name, got, want string }{
				{"name", got.Name, v.Name}, {"prefix", got.Prefix, v.Prefix}, {"random_hex", got.Random, v.Random}, {"pepper_hex", got.Pepper, v.Pepper},
				{"key", got.Key, v.Key}, {"checksum", got.Checksum, v.Checksum}, {"mac_hex", got.MAC, v.MAC}, {"hint_hex", got.Hint, v.Hint},
				{"record_json", got.Record, v.Record}, {"index_json", got.IndexEntry, v.IndexEntry},
			} {
				if f.got != f.want {
					t.Errorf("the API key format changed: %s of %q:\n got %s\nwant %s\n(a change in %s is a format change; go test -update rewrites it)", f.name, v.Name, f.got, f.want, path)
				}
			}
			verifyGoldenKey(t, v)
		})
	}
}

// verifyGoldenKey: the vector's key parses, its checksum is the last six
// characters, and a Manager with the vector's pepper, whose store holds
// the vector's record, index entry and hint, finds the key and says VALID.
func verifyGoldenKey(t *testing.T, v keyVector) {
	t.Helper()
	if p, err := Parse(v.Key); err != nil || p != v.Prefix {
		t.Fatalf("today's Parse(%s) = %q, %v; want prefix %q", v.Key, p, err, v.Prefix)
	}
	if v.Key[len(v.Key)-checksumLen:] != v.Checksum || checksum(v.Key[:len(v.Key)-checksumLen]) != v.Checksum {
		t.Fatalf("the checksum of %s is not %s", v.Key, v.Checksum)
	}
	var rec Record
	if err := json.Unmarshal([]byte(v.Record), &rec); err != nil {
		t.Fatal(err)
	}
	pep, _ := hex.DecodeString(v.Pepper)
	now := goldenCreated.Add(8 * 24 * time.Hour)
	m, s := goldenManager(t, v.Prefix, pep, now)
	for _, w := range []struct{ bucket, key, rec string }{
		{store.BucketAPIKeys, rec.ID, v.Record}, {store.BucketAPIKeyMACs, v.MAC, v.IndexEntry}, {store.BucketAPIKeyHints, v.Hint, "\x01"},
	} {
		if err := s.Update(w.bucket, w.key, func([]byte) ([]byte, error) { return []byte(w.rec), nil }); err != nil {
			t.Fatal(err)
		}
	}
	req := Request{Environment: rec.Environment, Permissions: []string{"orders:read"}}
	if len(rec.AllowedIPs) > 0 {
		req.SourceIP = rec.AllowedIPs[0].Addr().Next()
	}
	res := m.Verify(context.Background(), v.Key, req)
	if res.Code != Valid || res.Key == nil || res.Key.ID != rec.ID {
		t.Fatalf("today's Verify of the golden key %s: %s (%s), want VALID for %s", v.Key, res.Code, res.Detail, rec.ID)
	}
	i, c := len(v.Prefix)+1, "x"
	if v.Key[i] == 'x' {
		c = "y"
	}
	if res := m.Verify(context.Background(), v.Key[:i]+c+v.Key[i+1:], req); res.Code != Malformed {
		t.Fatalf("a typo in the golden key: %s, want MALFORMED", res.Code)
	}
}

// TestGoldenLayout: what the Manager stores for a key it issues is laid
// out as the vectors are: the record's MAC is HMAC-SHA256 of the whole key
// string under the pepper, apikey_macs maps its hex to the ID and secret
// number, and apikey_hints holds the first 8 bytes of HMAC-SHA256 of the
// key under HMAC-SHA256(pepper, "keyward apikeys hint key v1"). The key
// and the ID are random here; everything else is derived as documented.
func TestGoldenLayout(t *testing.T) {
	pep := bytes.Repeat([]byte{0x33}, 32)
	m, s := goldenManager(t, DefaultPrefix, pep, goldenCreated)
	key, pub, err := m.Create(context.Background(), Spec{Owner: "team-a", Name: "billing", Environment: "prod", Permissions: []string{"read-only"}})
	if err != nil {
		t.Fatal(err)
	}
	if !idForm.MatchString(pub.ID) {
		t.Fatalf("ID %q is not ak_ and 24 hex digits", pub.ID)
	}
	raw, err := s.Get(store.BucketAPIKeys, pub.ID)
	if err != nil {
		t.Fatal(err)
	}
	var rec Record
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, pep)
	mac.Write([]byte(key))
	want := mac.Sum(nil)
	if len(rec.Secrets) != 1 || !bytes.Equal(rec.Secrets[0].MAC, want) {
		t.Fatal("the stored secret's MAC is not HMAC-SHA256 of the key string under the pepper")
	}
	if idx, err := s.Get(store.BucketAPIKeyMACs, hex.EncodeToString(want)); err != nil || string(idx) != `{"id":"`+pub.ID+`","secret":0}` {
		t.Fatalf("apikey_macs entry %s, %v", idx, err)
	}
	hk := hmac.New(sha256.New, pep)
	hk.Write([]byte("keyward apikeys hint key v1"))
	hint := hmac.New(sha256.New, hk.Sum(nil))
	hint.Write([]byte(key))
	if v, err := s.Get(store.BucketAPIKeyHints, hex.EncodeToString(hint.Sum(nil)[:8])); err != nil || !bytes.Equal(v, []byte{1}) {
		t.Fatalf("no documented hint for the key: %x, %v", v, err)
	}
	// The record as stored is the first vector's record (made from the
	// same spec at the same time) but for the random ID and MAC.
	first := makeKeyVector(t, goldenKeyInputs()[0])
	firstMAC, _ := hex.DecodeString(first.MAC)
	wantRec := strings.NewReplacer(`"ak_000102030405060708090a0b"`, `"`+pub.ID+`"`,
		base64.StdEncoding.EncodeToString(firstMAC), base64.StdEncoding.EncodeToString(want)).Replace(first.Record)
	if string(raw) != wantRec {
		t.Fatalf("a key made by the Manager is stored as\n%s\nthe golden record of the same spec, with this ID and MAC, is\n%s", raw, wantRec)
	}
}
