package server

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

// The keys keywardd keeps for itself, made by newTestServer as keywardd
// makes them (daemon/assemble.go).
var (
	auditKey       = hsm.KeyID{Name: ReservedPrefix + "audit", Version: 1}
	pepperKey      = hsm.KeyID{Name: ReservedPrefix + "apikeys", Version: 1}
	credentialsKey = ReservedPrefix + "credentials"
)

// testClock is the server's clock, which a test may move on.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

// testServer is a Server on real parts: a SoftHSM2 token of its own, a
// bbolt store and an audit log in the test's directory, and the real key
// manager, envelope service, token service, API key manager and rotation
// schedule over them. Tests reach the domain through its fields to set
// up what a case needs, and read what a call left in the audit log.
type testServer struct {
	s         *Server
	h         *hsm.HSM
	st        *store.Store
	keys      *keys.Manager
	envelope  *envelope.Service
	tokens    *tokens.Service
	apiKeys   *apikeys.Manager
	clock     *testClock
	auditPath string
	dir       string
}

// serverOption changes the Config newTestServer makes, once its parts
// are made (say, to add managed credentials).
type serverOption func(t *testing.T, ts *testServer, cfg *Config)

// newTestServer makes a testServer under the policy policyYAML.
func newTestServer(t *testing.T, policyYAML string, opts ...serverOption) *testServer {
	t.Helper()
	ctx := context.Background()
	h, _ := hsmtest.Open(t)
	dir := t.TempDir()
	clk := &testClock{t: time.Now().Truncate(time.Second)}
	st, err := store.Open(filepath.Join(dir, "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	km, err := keys.New(st, h, keys.Options{Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []keys.Spec{{Name: auditKey.Name, Purpose: keys.MAC}, {Name: pepperKey.Name, Purpose: keys.MAC},
		{Name: credentialsKey, Purpose: keys.Encrypt}} {
		if _, err := km.Create(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	auditPath := filepath.Join(dir, "audit.log")
	al, err := audit.Open(auditPath, h, auditKey, audit.Options{Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := al.Close(); err != nil {
			t.Error(err)
		}
	})
	pol, err := policy.Parse([]byte(policyYAML), Ops())
	if err != nil {
		t.Fatal(err)
	}
	revoked, err := tokens.LoadRevoked(st, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	akm, err := apikeys.NewManager(st, h, pepperKey, apikeys.Options{Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{h: h, st: st, keys: km, clock: clk, auditPath: auditPath, dir: dir,
		envelope: envelope.New(km, h, envelope.Options{Decoy: hsm.KeyID{Name: credentialsKey, Version: 1}}),
		tokens:   tokens.NewService(tokens.Config{}, km, h, revoked, clk.now), apiKeys: akm}
	cfg := Config{HSM: testHSM{h}, Store: st, Keys: km, Envelope: ts.envelope, Audit: al, AuditReader: al, Policy: pol, Tokens: ts.tokens,
		APIKeys: akm, Now: clk.now, Version: "test",
		Schedule: schedule.New(schedule.Config{Store: st, Now: clk.now,
			Sources: []schedule.Source{schedule.KeySource(km, &schedule.Rules{}, ReservedPrefix)}})}
	for _, o := range opts {
		o(t, ts, &cfg)
	}
	ts.s, _ = New(cfg)
	return ts
}

// withAdmin is a policy of roles and their bindings, beside the role
// admin: everything, granted to uid 1000 (the tests' admin).
func withAdmin(roles, bindings string) string {
	return "version: 1\nroles:\n  admin:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\n" + roles +
		"bindings:\n  - role: admin\n    callers: [{uid: 1000}]\n" + bindings
}

// testHSM is the HSM as the server sees it (as daemon's hsmStatus).
type testHSM struct{ *hsm.HSM }

func (h testHSM) Token() TokenInfo {
	t := h.HSM.Token()
	return TokenInfo{Label: t.Label, Serial: t.Serial, Manufacturer: t.Manufacturer, Model: t.Model}
}

// call runs method ("Service/Method" of keyward.v1) as the caller uid
// would over the socket: through the method's generated handler and the
// server's interceptor (policy, audit, status codes), with the caller's
// identity where the transport puts it. Budgets are the transport's and
// are not exercised here.
func (ts *testServer) call(t *testing.T, uid uint32, method string, req proto.Message) (any, error) {
	t.Helper()
	svc, name, _ := strings.Cut(method, "/")
	for _, sd := range services {
		if sd.ServiceName != "keyward.v1."+svc {
			continue
		}
		for _, md := range sd.Methods {
			if md.MethodName != name {
				continue
			}
			ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: AuthInfo{Caller: &identity.Caller{UID: uid, GID: uid}}})
			dec := func(m any) error { proto.Merge(m.(proto.Message), req); return nil }
			return md.Handler(ts.s, ctx, dec, ts.s.intercept)
		}
	}
	t.Fatalf("no method %s in keyward.v1", method)
	return nil, nil
}

// records is every call record in the audit log.
func (ts *testServer) records(t *testing.T) []audit.Record {
	t.Helper()
	f, err := os.Open(ts.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []audit.Record
	if err := audit.Records(f, func(r audit.Record) error { out = append(out, r); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// wantAudit is what a call's audit record must say: its operation and
// outcome ("ok", "denied", "error") exactly (op empty: the method's), the key (a key's name, an API
// key's owner, a credential's name) exactly, and detail as a substring
// (empty: any).
type wantAudit struct {
	op, outcome, key, detail string
}

// check runs method as uid and asserts its status (code, and msg as a
// substring of its message) and the one audit record it left. It returns
// the answer, nil unless the call succeeded.
func (ts *testServer) check(t *testing.T, uid uint32, method string, req proto.Message, code codes.Code, msg string, want wantAudit) (any, audit.Record) {
	t.Helper()
	if want.op == "" {
		want.op = strings.Replace(method, "/", ".", 1)
	}
	before := len(ts.records(t))
	resp, err := ts.call(t, uid, method, req)
	st := status.Convert(err)
	if st.Code() != code || !strings.Contains(st.Message(), msg) {
		t.Errorf("%s: got %v %q; want %v with %q", method, st.Code(), st.Message(), code, msg)
	}
	if code != codes.OK && msg == "" {
		t.Errorf("%s: a refusal's case must say what its message holds", method)
	}
	recs := ts.records(t)
	if len(recs) != before+1 {
		t.Fatalf("%s left %d audit records; want 1", method, len(recs)-before)
	}
	rec := recs[len(recs)-1]
	if rec.Op != want.op || rec.Outcome != want.outcome || rec.Key != want.key || !strings.Contains(rec.Detail, want.detail) {
		t.Errorf("%s: audit record %s %s key %q detail %q; want %s %s key %q detail with %q",
			method, rec.Op, rec.Outcome, rec.Key, rec.Detail, want.op, want.outcome, want.key, want.detail)
	}
	if rec.Caller.UID != uid {
		t.Errorf("%s: audited for uid %d; want %d", method, rec.Caller.UID, uid)
	}
	if want.outcome != "ok" && rec.Code != code.String() {
		t.Errorf("%s: audited with code %q; want %q", method, rec.Code, code)
	}
	if code != codes.OK {
		resp = nil
	}
	return resp, rec
}

// serviceCase is a row of a service's table: who calls what, and what
// they must get and leave on record.
type serviceCase struct {
	name   string
	uid    uint32
	method string
	req    proto.Message
	code   codes.Code
	msg    string    // a substring of the status message
	audit  wantAudit // the call's audit record
	// after, if set, checks the answer of a call that succeeded, and
	// anything else the call must have done.
	after func(t *testing.T, ts *testServer, resp any, rec audit.Record)
}

// run runs the cases in order on ts, each as a subtest.
func run(t *testing.T, ts *testServer, cases []serviceCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, rec := ts.check(t, tc.uid, tc.method, tc.req, tc.code, tc.msg, tc.audit)
			if tc.after != nil && !t.Failed() {
				tc.after(t, ts, resp, rec)
			}
		})
	}
}
