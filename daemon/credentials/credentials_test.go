package credentials_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/host"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// plugin builds a plugin package once per test binary and copies it into a
// directory of the test.
func plugin(t *testing.T, pkg string) (string, string) {
	t.Helper()
	buildMu.Lock()
	bin, ok := built[pkg]
	if !ok {
		dir, err := os.MkdirTemp("", "keyward-plugin-")
		if err != nil {
			t.Fatal(err)
		}
		bin = filepath.Join(dir, "plugin")
		b := conformance.Build(t, pkg)
		data, _ := os.ReadFile(b)
		os.WriteFile(bin, data, 0o755)
		built[pkg] = bin
	}
	buildMu.Unlock()
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "plugin")
	os.WriteFile(path, data, 0o755)
	sum := sha256.Sum256(data)
	return path, hex.EncodeToString(sum[:])
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func newClock() *clock               { return &clock{t: time.Now()} }

type fixture struct {
	m       *credentials.Manager
	sealer  credentials.Sealer
	st      *store.Store
	clk     *clock
	plugins host.Set
	dir     string
}

// newFixture runs the file plugin as "file" and the test plugin as "test"
// (in mode), with a real store and an envelope sealer on a SoftHSM2 token.
func newFixture(t *testing.T, mode string) *fixture {
	t.Helper()
	h, _ := hsmtest.Open(t)
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	km, err := keys.New(st, h, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := km.Create(context.Background(), keys.Spec{Name: "keyward-credentials", Purpose: keys.Encrypt}); err != nil {
		t.Fatal(err)
	}
	f := &fixture{st: st, clk: newClock(), plugins: host.Set{}, dir: dir}
	os.Mkdir(filepath.Join(dir, "secrets"), 0o700)
	log := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	for name, pkg := range map[string]string{"file": "github.com/keyward/keyward/cmd/keyward-plugin-file", "test": "github.com/keyward/keyward/plugins/host/testdata/testplugin"} {
		path, sum := plugin(t, pkg)
		p, err := host.Start(host.Config{Name: name, Path: path, SHA256: sum, CallTimeout: 5 * time.Second, Log: log,
			Env: map[string]string{"TESTPLUGIN_RECORD": filepath.Join(dir, "record"), "TESTPLUGIN_MODE": mode, "KEYWARD_FILE_DIRS": filepath.Join(dir, "secrets")}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		f.plugins[name] = p
	}
	f.sealer = credentials.EnvelopeSealer{Envelope: envelope.New(km, h, envelope.Options{}), Key: "keyward-credentials"}
	f.m = credentials.New(st, f.plugins, f.sealer, f.clk.now)
	return f
}

// meddler is the store as a node sees it when another node changes a
// credential's record right after this one read it (this one cut off from
// etcd past its lock's lease, the other holding the lock now).
type meddler struct {
	*store.Store
	name  string
	armed bool
}

func (s *meddler) Get(bucket, key string) ([]byte, error) {
	rec, err := s.Store.Get(bucket, key)
	if s.armed && bucket == store.BucketCredentials && key == s.name {
		s.armed = false
		s.Store.Update(bucket, key, func(old []byte) ([]byte, error) {
			var r map[string]any
			json.Unmarshal(old, &r)
			r["last_error"] = "changed by another node"
			return json.Marshal(r)
		})
	}
	return rec, err
}

// TestChangedUnderneath: a change of a credential whose record another
// node changed since this one read it writes nothing and says so.
func TestChangedUnderneath(t *testing.T) {
	f := newFixture(t, "")
	ctx := context.Background()
	path := filepath.Join(f.dir, "secrets", "db-password")
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "db", Plugin: "file", Config: []byte(`{"path": "` + path + `"}`), RotationPeriod: 24 * time.Hour, Overlap: time.Hour}); err != nil {
		t.Fatal(err)
	}
	md := &meddler{Store: f.st, name: "db", armed: true}
	other := credentials.New(md, f.plugins, f.sealer, f.clk.now)
	if _, err := other.Rotate(ctx, "db"); !errors.Is(err, credentials.ErrChanged) {
		t.Fatalf("a rotation of a record changed underneath: %v, want ErrChanged", err)
	}
	b, err := f.st.Get(store.BucketCredentials, "db")
	if err != nil || !strings.Contains(string(b), "changed by another node") {
		t.Fatalf("the other node's change was overwritten: %s, %v", b, err)
	}
}

func (f *fixture) record() string {
	b, _ := os.ReadFile(filepath.Join(f.dir, "record"))
	return string(b)
}

func TestFileCredentialLifecycle(t *testing.T) {
	f := newFixture(t, "")
	ctx := context.Background()
	path := filepath.Join(f.dir, "secrets", "db-password")
	r, err := f.m.Register(ctx, credentials.Spec{Name: "db", Plugin: "file", Config: []byte(`{"path": "` + path + `"}`), RotationPeriod: 24 * time.Hour, Overlap: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if r.Current == nil || r.Current.Sealed != nil || r.Pending != nil {
		t.Fatalf("after Register: %+v", r)
	}
	_, first, err := f.m.Get(ctx, "db")
	if err != nil || len(first) != 32 {
		t.Fatalf("Get: %d bytes, %v", len(first), err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, first) {
		t.Fatal("the file does not hold the current secret")
	}

	r, err = f.m.Rotate(ctx, "db")
	if err != nil {
		t.Fatal(err)
	}
	_, second, _ := f.m.Get(ctx, "db")
	if bytes.Equal(first, second) || r.Previous == nil || !r.Previous.RetireAt.Equal(r.Current.Activated.Add(time.Hour)) {
		t.Fatalf("after Rotate: %+v", r)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, second) {
		t.Fatal("the file does not hold the new secret")
	}
	// The overlap: nothing to retire yet; after it, Maintain retires.
	if done, _ := f.m.Maintain(ctx); len(done) != 0 {
		t.Fatalf("Maintain inside the overlap did %v", done)
	}
	f.clk.add(time.Hour)
	if done, _ := f.m.Maintain(ctx); len(done) != 1 || done["db"] != nil {
		t.Fatalf("Maintain after the overlap: %v", done)
	}
	if r, _ := f.m.Describe("db"); r.Previous != nil {
		t.Fatalf("the previous credential was not retired: %+v", r.Previous)
	}
	// The period passes: Maintain leaves that to the scheduler (package
	// schedule), which calls Rotate.
	f.clk.add(24 * time.Hour)
	if done, _ := f.m.Maintain(ctx); len(done) != 0 {
		t.Fatalf("Maintain after the period: %v", done)
	}
	if _, err := f.m.Rotate(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	_, third, _ := f.m.Get(ctx, "db")
	if bytes.Equal(third, second) {
		t.Fatal("the period passed and the secret is the same")
	}

	// No secret in the store in the clear.
	raw, _ := os.ReadFile(f.st.Path())
	for _, s := range [][]byte{first, second, third} {
		if bytes.Contains(raw, s) {
			t.Fatal("a secret is in the store file in the clear")
		}
	}

	if _, err := f.m.Register(ctx, credentials.Spec{Name: "db", Plugin: "file", Config: []byte(`{"path": "` + path + `"}`)}); !errors.Is(err, credentials.ErrExists) {
		t.Errorf("a second db: %v", err)
	}
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "rel", Plugin: "file", Config: []byte(`{"path": "relative"}`)}); !errors.Is(err, credentials.ErrPermanent) {
		t.Errorf("a configuration the plugin refuses: %v", err)
	}
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "x", Plugin: "nope"}); !errors.Is(err, credentials.ErrNoPlugin) {
		t.Errorf("an unknown plugin: %v", err)
	}

	if _, err := f.m.Revoke(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.m.Get(ctx, "db"); !errors.Is(err, credentials.ErrRevoked) {
		t.Errorf("Get of a revoked credential: %v", err)
	}
	if _, err := f.m.Rotate(ctx, "db"); !errors.Is(err, credentials.ErrRevoked) {
		t.Errorf("Rotate of a revoked credential: %v", err)
	}
}

// TestRotationResumes: the plugin dies in the middle of Create; the
// rotation stays pending with its operation ID and secret, the current
// credential is untouched, and the retry completes the same operation.
func TestRotationResumes(t *testing.T) {
	f := newFixture(t, "crash-once")
	ctx := context.Background()
	r, err := f.m.Register(ctx, credentials.Spec{Name: "svc", Plugin: "test", Overlap: time.Minute})
	if err == nil {
		t.Fatal("a rotation whose plugin crashed succeeded")
	}
	if r == nil || r.Pending == nil || r.Pending.Step != credentials.StepNew || r.Failures != 1 || r.Current != nil {
		t.Fatalf("after the crash: %+v", r)
	}
	op := r.Pending.OperationID
	if !strings.Contains(f.record(), "crashed in "+op) {
		t.Fatalf("the plugin did not crash in %s:\n%s", op, f.record())
	}
	// Not before the retry time; then the host has restarted the plugin.
	if done, _ := f.m.Maintain(ctx); len(done) != 0 {
		t.Fatalf("Maintain before the retry time: %v", done)
	}
	f.clk.add(time.Minute)
	deadline := time.Now().Add(10 * time.Second)
	for {
		done, _ := f.m.Maintain(ctx)
		if done["svc"] == nil && len(done) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotation did not resume: %v", done)
		}
		f.clk.add(time.Hour) // past any backoff
		time.Sleep(200 * time.Millisecond)
	}
	r, _ = f.m.Describe("svc")
	if r.Current == nil || r.Pending != nil || r.Failures != 0 || r.LastError != "" {
		t.Fatalf("after the retry: %+v", r)
	}
	rec := f.record()
	if !strings.Contains(rec, "create "+op+" ") || !strings.Contains(rec, "activate "+op+" ") {
		t.Errorf("the retry did not complete operation %s:\n%s", op, rec)
	}
}

// TestPermanentFailureKeepsCurrent: a plugin that refuses for good leaves
// the current credential as it was, and the rotation is abandoned.
func TestPermanentFailureKeepsCurrent(t *testing.T) {
	f := newFixture(t, "refuse")
	ctx := context.Background()
	r, err := f.m.Register(ctx, credentials.Spec{Name: "svc", Plugin: "test"})
	if !errors.Is(err, credentials.ErrPermanent) || !strings.Contains(err.Error(), "refuses new credentials") {
		t.Fatalf("Register: %v", err)
	}
	if r.Pending != nil || r.Current != nil || r.LastError == "" {
		t.Fatalf("after a permanent failure: %+v", r)
	}
	if _, _, err := f.m.Get(ctx, "svc"); !errors.Is(err, credentials.ErrNoSecret) {
		t.Errorf("Get with no current secret: %v", err)
	}
}

// TestRotationInOverlapRetiresPrevious: a rotation while the previous
// version is in its overlap retires it first, so no version is ever
// dropped from the record while it still works in the external system.
func TestRotationInOverlapRetiresPrevious(t *testing.T) {
	f := newFixture(t, "")
	ctx := context.Background()
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "svc", Plugin: "test", Overlap: time.Hour}); err != nil {
		t.Fatal(err)
	}
	r, err := f.m.Rotate(ctx, "svc")
	if err != nil || r.Previous == nil {
		t.Fatalf("first rotation: %+v, %v", r, err)
	}
	first := r.Previous.Handle
	if r, err = f.m.Rotate(ctx, "svc"); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`retire rot-[0-9a-f]+-retire ` + first + "\n").MatchString(f.record()) {
		t.Fatalf("%s was dropped without being retired:\n%s", first, f.record())
	}
	if r.Previous == nil || r.Previous.Handle == first {
		t.Errorf("after the second rotation: previous %+v", r.Previous)
	}
}

