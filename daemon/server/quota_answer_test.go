package server

import (
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/gateway"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
)

// TestQuotaOnRefusalBeforeQuota: a verdict refused before the
// quota is looked at (here WRONG_ENVIRONMENT, likewise FORBIDDEN,
// IP_NOT_ALLOWED, EXPIRED...) still carries the key's quota and
// quota_refill_time, and gateway.AnswerOf puts them in RateLimit-* of
// that 403. Two hours after an hourly quota of 5 was spent, it holds 5
// again and is next refilled in the future; the answer must not say
// quota.remaining 0, a quota_refill_time in the past and
// "RateLimit-Remaining: 0, RateLimit-Reset: 0" (apikeys.Check returns
// before q.refill(now) for these codes; the fleet path refills the
// answer's copy, the single-host path does not).
func TestQuotaOnRefusalBeforeQuota(t *testing.T) {
	ts := newTestServer(t, apiKeysPolicy)
	secret := issueQuota(t, ts, "hourly", &apikeys.Quota{Remaining: 1, Refill: 5, RefillEvery: time.Hour})
	verify := func(env string) *keywardv1.VerifyAPIKeyResponse {
		t.Helper()
		resp, err := ts.call(t, 4000, "APIKeyService/VerifyAPIKey", &keywardv1.VerifyAPIKeyRequest{Key: secret, Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		return resp.(*keywardv1.VerifyAPIKeyResponse)
	}
	if r := verify("live"); r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Fatalf("the quota's one use: %v", r.GetCode())
	}
	ts.clock.mu.Lock()
	ts.clock.t = ts.clock.t.Add(2*time.Hour + 10*time.Minute)
	ts.clock.mu.Unlock()
	now := ts.clock.now()
	r := verify("staging")
	if r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT {
		t.Fatalf("code %v, want WRONG_ENVIRONMENT", r.GetCode())
	}
	if got := r.GetQuotaRefillTime().AsTime(); !got.After(now) {
		t.Errorf("quota_refill_time %v is not after now %v", got, now)
	}
	if got := r.GetQuota().GetRemaining(); got != 5 {
		t.Errorf("quota.remaining %d two hours after the last use, want 5 (refilled)", got)
	}
	a := gateway.AnswerOf(r, now)
	if a.Header.Get("RateLimit-Remaining") == "0" || a.Header.Get("RateLimit-Reset") == "0" {
		t.Errorf("the 403 says RateLimit-Remaining %q, RateLimit-Reset %q for a quota refilled to 5",
			a.Header.Get("RateLimit-Remaining"), a.Header.Get("RateLimit-Reset"))
	}
	// The next request in the right environment passes: the headers lied.
	if r := verify("live"); r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Errorf("after the refill: %v, want VALID", r.GetCode())
	}
}
