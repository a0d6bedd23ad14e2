package server

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
)

// reader may ping and nothing more.
var statusPolicy = withAdmin(`  reader:
    permissions:
      - operations: [StatusService.Ping]
        keys: ["*"]
`, `  - role: reader
    callers: [{uid: 2000}]
`)

func TestStatusService(t *testing.T) {
	since := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	ts := newTestServer(t, statusPolicy, func(_ *testing.T, _ *testServer, cfg *Config) {
		cfg.Plugins = func() []PluginState {
			return []PluginState{{Name: "file", Version: "1.0", State: "running", PID: 42, Since: since, EventsPending: 3}}
		}
		cfg.NamesToRename = func() map[string]int { return map[string]int{"key": 2} }
	})
	mustCreate(t, ts, keys.Spec{Name: "app-on", Purpose: keys.Encrypt}, keys.Spec{Name: "app-off", Purpose: keys.Encrypt})
	if _, err := ts.keys.SetEnabled("app-off", false); err != nil {
		t.Fatal(err)
	}
	run(t, ts, []serviceCase{
		{name: "status", uid: admin, method: "StatusService/GetStatus",
			req: &keywardv1.GetStatusRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				r := resp.(*keywardv1.GetStatusResponse)
				tok := ts.h.Token()
				if r.GetVersion() != "test" || r.GetHsm().GetTokenLabel() != tok.Label || r.GetHsm().GetTokenSerial() != tok.Serial || !r.GetHsm().GetHealthy() {
					t.Errorf("HSM %+v, version %q; want token %s %s, healthy, test", r.GetHsm(), r.GetVersion(), tok.Label, tok.Serial)
				}
				if r.GetStore().GetPath() != ts.st.Path() || r.GetStore().GetSchemaVersion() == 0 {
					t.Errorf("store %+v; want %s and its schema", r.GetStore(), ts.st.Path())
				}
				// keywardd's own three and the test's two.
				if k := r.GetKeys(); k.GetTotal() != 5 || k.GetEnabled() != 4 || k.GetDisabled() != 1 || k.GetPendingDeletion() != 0 {
					t.Errorf("key counts %+v; want 5: 4 enabled, 1 disabled", k)
				}
				if p := r.GetPlugins(); len(p) != 1 || p[0].GetName() != "file" || p[0].GetPid() != 42 || p[0].GetEventsPending() != 3 || !p[0].GetSince().AsTime().Equal(since) {
					t.Errorf("plugins %+v", p)
				}
				if n := r.GetNamesToRename(); n["key"] != 2 || len(n) != 1 {
					t.Errorf("names to rename %v", n)
				}
			}},
		{name: "status denied", uid: reader, method: "StatusService/GetStatus",
			req: &keywardv1.GetStatusRequest{}, code: codes.PermissionDenied, msg: "not granted StatusService.GetStatus",
			audit: wantAudit{outcome: "denied"}},
		{name: "ping", uid: reader, method: "StatusService/Ping",
			req: &keywardv1.PingRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"}},
		{name: "ping denied", uid: stranger, method: "StatusService/Ping",
			req: &keywardv1.PingRequest{}, code: codes.PermissionDenied, msg: "not granted StatusService.Ping",
			audit: wantAudit{outcome: "denied"}},
	})
}
