package daemon_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *testClock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// TestScheduledRotation: keywardd's scheduler on an injected clock. A key
// under the high-risk rule rotates 30 days on, audited with its policy; a
// prod API key under a forced rule gets its deadline and stops working a
// day later; the plan says so; after 200 days down, the overdue key rotates
// once.
func TestScheduledRotation(t *testing.T) {
	clk := &testClock{t: time.Now()}
	zero := time.Duration(0)
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Rotation = schedule.Rules{CheckEvery: 20 * time.Millisecond, Jitter: &zero,
			Keys:    []schedule.KeyRule{{Match: "pay-*", Policy: "high"}},
			APIKeys: []schedule.APIKeyRule{{Environment: "prod", Policy: "high", Action: schedule.Force}}}
	}))

	in.Now = clk.now
	in.Stop()
	in.Restart()
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	rc := keywardv1.NewRotationServiceClient(in.Conn)
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "pay-eu", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	created, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "payments", Name: "charge", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	plan := func() map[string]*keywardv1.ScheduledRotation {
		t.Helper()
		r, err := rc.GetRotationPlan(ctx, &keywardv1.GetRotationPlanRequest{})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]*keywardv1.ScheduledRotation{}
		for _, x := range r.GetRotations() {
			out[x.GetId()] = x
		}
		return out
	}
	versions := func() int {
		k, err := kc.GetKey(ctx, &keywardv1.GetKeyRequest{Name: "pay-eu"})
		if err != nil {
			t.Fatal(err)
		}
		return len(k.GetKey().GetVersions())
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("waited 10s for %s", what)
			}
		}
	}
	// API keys are looked at every ten checks: the new one shows up then.
	waitFor("the API key in the plan", func() bool { return len(plan()) == 2 })
	p := plan()
	if len(p) != 2 || p["pay-eu"].GetPolicy() != "high" || p[created.Key.Id].GetAction() != "force" || p["pay-eu"].GetOverdue() {
		t.Fatalf("plan: %v", p)
	}

	clk.add(30*24*time.Hour + time.Minute)
	waitFor("the 30-day rotation", func() bool { return versions() == 2 })
	waitFor("the forced API key's plan entry", func() bool { return plan()[created.Key.Id].GetLastRunTime() != nil })
	verifyCode(t, ac, created.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID) // within its overlap
	p = plan()
	if p["pay-eu"].GetOverdue() || p["pay-eu"].GetDueTime().AsTime().Before(clk.now().Add(29*24*time.Hour)) || !p[created.Key.Id].GetOverdue() {
		t.Fatalf("plan after 30 days: %v", p)
	}
	clk.add(25 * time.Hour)
	verifyCode(t, ac, created.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED)

	log, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	for _, want := range []string{`"op":"keywardd.RotateKey","key":"pay-eu"`, `"op":"keywardd.ForceAPIKeyRotation","key":"` + created.Key.Id} {
		if !strings.Contains(string(log), want) {
			t.Errorf("the audit log has no %s", want)
		}
	}
	if !strings.Contains(string(log), "rotation policy high") {
		t.Error("the audit records do not say which policy")
	}

	// 200 days down: one rotation, not six.
	in.Stop()
	clk.add(200 * 24 * time.Hour)
	in.Restart()
	kc = keywardv1.NewKeyServiceClient(in.Conn)
	waitFor("the overdue rotation", func() bool { return versions() == 3 })
	time.Sleep(200 * time.Millisecond) // ten more checks
	if n := versions(); n != 3 {
		t.Fatalf("%d versions after 200 days down; an overdue rotation runs once", n)
	}
}

// TestRotationPlanScope: the plan shows a caller what its key globs reach,
// as the other services do: API keys by owner, keys by name.
func TestRotationPlanScope(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy("      - operations: [APIKeyService.CreateAPIKey, KeyService.CreateKey]\n        keys: [\"*\"]\n      - operations: [RotationService.GetRotationPlan]\n        keys: [payments, \"pay-*\"]")), daemontest.Configure(func(c *daemon.Config) {
		c.Rotation = schedule.Rules{CheckEvery: 10 * time.Millisecond, Keys: []schedule.KeyRule{{Match: "*", Policy: "high"}},
			APIKeys: []schedule.APIKeyRule{{Policy: "moderate"}}}
	}))

	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	for _, n := range []string{"pay-eu", "orders"} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: n, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
			t.Fatal(err)
		}
	}
	ids := map[string]string{}
	for _, owner := range []string{"payments", "shop"} {
		k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: owner, Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		ids[k.Key.Id] = owner
	}
	rc := keywardv1.NewRotationServiceClient(in.Conn)
	var got []string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		r, err := rc.GetRotationPlan(ctx, &keywardv1.GetRotationPlanRequest{})
		if err != nil {
			t.Fatal(err)
		}
		got = nil
		for _, x := range r.GetRotations() {
			if x.GetKind() == "api_key" {
				got = append(got, ids[x.GetId()])
			} else {
				got = append(got, x.GetId())
			}
		}
		if len(got) >= 2 {
			break
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, []string{"pay-eu", "payments"}) {
		t.Fatalf("the plan shows %v; want the key pay-eu and the payments team's API key only", got)
	}
}
