package daemon_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/anomaly"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/dynlimits"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestAnomalyDisablesKey: a synthetic spike through keywardd's socket. A
// key used once, then (two hours on, past its learning time) twelve times
// in a minute (the tenth reaches min_rate) is disabled by keywardd at once:
// the tenth use itself is refused, and those after it; the audit log says
// why; a verify from a new network only alerts.
func TestAnomalyDisablesKey(t *testing.T) {
	clk := &testClock{t: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Anomaly = anomaly.Config{Enabled: true, Window: time.Minute, Factor: 8, MinRate: 10, Learn: time.Hour,
			NewNetworks: true, Disable: []string{anomaly.Spike}, FlushEvery: 50 * time.Millisecond}
	}))

	in.Now = clk.now
	in.Stop()
	in.Restart()
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	mk := func(name string) *keywardv1.CreateAPIKeyResponse {
		k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: name, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	spiked, calm := mk("spiked"), mk("calm")
	req := func(ip string) *keywardv1.VerifyAPIKeyRequest {
		return &keywardv1.VerifyAPIKeyRequest{Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: ip}
	}
	verifyCode(t, ac, spiked.Secret, req("10.0.0.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	verifyCode(t, ac, calm.Secret, req("10.0.0.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	clk.add(2 * time.Hour)
	for i := range 12 {
		r, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: spiked.Secret, Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: "10.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		want := keywardv1.APIKeyCode_API_KEY_CODE_VALID
		if i >= 9 { // the tenth sets the spike off: refused, as are those after
			want = keywardv1.APIKeyCode_API_KEY_CODE_DISABLED
		}
		if r.Code != want || (i == 9 && !strings.Contains(r.Reason, "anomaly: spike")) {
			t.Fatalf("use %d of the spike: %v %q; want %v", i+1, r.Code, r.Reason, want)
		}
	}
	verifyCode(t, ac, calm.Secret, req("198.51.100.7"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: spiked.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		if r.Code == keywardv1.APIKeyCode_API_KEY_CODE_DISABLED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the spiked key still verifies: %v", r.Code)
		}
		time.Sleep(10 * time.Millisecond)
	}
	verifyCode(t, ac, calm.Secret, req("198.51.100.7"), keywardv1.APIKeyCode_API_KEY_CODE_VALID) // a new network only alerts
	var log string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
		if log = string(b); strings.Count(log, `"op":"keywardd.APIKeyAnomaly"`) == 2 {
			break
		}
	}
	var spike, network string
	for _, line := range strings.Split(log, "\n") {
		switch {
		case strings.Contains(line, `"keywardd.APIKeyAnomaly"`) && strings.Contains(line, spiked.Key.Id):
			spike = line
		case strings.Contains(line, `"keywardd.APIKeyAnomaly"`) && strings.Contains(line, calm.Key.Id):
			network = line
		}
	}
	if !strings.Contains(spike, "spike: 10.0 requests a minute") || !strings.Contains(spike, "keywardd disabled the key") {
		t.Errorf("the spike's audit record: %s", spike)
	}
	if !strings.Contains(network, "new_network") || !strings.Contains(network, "198.51.100.0/24") || !strings.Contains(network, "alert only") {
		t.Errorf("the new network's audit record: %s", network)
	}
	if strings.Contains(log, spiked.Secret) || strings.Contains(log, calm.Secret) {
		t.Error("a secret in the audit log")
	}
}

// TestAnomalyRevokesKey: anomaly.revoke names new_network: the use from
// a network the key was not used from before is refused as revoked, and
// keywardd revokes the key (for good: no enable brings it back).
func TestAnomalyRevokesKey(t *testing.T) {
	clk := &testClock{t: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Anomaly = anomaly.Config{Enabled: true, Window: time.Minute, Factor: 8, MinRate: 10, Learn: time.Hour,
			NewNetworks: true, Revoke: []string{anomaly.NewNetwork}, FlushEvery: 50 * time.Millisecond}
	}))
	in.Now = clk.now
	in.Stop()
	in.Restart()
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	req := func(ip string) *keywardv1.VerifyAPIKeyRequest {
		return &keywardv1.VerifyAPIKeyRequest{Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: ip}
	}
	verifyCode(t, ac, k.Secret, req("10.0.0.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	clk.add(2 * time.Hour)
	verifyCode(t, ac, k.Secret, req("10.0.0.2"), keywardv1.APIKeyCode_API_KEY_CODE_VALID) // the same /24
	r := req("198.51.100.7")
	r.Key = k.Secret
	got, err := ac.VerifyAPIKey(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if got.Code != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED || !strings.Contains(got.Reason, "anomaly: new_network") {
		t.Fatalf("the use from a new network: %v %q; want REVOKED for the anomaly", got.Code, got.Reason)
	}
	verifyCode(t, ac, k.Secret, req("10.0.0.1"), keywardv1.APIKeyCode_API_KEY_CODE_REVOKED) // from home too, at once
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		g, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: k.Key.Id})
		if err != nil {
			t.Fatal(err)
		}
		if g.Key.State == keywardv1.APIKeyState_API_KEY_STATE_REVOKED {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the key is %v, not revoked, 5 s after the anomaly", g.Key.State)
		}
	}
	// The record is written after the revocation: wait for it.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
		if strings.Contains(string(b), "keywardd revoked the key (anomaly.revoke names new_network)") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the audit log does not say keywardd revoked the key, 5 s after it did")
		}
	}
}