// TestOneCredentialPerConfiguration: a second credential on the same
// plugin configuration (the same file, the same database role) is refused:
// it would rotate the first one's secret behind its back.
func TestOneCredentialPerConfiguration(t *testing.T) {
	f := newFixture(t, "")
	ctx := context.Background()
	path := filepath.Join(f.dir, "secrets", "shared")
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "a", Plugin: "file", Config: []byte(`{"path": "` + path + `"}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "b", Plugin: "file", Config: []byte(`{ "path":"` + path + `" }`)}); !errors.Is(err, credentials.ErrExists) {
		t.Fatalf("a second credential on the same file: %v", err)
	}
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "c", Plugin: "file", Config: []byte(`{"path": "` + filepath.Join(f.dir, "secrets", "x") + `"}`)}); err != nil {
		t.Fatalf("another file: %v", err)
	}
	// Outside the directories the plugin may write in: refused by it.
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "d", Plugin: "file", Config: []byte(`{"path": "` + f.st.Path() + `"}`)}); !errors.Is(err, credentials.ErrPermanent) {
		t.Fatalf("a credential on keywardd's own store: %v", err)
	}
}

// TestRevokeWaitsForThePlugin: a revocation whose plugin is not there (not
// configured now, or away) keeps the versions on record and retries; none
// is forgotten while it may still work.
func TestRevokeWaitsForThePlugin(t *testing.T) {
	f := newFixture(t, "")
	ctx := context.Background()
	if _, err := f.m.Register(ctx, credentials.Spec{Name: "svc", Plugin: "test"}); err != nil {
		t.Fatal(err)
	}
	p := f.plugins["test"]
	delete(f.plugins, "test")
	r, err := f.m.Revoke(ctx, "svc")
	if !errors.Is(err, credentials.ErrNoPlugin) || r.Current == nil || r.State != credentials.Revoked {
		t.Fatalf("Revoke without the plugin: %+v, %v", r, err)
	}
	f.plugins["test"] = p
	if done, _ := f.m.Maintain(ctx); done["svc"] != nil || len(done) != 1 {
		t.Fatalf("Maintain with the plugin back: %v", done)
	}
	if r, _ := f.m.Describe("svc"); r.Current != nil {
		t.Fatalf("the current version is still on record: %+v", r.Current)
	}
	if !strings.Contains(f.record(), "retire revoke-svc-svc-1 svc-1\n") {
		t.Errorf("the plugin did not retire svc-1:\n%s", f.record())
	}
}
