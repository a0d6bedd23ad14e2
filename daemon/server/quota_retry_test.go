package server

import (
	"testing"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
)

// TestVerifyQuotaRetryAfter: a verdict of USAGE_EXCEEDED for a quota that
// refills says when, in retry_after (the time until its next refill), as
// RATE_LIMITED does for a rate limit, so that every gateway's Retry-After
// and reset_time are exact (gateway.AnswerOf otherwise says one refill
// period, the latest). A quota that never refills has none.
// It fails until VerifyAPIKey (daemon/server/apikeys.go, outside the
// gateway reviewer's files) sets retry_after for USAGE_EXCEEDED.
func TestVerifyQuotaRetryAfter(t *testing.T) {
	ts := newTestServer(t, apiKeysPolicy)
	create := func(name string, q *apikeys.Quota) string { return issueQuota(t, ts, name, q) }
	verify := func(secret string) *keywardv1.VerifyAPIKeyResponse {
		t.Helper()
		resp, err := ts.call(t, 4000, "APIKeyService/VerifyAPIKey", &keywardv1.VerifyAPIKeyRequest{Key: secret, Environment: "live"})
		if err != nil {
			t.Fatal(err)
		}
		return resp.(*keywardv1.VerifyAPIKeyResponse)
	}
	hourly := create("hourly", &apikeys.Quota{Remaining: 1, Refill: 1, RefillEvery: time.Hour})
	r0 := verify(hourly)
	if r0.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Fatalf("the quota's one use: %v", r0.GetCode())
	}
	if got, want := r0.GetQuotaRefillTime().AsTime(), ts.clock.now().Add(time.Hour); !got.Equal(want) {
		t.Errorf("quota_refill_time on the VALID answer: %v, want %v (an hour after its first use)", got, want)
	}
	ts.clock.mu.Lock()
	ts.clock.t = ts.clock.t.Add(20 * time.Minute)
	ts.clock.mu.Unlock()
	r := verify(hourly)
	if r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED || r.GetRetryAfter().AsDuration() != 40*time.Minute {
		t.Errorf("20 minutes after an hourly quota was spent: %v, retry_after %v; want USAGE_EXCEEDED and 40m", r.GetCode(), r.GetRetryAfter().AsDuration())
	}
	once := create("once", &apikeys.Quota{Remaining: 0})
	if r := verify(once); r.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED || r.GetRetryAfter() != nil {
		t.Errorf("a spent quota that never refills: %v, retry_after %v; want USAGE_EXCEEDED and none", r.GetCode(), r.GetRetryAfter())
	}
}
