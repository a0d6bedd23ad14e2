package server

import (
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/keys"
)

// reader sees the rotation plan of the app-* keys and may rotate none.
var rotationPolicy = withAdmin(`  reader:
    permissions:
      - operations: [RotationService.GetRotationPlan]
        keys: ["app-*"]
`, `  - role: reader
    callers: [{uid: 2000}]
`)

// planIs checks GetRotationPlan's answer: the IDs listed, in order, and
// the total before the limit.
func planIs(total uint32, ids ...string) func(*testing.T, *testServer, any, audit.Record) {
	return func(t *testing.T, _ *testServer, resp any, _ audit.Record) {
		t.Helper()
		r := resp.(*keywardv1.GetRotationPlanResponse)
		var got []string
		for _, e := range r.GetRotations() {
			got = append(got, e.GetId())
		}
		if r.GetTotal() != total || len(got) != len(ids) {
			t.Fatalf("plan %v of %d; want %v of %d", got, r.GetTotal(), ids, total)
		}
		for i := range ids {
			if got[i] != ids[i] {
				t.Errorf("plan %v; want %v", got, ids)
			}
		}
	}
}

func TestRotationService(t *testing.T) {
	var notified atomic.Int32
	ts := newTestServer(t, rotationPolicy, func(_ *testing.T, _ *testServer, cfg *Config) { cfg.Notify = func() { notified.Add(1) } })
	month := 30 * 24 * time.Hour
	mustCreate(t, ts, keys.Spec{Name: "app-orders", Purpose: keys.Encrypt, RotationPeriod: month},
		keys.Spec{Name: "ops-db", Purpose: keys.Encrypt, RotationPeriod: 2 * month}, keys.Spec{Name: "app-panic", Purpose: keys.Encrypt})
	run(t, ts, []serviceCase{
		{name: "plan", uid: admin, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"}, after: planIs(2, "app-orders", "ops-db")},
		{name: "plan: the keys the caller is granted", uid: reader, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{}, code: codes.OK, audit: wantAudit{outcome: "ok"}, after: planIs(1, "app-orders")},
		{name: "plan: a limit", uid: admin, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{Limit: 1}, code: codes.OK, audit: wantAudit{outcome: "ok"}, after: planIs(2, "app-orders")},
		{name: "plan: within", uid: admin, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{Within: durationpb.New(month + 2*time.Hour)}, code: codes.OK, audit: wantAudit{outcome: "ok"},
			after: planIs(1, "app-orders")},
		{name: "plan: a negative within", uid: admin, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{Within: durationpb.New(-time.Hour)}, code: codes.InvalidArgument,
			msg: "within must not be negative", audit: wantAudit{outcome: "error"}},
		{name: "plan: a limit too large", uid: admin, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{Limit: maxPlan + 1}, code: codes.InvalidArgument,
			msg: "a limit of at most 10000 (narrow it with within)", audit: wantAudit{outcome: "error"}},
		{name: "plan denied", uid: stranger, method: "RotationService/GetRotationPlan",
			req: &keywardv1.GetRotationPlanRequest{}, code: codes.PermissionDenied,
			msg: "not granted RotationService.GetRotationPlan", audit: wantAudit{outcome: "denied"}},
		{name: "panic rotation, a dry run", uid: admin, method: "RotationService/PanicRotate",
			req: &keywardv1.PanicRotateRequest{Name: "app-panic", DryRun: true}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-panic", detail: "dry run true: new version 2"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				if k, _ := ts.keys.Get("app-panic"); k.Latest() != 1 || notified.Load() != 0 || resp.(*keywardv1.PanicRotateResponse).GetEffectiveTime() != nil {
					t.Errorf("a dry run made version %d, notified the plugins %d times", k.Latest(), notified.Load())
				}
			}},
		{name: "panic rotation", uid: admin, method: "RotationService/PanicRotate",
			req: &keywardv1.PanicRotateRequest{Name: "app-panic"}, code: codes.OK,
			audit: wantAudit{outcome: "ok", key: "app-panic", detail: "dry run false: new version 2, retired versions [1]"},
			after: func(t *testing.T, ts *testServer, resp any, _ audit.Record) {
				r := resp.(*keywardv1.PanicRotateResponse)
				if k, _ := ts.keys.Get("app-panic"); k.Latest() != 2 || r.GetNewVersion() != 2 || r.GetPluginEvents() != 1 || notified.Load() != 1 {
					t.Errorf("version %d (answered %d), %d plugin events, notified %d times; want 2, 1, once", k.Latest(), r.GetNewVersion(), r.GetPluginEvents(), notified.Load())
				}
				if !r.GetEffectiveTime().AsTime().Equal(ts.clock.now()) {
					t.Errorf("effective at %v; want keywardd's clock, %v", r.GetEffectiveTime().AsTime(), ts.clock.now())
				}
			}},
		{name: "panic rotation of one of keywardd's own keys", uid: admin, method: "RotationService/PanicRotate",
			req: &keywardv1.PanicRotateRequest{Name: auditKey.Name}, code: codes.InvalidArgument, msg: "keywardd's own",
			audit: wantAudit{outcome: "error", key: auditKey.Name}},
		{name: "panic rotation of no key", uid: admin, method: "RotationService/PanicRotate",
			req: &keywardv1.PanicRotateRequest{Name: "app-none"}, code: codes.NotFound, msg: "app-none",
			audit: wantAudit{outcome: "error", key: "app-none"}},
		{name: "panic rotation denied", uid: reader, method: "RotationService/PanicRotate",
			req: &keywardv1.PanicRotateRequest{Name: "app-orders"}, code: codes.PermissionDenied,
			msg: `not granted RotationService.PanicRotate on key "app-orders"`, audit: wantAudit{outcome: "denied", key: "app-orders"}},
	})
}

// TestRotationPlanOff: a keywardd with no schedule says so.
func TestRotationPlanOff(t *testing.T) {
	ts := newTestServer(t, rotationPolicy, func(_ *testing.T, _ *testServer, cfg *Config) { cfg.Schedule = nil })
	run(t, ts, []serviceCase{{name: "plan", uid: admin, method: "RotationService/GetRotationPlan",
		req: &keywardv1.GetRotationPlanRequest{}, code: codes.Unavailable, msg: "no rotation schedule in this keywardd",
		audit: wantAudit{outcome: "error"}}})
}