// TestDynamicLimitsTighten: when the HSM is slower than
// dynamic_limits.hsm_latency, keywardd halves API keys' rate limits: a key
// of 10 a minute gets 5, says so in its rate-limit state, and the log says
// why.
func TestDynamicLimitsTighten(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		// Every HSM operation is slower than a nanosecond: the first one
		// overloads keywardd.
		c.DynamicLimits = dynlimits.Config{Enabled: true, HSMLatency: time.Nanosecond, Tighten: 0.5, SampleEvery: 10 * time.Millisecond}
	}))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "o", Name: "n", Environment: "prod", Permissions: []string{"orders:read"},
		RateLimits: []*keywardv1.RateLimit{{Limit: 10, Per: durationpb.New(time.Minute), Burst: 10}}})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(in.Log.String(), "keywardd is overloaded"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("keywardd did not find itself overloaded")
		}
	}
	valid := 0
	for range 10 {
		r, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		if r.Code == keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			valid++
			if l := r.RateLimits[0].GetLimit(); l.GetLimit() != 5 || l.GetBurst() != 5 {
				t.Fatalf("the limit in force: %v, want 5 a minute", l)
			}
		} else if r.Code != keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED {
			t.Fatalf("verify: %v", r.Code)
		}
	}
	if valid != 5 {
		t.Fatalf("%d of 10 verifies passed under load, want 5", valid)
	}
}

// TestNoticesReachWebhook: panic-rotate of an encryption key and an
// anomaly reach the webhook plugin as key_version.retired and
// api_key.anomaly, with their detail.
func TestNoticesReachWebhook(t *testing.T) {
	kf := filepath.Join(t.TempDir(), "webhook-key")
	os.WriteFile(kf, []byte("0123456789abcdef0123456789abcdef-notices"), 0o600)
	var (
		mu     sync.Mutex
		bodies = map[string]map[string]string{} // type -> data
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m struct {
			Type string
			Data map[string]string
		}
		json.NewDecoder(r.Body).Decode(&m)
		mu.Lock()
		bodies[m.Type] = m.Data
		mu.Unlock()
	}))
	defer srv.Close()
	clk := &testClock{t: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.Plugins = []daemon.PluginConfig{pluginConfig(t, "webhook", "github.com/keyward/keyward/cmd/keyward-plugin-webhook",
			map[string]string{"KEYWARD_WEBHOOK_URL": srv.URL, "KEYWARD_WEBHOOK_KEY_FILE": kf, "KEYWARD_WEBHOOK_EVENTS": "key_version_retired,anomaly"})}
		c.Anomaly = anomaly.Config{Enabled: true, Window: time.Minute, MinRate: 10, Learn: time.Hour, Disable: []string{anomaly.Spike}}
	}))

	in.Now = clk.now
	in.Stop()
	in.Restart()
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	if _, err := keywardv1.NewRotationServiceClient(in.Conn).PanicRotate(ctx, &keywardv1.PanicRotateRequest{Name: "orders"}); err != nil {
		t.Fatal(err)
	}
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verifyCode(t, ac, k.Secret, nil, keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	clk.add(2 * time.Hour)
	for range 10 {
		ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: "prod", Permissions: []string{"orders:read"}})
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		mu.Lock()
		n := len(bodies)
		mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the webhook got %v; log:\n%s", bodies, in.Log.String())
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if d := bodies["key_version.retired"]; d["id"] != "orders/v1" || d["subject"] != "orders" || !strings.Contains(d["detail"], "no longer encrypts") {
		t.Errorf("key_version.retired: %v", d)
	}
	if d := bodies["api_key.anomaly"]; d["id"] != k.Key.Id || d["subject"] != "team-a" || !strings.HasPrefix(d["detail"], "spike: ") || !strings.Contains(d["detail"], "keywardd disabled the key") {
		t.Errorf("api_key.anomaly: %v", d)
	}
}
