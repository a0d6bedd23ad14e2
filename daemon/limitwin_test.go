package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestLimitWindows: a raise of an owner's limits in one environment,
// scheduled in advance with a dry run first, applies to verifications from
// its start, across a restart, and ends on time by itself; a key's own cut
// wins over it while it lasts; each start and end is audited; a caller
// granted on one owner may not raise another's or an environment's.
func TestLimitWindows(t *testing.T) {
	clk := &jumpClock{}
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(`      - operations: ["*"]
        keys: ["shop"]`)))
	in.Stop()
	in.Now = clk.now
	in.Restart()
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	// Two a day, in bursts of two: nothing refills within the test.
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "checkout", Environment: "prod", Permissions: []string{"orders:write"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 2, Per: durationpb.New(24 * time.Hour), Burst: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func() *keywardv1.VerifyAPIKeyResponse {
		t.Helper()
		v, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod"})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	limit := func(v *keywardv1.VerifyAPIKeyResponse) uint32 {
		t.Helper()
		if len(v.RateLimits) != 1 {
			t.Fatalf("rate-limit states: %v", v.RateLimits)
		}
		return v.RateLimits[0].GetLimit().GetLimit()
	}

	now := time.Now()
	start, end := now.Add(time.Hour), now.Add(2*time.Hour)
	req := &keywardv1.ScheduleLimitsRequest{Owner: "shop", Environment: "prod", Factor: 3, StartTime: timestamppb.New(start), EndTime: timestamppb.New(end),
		Reason: "Black Friday", DryRun: true}
	dry, err := ac.ScheduleLimits(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if dry.Keys != 1 || len(dry.Changes) != 1 || dry.Changes[0].KeyId != k.Key.Id ||
		dry.Changes[0].During[0].Limit != 6 || dry.Changes[0].During[0].Burst != 6 || dry.Changes[0].Before[0].Limit != 2 {
		t.Fatalf("dry run: %v", dry)
	}
	if l, err := ac.ListLimitWindows(ctx, &keywardv1.ListLimitWindowsRequest{IncludeEnded: true}); err != nil || len(l.Windows) != 0 {
		t.Fatalf("a dry run wrote a window: %v, %v", l, err)
	}

	// Denied: another owner's keys, and every owner's in an environment.
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "blog", Factor: 3, EndTime: timestamppb.New(end), Reason: "x"})
	wantCode(t, err, codes.PermissionDenied, "ScheduleLimits")
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Environment: "prod", Factor: 3, EndTime: timestamppb.New(end), Reason: "x"})
	wantCode(t, err, codes.PermissionDenied, "ScheduleLimits")
	// Bad input, said so.
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "shop", Factor: 3, EndTime: timestamppb.New(end)})
	wantCode(t, err, codes.InvalidArgument, "say why")

	req.DryRun = false
	sched, err := ac.ScheduleLimits(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	win := sched.Window
	if win.State != keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_PENDING || win.CreatedBy == "" {
		t.Fatalf("scheduled: %v", win)
	}
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "shop", Environment: "prod", Factor: 2, StartTime: timestamppb.New(end.Add(-time.Minute)),
		EndTime: timestamppb.New(end.Add(time.Hour)), Reason: "overlapping"})
	wantCode(t, err, codes.FailedPrecondition, win.Id)

	// Before: two, then refused.
	for range 2 {
		if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_VALID || limit(v) != 2 {
			t.Fatalf("before the window: %v, limit %d", v.Code, limit(v))
		}
	}
	if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED {
		t.Fatalf("before the window, a third: %v", v.Code)
	}

	// During: three times as many, and what the key's show says.
	clk.set(time.Hour)
	for i := range 3 {
		if v := verify(); v.Code != keywardv1.APIKeyCode_API_KEY_CODE_VALID || limit(v) != 6 {
			t.Fatalf("in the window, request %d: %v, limit %d", i, v.Code, limit(v))
		}
	}
	l, err := ac.ListLimitWindows(ctx, &keywardv1.ListLimitWindowsRequest{KeyId: k.Key.Id})
	if err != nil || l.FactorNow != 3 || l.ActiveWindow != win.Id || len(l.Windows) != 1 || l.LimitsNow[0].Limit != 6 ||
		l.Windows[0].State != keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_ACTIVE {
		t.Fatalf("the key's windows in the window: %v, %v", l, err)
	}
	waitAudited(t, in, "keywardd.LimitWindowStarted", win.Id)

	// A restart in the middle changes nothing.
	in.Restart()
	ac = keywardv1.NewAPIKeyServiceClient(in.Conn)
	if v := verify(); limit(v) != 6 {
		t.Fatalf("after a restart in the window: limit %d, want 6", limit(v))
	}

	// The key's own cut wins over its owner's raise while it lasts;
	// cancelled, the raise is back.
	cut, err := ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{KeyId: k.Key.Id, Factor: 0.5, EndTime: timestamppb.New(clk.now().Add(10 * time.Minute)),
		Reason: "retry storm"})
	if err != nil {
		t.Fatal(err)
	}
	if v := verify(); limit(v) != 1 {
		t.Fatalf("with the key's cut: limit %d, want 1", limit(v))
	}
	if _, err := ac.CancelLimitWindow(ctx, &keywardv1.CancelLimitWindowRequest{Id: cut.Window.Id}); err != nil {
		t.Fatal(err)
	}
	if v := verify(); limit(v) != 6 {
		t.Fatalf("the cut cancelled: limit %d, want 6", limit(v))
	}

	// After: as before, by itself, with keywardd restarted past the end.
	in.Stop()
	clk.set(2*time.Hour + time.Second)
	in.Restart()
	ac = keywardv1.NewAPIKeyServiceClient(in.Conn)
	if v := verify(); limit(v) != 2 {
		t.Fatalf("after the window: limit %d, want 2", limit(v))
	}
	waitAudited(t, in, "keywardd.LimitWindowEnded", win.Id)
	l, err = ac.ListLimitWindows(ctx, &keywardv1.ListLimitWindowsRequest{IncludeEnded: true})
	if err != nil || len(l.Windows) != 2 {
		t.Fatalf("the plan with those over: %v, %v", l, err)
	}
	for _, w := range l.Windows {
		want := keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_ENDED
		if w.Id == cut.Window.Id {
			want = keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_CANCELLED
		}
		if w.State != want {
			t.Errorf("%s: %v, want %v", w.Id, w.State, want)
		}
	}
	in.Stop()
	if rep := verifyAudit(t, in); rep.BadLine != 0 {
		t.Fatalf("audit: %+v", rep)
	}
}

