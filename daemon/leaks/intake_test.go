package leaks

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

var (
	pepper   = hsm.KeyID{Name: "keyward-apikeys", Version: 1}
	auditKey = hsm.KeyID{Name: "keyward-audit", Version: 1}
)

// scanner is a secret scanner the test makes: a P-256 key, and the keys
// document that publishes it.
type scanner struct {
	id  string
	key *ecdsa.PrivateKey
}

func newScanner(t testing.TB, id string) *scanner {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &scanner{id: id, key: k}
}

// document is the public keys document of the scanners.
func document(t testing.TB, ss ...*scanner) []byte {
	t.Helper()
	var doc keysDocument
	for i, s := range ss {
		der, err := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		doc.PublicKeys = append(doc.PublicKeys, struct {
			KeyIdentifier string `json:"key_identifier"`
			Key           string `json:"key"`
			IsCurrent     bool   `json:"is_current"`
		}{s.id, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), i == 0})
	}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (s *scanner) sign(t testing.TB, body []byte) string {
	t.Helper()
	h := sha256.Sum256(body)
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

type fixture struct {
	store *store.Store
	akm   *apikeys.Manager
	al    *audit.Log
	audit string
	scan  *scanner
	in    *Intake
	srv   *httptest.Server
	clk   *clock
	opts  Options // the intake's
	// logs is the intake's log. slog's handler serializes writes; read
	// it only while no request is being served.
	logs *bytes.Buffer
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// newFixture is an intake on a real store, a SoftHSM2 token, a real audit
// log and an HTTP server, trusting one scanner's key from a keys file.
func newFixture(t testing.TB, action apikeys.LeakAction) *fixture {
	t.Helper()
	ctx := context.Background()
	h, _ := hsmtest.Open(t)
	for _, k := range []hsm.KeyID{pepper, auditKey} {
		if err := h.CreateKey(ctx, k, hsm.HMACSHA256); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{store: st, audit: filepath.Join(dir, "audit.log"), scan: newScanner(t, "kid-1"), clk: &clock{t: time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)}}
	if f.akm, err = apikeys.NewManager(st, h, pepper, apikeys.Options{Prefix: "kw", Now: f.clk.now, LeakAction: action}); err != nil {
		t.Fatal(err)
	}
	if f.al, err = audit.Open(f.audit, h, auditKey, audit.Options{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.al.Close() })
	keysFile := filepath.Join(dir, "keys.json")
	if err := os.WriteFile(keysFile, document(t, f.scan), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := NewKeys(ctx, keysFile, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.logs = &bytes.Buffer{}
	f.opts = Options{Keys: keys, Reporter: f.akm, Audit: f.al, Caller: audit.Caller{UID: 1}, Now: f.clk.now,
		Log: slog.New(slog.NewTextHandler(f.logs, nil)), MaxBody: 4096, ReplayWindow: 10 * time.Minute}
	f.serve(t, f.opts)
	return f
}

// serve puts an intake of o in place of the fixture's.
func (f *fixture) serve(t testing.TB, o Options) {
	t.Helper()
	if f.srv != nil {
		f.srv.Close()
	}
	f.in = New(o)
	f.srv = httptest.NewServer(f.in.Handler())
	t.Cleanup(f.srv.Close)
}

func (f *fixture) create(t testing.TB, owner string) (string, string) {
	t.Helper()
	secret, rec, err := f.akm.Create(context.Background(), apikeys.Spec{Owner: owner, Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	return secret, rec.ID
}

// post sends a report; sig "" signs it with the fixture's scanner.
func (f *fixture) post(t testing.TB, method, keyID, sig string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, f.srv.URL+Path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if sig == "" {
		sig = f.scan.sign(t, body)
	}
	if keyID != "-" {
		req.Header.Set("Github-Public-Key-Identifier", keyID)
		req.Header.Set("Github-Public-Key-Signature", sig)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func payload(tokens ...string) []byte {
	var fs []Found
	for _, tok := range tokens {
		fs = append(fs, Found{Token: tok, Type: "keyward_api_key", URL: "https://github.com/o/r/blob/1/.env", Source: "content"})
	}
	b, _ := json.Marshal(fs)
	return b
}

func (f *fixture) events(t testing.TB) []outbox.Event {
	t.Helper()
	var out []outbox.Event
	if err := f.store.ForEach(store.BucketOutbox, "", func(_ string, b []byte) error {
		var e outbox.Event
		if err := json.Unmarshal(b, &e); err != nil {
			return err
		}
		out = append(out, e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func (f *fixture) audited(t testing.TB, op string) []audit.Record {
	t.Helper()
	p, err := f.al.List(context.Background(), audit.Query{Op: op})
	if err != nil {
		t.Fatal(err)
	}
	var out []audit.Record
	for _, e := range p.Records {
		out = append(out, e.Record)
	}
	return out
}

func (f *fixture) verify(t testing.TB, secret string) apikeys.Code {
	t.Helper()
	return f.akm.Verify(context.Background(), secret, apikeys.Request{Environment: "prod", Permissions: []string{"orders:read"}}).Code
}

func TestIntake(t *testing.T) {
	f := newFixture(t, apikeys.LeakRevoke)
	leaked, leakedID := f.create(t, "shop")
	kept, _ := f.create(t, "shop")
	unknown, err := apikeys.Generate("kw", rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	malformed := leaked[:len(leaked)-2] + "zz"
	body := payload(leaked, unknown, malformed, "kw_short")

	code, b := f.post(t, http.MethodPost, "kid-1", "", body)
	if code != http.StatusOK {
		t.Fatalf("POST = %d %s", code, b)
	}
	var labels []Label
	if err := json.Unmarshal(b, &labels); err != nil {
		t.Fatal(err)
	}
	want := []string{TruePositive, FalsePositive, FalsePositive, FalsePositive}
	for i, l := range labels {
		if l.Label != want[i] || l.TokenType != "keyward_api_key" {
			t.Errorf("label %d = %+v, want %s", i, l, want[i])
		}
	}
	if len(labels) != 4 || labels[0].TokenRaw != leaked || labels[1].TokenRaw != unknown {
		t.Fatalf("labels = %+v", labels)
	}
	// Revoked within the call; the other key untouched.
	if c := f.verify(t, leaked); c != apikeys.Revoked {
		t.Fatalf("the leaked key verifies %s, want REVOKED", c)
	}
	if c := f.verify(t, kept); c != apikeys.Valid {
		t.Fatalf("the other key verifies %s, want VALID", c)
	}
	es := f.events(t)
	if len(es) != 2 || es[0].Kind != outbox.APIKeyRevoked || es[1].Kind != outbox.APIKeyLeaked || es[1].ID != leakedID || es[1].Subject != "shop" ||
		!strings.Contains(es[1].Detail, "found by github:content as keyward_api_key at https://github.com/o/r/blob/1/.env") {
		t.Fatalf("events = %+v", es)
	}
	recs := f.audited(t, "keywardd.APIKeyLeak")
	if len(recs) != 1 || recs[0].APIKey != leakedID || recs[0].Key != "shop" || recs[0].Result != "TRUE_POSITIVE" || !strings.Contains(recs[0].Detail, "kid-1") {
		t.Fatalf("audit = %+v", recs)
	}
	if r := f.audited(t, "keywardd.LeakReport"); len(r) != 1 || r[0].Items != 4 {
		t.Fatalf("report audit = %+v", r)
	}
	// No token in the audit log.
	raw, err := os.ReadFile(f.audit)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range []string{leaked, unknown, malformed} {
		if bytes.Contains(raw, []byte(tok)) {
			t.Fatal("a token is in the audit log")
		}
	}

	// The scanner retries (a new signature, ECDSA's are randomized): the
	// same answer, from memory, nothing done or audited again.
	code, b2 := f.post(t, http.MethodPost, "kid-1", "", body)
	if code != http.StatusOK || !bytes.Equal(b, b2) {
		t.Fatalf("replay = %d %s, want the first answer", code, b2)
	}
	if n := len(f.audited(t, "keywardd.*")); n != 2 {
		t.Fatalf("a replay was audited: %d records", n)
	}
	// Past the window: handled again, still a true positive, no new event.
	f.clk.add(11 * time.Minute)
	if code, b3 := f.post(t, http.MethodPost, "kid-1", "", body); code != http.StatusOK || !bytes.Equal(b, b3) {
		t.Fatalf("a late replay = %d %s", code, b3)
	}
	if n := len(f.events(t)); n != 2 {
		t.Fatalf("a late replay wrote events: %d", n)
	}
	if r := f.audited(t, "keywardd.APIKeyLeak"); len(r) != 2 || !strings.Contains(r[0].Detail, "already revoked") {
		t.Fatalf("the late replay's audit = %+v", r)
	}
}

func TestIntakeRefuses(t *testing.T) {
	f := newFixture(t, apikeys.LeakRevoke)
	secret, _ := f.create(t, "shop")
	body := payload(secret)
	other := newScanner(t, "kid-1") // same identifier, another key
	for _, tc := range []struct {
		name, method, keyID, sig string
		body                     []byte
		code                     int
		msg                      string
	}{
		{"GET", http.MethodGet, "kid-1", "", body, http.StatusMethodNotAllowed, "POST"},
		{"unsigned", http.MethodPost, "-", "", body, http.StatusUnauthorized, "not signed"},
		{"unknown key identifier", http.MethodPost, "kid-9", "", body, http.StatusUnauthorized, "does not know"},
		{"signed by another key", http.MethodPost, "kid-1", other.sign(t, body), body, http.StatusUnauthorized, "does not verify"},
		{"signature of another body", http.MethodPost, "kid-1", f.scan.sign(t, payload("x")), body, http.StatusUnauthorized, "does not verify"},
		{"signature not base64", http.MethodPost, "kid-1", "!!!", body, http.StatusUnauthorized, "not base64"},
		{"signature not ASN.1", http.MethodPost, "kid-1", base64.StdEncoding.EncodeToString([]byte("garbage")), body, http.StatusUnauthorized, "does not verify"},
		{"oversize", http.MethodPost, "kid-1", "", bytes.Repeat([]byte(" "), 5000), http.StatusRequestEntityTooLarge, "at most 4096 bytes"},
		{"signed, not a list", http.MethodPost, "kid-1", "", []byte(`{"token":"x"}`), http.StatusBadRequest, "not a JSON array"},
		{"signed, empty", http.MethodPost, "kid-1", "", []byte(`[]`), http.StatusBadRequest, "0 tokens"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, b := f.post(t, tc.method, tc.keyID, tc.sig, tc.body)
			if code != tc.code || !strings.Contains(string(b), tc.msg) {
				t.Fatalf("%s = %d %q, want %d saying %q", tc.name, code, b, tc.code, tc.msg)
			}
		})
	}
	// Nothing was done.
	if c := f.verify(t, secret); c != apikeys.Valid {
		t.Fatalf("the key verifies %s after refused reports", c)
	}
	if n := len(f.events(t)); n != 0 {
		t.Fatalf("refused reports wrote %d events", n)
	}
	if n := len(f.audited(t, "keywardd.*")); n != 0 {
		t.Fatalf("refused reports were audited: %d", n)
	}
}

func TestIntakeDisable(t *testing.T) {
	f := newFixture(t, apikeys.LeakDisable)
	secret, id := f.create(t, "shop")
	if code, b := f.post(t, http.MethodPost, "kid-1", "", payload(secret)); code != http.StatusOK || !strings.Contains(string(b), TruePositive) {
		t.Fatalf("POST = %d %s", code, b)
	}
	if c := f.verify(t, secret); c != apikeys.Disabled {
		t.Fatalf("the key verifies %s, want DISABLED (leaks.action: disable)", c)
	}
	if es := f.events(t); len(es) != 1 || es[0].Kind != outbox.APIKeyLeaked || es[0].ID != id {
		t.Fatalf("events = %+v, want the leak alone", es)
	}
}

func TestKeysRefresh(t *testing.T) {
	a, b := newScanner(t, "a"), newScanner(t, "b")
	url, setDoc := keysServer(t)
	ctx := context.Background()
	// The URL down at start, no file: NewKeys still works, with no keys.
	k, err := NewKeys(ctx, "", url, nil)
	if err != nil || k.Len() != 0 {
		t.Fatalf("NewKeys with the URL down = %v, %d keys", err, k.Len())
	}
	setDoc(document(t, a, b))
	if err := k.Refresh(ctx); err != nil || k.Len() != 2 {
		t.Fatalf("Refresh = %v, %d keys", err, k.Len())
	}
	body := []byte(`[{"token":"x"}]`)
	sig, _ := ParseSignature(b.sign(t, body))
	if err := k.Verify("b", body, sig); err != nil {
		t.Fatal(err)
	}
	// A failed refresh keeps the keys.
	setDoc([]byte(`{"public_keys": []}`))
	if err := k.Refresh(ctx); err == nil || k.Len() != 2 {
		t.Fatalf("a bad document: %v, %d keys", err, k.Len())
	}
	// A file that does not parse is an error at start.
	bad := filepath.Join(t.TempDir(), "keys.json")
	os.WriteFile(bad, []byte("nope"), 0o600)
	if _, err := NewKeys(ctx, bad, "", nil); err == nil {
		t.Fatal("NewKeys took a file that does not parse")
	}
}

func TestParseKeysRefuses(t *testing.T) {
	rsaDoc := `{"public_keys":[{"key_identifier":"r","key":"-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMVx\n-----END PUBLIC KEY-----\n"}]}`
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&p384.PublicKey)
	p384Doc, _ := json.Marshal(map[string]any{"public_keys": []map[string]any{{"key_identifier": "p", "key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}}})
	for _, tc := range []struct{ name, doc, msg string }{
		{"not JSON", "nope", "not usable"},
		{"no keys", `{"public_keys":[]}`, "no public_keys"},
		{"no identifier", `{"public_keys":[{"key":"x"}]}`, "no key_identifier"},
		{"not PEM", `{"public_keys":[{"key_identifier":"a","key":"x"}]}`, "not a PEM PUBLIC KEY"},
		{"broken key", rsaDoc, `"r"`},
		{"P-384", string(p384Doc), "not an ECDSA P-256 key"},
	} {
		if _, err := ParseKeys([]byte(tc.doc)); err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: ParseKeys = %v, want an error saying %q", tc.name, err, tc.msg)
		}
	}
}

func TestConfigCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		msg  string
	}{
		{"action", Config{Action: "delete"}, "revoke or disable"},
		{"no keys", func() Config { var c Config; c.HTTP.Address = "127.0.0.1:0"; return c }(), "public_keys_file"},
		{"not loopback", func() Config {
			var c Config
			c.HTTP.Address, c.PublicKeysFile = "0.0.0.0:8443", "/k"
			return c
		}(), "tls_cert"},
		{"http URL", Config{PublicKeysURL: "http://example.com/keys"}, "use https"},
		{"refresh", Config{RefreshEvery: time.Second}, "at least 1m"},
		{"max_in_flight", Config{MaxInFlight: 2000}, "max_in_flight is from 1 to 1024"},
		{"max_in_flight negative", Config{MaxInFlight: -1}, "max_in_flight is from 1 to 1024"},
	} {
		if err := tc.c.Check(); err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: Check = %v, want %q", tc.name, err, tc.msg)
		}
	}
	var ok Config
	ok.HTTP.Address, ok.PublicKeysFile, ok.Action = "127.0.0.1:8643", "/etc/keyward/scanner-keys.json", "disable"
	if err := ok.Check(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkIntakeToRevoked measures from the intake's receipt of a signed
// report of one leaked key (the HTTP request in) to the revocation being
// what VerifyAPIKey answers: the signature check, the lookup (the key's
// HMAC in SoftHSM2), the store transaction (bbolt, fsync), the audit
// record, the answer, and a Verify that sees REVOKED.
func BenchmarkIntakeToRevoked(b *testing.B) {
	f := newFixture(b, apikeys.LeakRevoke)
	secrets := make([]string, b.N)
	bodies := make([][]byte, b.N)
	sigs := make([]string, b.N)
	for i := range b.N {
		secrets[i], _ = f.create(b, fmt.Sprintf("o%d", i%100))
		bodies[i] = payload(secrets[i])
		sigs[i] = f.scan.sign(b, bodies[i])
	}
	b.ResetTimer()
	for i := range b.N {
		req := httptest.NewRequest(http.MethodPost, Path, bytes.NewReader(bodies[i]))
		req.Header.Set("Github-Public-Key-Identifier", "kid-1")
		req.Header.Set("Github-Public-Key-Signature", sigs[i])
		w := httptest.NewRecorder()
		f.in.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("report = %d %s", w.Code, w.Body)
		}
		if c := f.verify(b, secrets[i]); c != apikeys.Revoked {
			b.Fatalf("verify after the report = %s", c)
		}
	}
}