// waitAudited waits for the running keywardd's audit record of op on a
// window, reading its log file.
func waitAudited(t *testing.T, in *daemontest.Daemon, op, id string) {
	t.Helper()
	poll(t, 50*time.Millisecond, func() bool {
		b, err := os.ReadFile(auditFile(in))
		if err != nil {
			t.Fatal(err)
		}
		for ln := range bytes.Lines(b) {
			var l struct {
				Body audit.Record `json:"body"`
			}
			if json.Unmarshal(ln, &l) == nil && l.Body.Op == op && l.Body.Key == id && strings.Contains(l.Body.Detail, "Black Friday") {
				return true
			}
		}
		return false
	})
}

// TestLimitWindowRights: a raise widens keys' limits, so it takes what
// UpdateAPIKey's raise takes (CreateAPIKey on the owner) besides
// ScheduleLimits, and a cut does not; an owner's raise does not undo an
// operator's cut of the environment; a window without a target is refused
// as such, before the policy is asked.
func TestLimitWindowRights(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "checkout", Environment: "prod", Permissions: []string{"orders:write"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 2, Per: durationpb.New(24 * time.Hour), Burst: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	end := timestamppb.New(time.Now().Add(24 * time.Hour))
	if _, err := ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Environment: "prod", Factor: 0.5, EndTime: end, Reason: "incident"}); err != nil {
		t.Fatal(err)
	}
	in.SetPolicy(uidPolicy(`      - operations: ["APIKeyService.UpdateAPIKey", "APIKeyService.ScheduleLimits", "APIKeyService.ListLimitWindows", "APIKeyService.VerifyAPIKey"]
        keys: ["shop"]`))
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "shop", Factor: 100, EndTime: end, Reason: "mine"})
	wantCode(t, err, codes.PermissionDenied, "APIKeyService.CreateAPIKey")
	_, err = ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Factor: 2, EndTime: end, Reason: "sale"})
	wantCode(t, err, codes.InvalidArgument, "say what the window covers")
	if _, err := ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{KeyId: k.Key.Id, Factor: 0.25, EndTime: end, Reason: "retry storm"}); err != nil {
		t.Fatalf("a cut by a caller granted ScheduleLimits alone: %v", err)
	}
	in.SetPolicy(uidPolicy(allowAll))
	if _, err := ac.CancelLimitWindow(ctx, &keywardv1.CancelLimitWindowRequest{Id: mustWindow(t, ac, k.Key.Id, 0.25)}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{KeyId: k.Key.Id, Factor: 100, EndTime: end, Reason: "mine"}); err != nil {
		t.Fatal(err)
	}
	l, err := ac.ListLimitWindows(ctx, &keywardv1.ListLimitWindowsRequest{KeyId: k.Key.Id})
	if err != nil || l.FactorNow != 0.5 {
		t.Fatalf("the key's raise over the environment's cut: factor now %v, %v; want the cut, 0.5", l.GetFactorNow(), err)
	}
}

// mustWindow is the ID of the window covering key with factor f.
func mustWindow(t *testing.T, ac keywardv1.APIKeyServiceClient, key string, f float64) string {
	t.Helper()
	l, err := ac.ListLimitWindows(context.Background(), &keywardv1.ListLimitWindowsRequest{KeyId: key})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range l.Windows {
		if w.Factor == f {
			return w.Id
		}
	}
	t.Fatalf("no window ×%v covers %s: %v", f, key, l.Windows)
	return ""
}
