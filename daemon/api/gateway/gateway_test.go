package gateway

import (
	"encoding/json"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestAnswerOf: each verdict's status, and the headers and body of the
// tightest layer.
func TestAnswerOf(t *testing.T) {
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	layer := func(burst, remaining uint32, reset time.Duration, refused bool) *keywardv1.RateLimitState {
		return &keywardv1.RateLimitState{Limit: &keywardv1.RateLimit{Limit: burst, Per: durationpb.New(time.Hour), Burst: burst},
			Remaining: remaining, ResetTime: timestamppb.New(now.Add(reset)), Refused: refused}
	}
	for code, want := range map[keywardv1.APIKeyCode]int{
		keywardv1.APIKeyCode_API_KEY_CODE_VALID: 0, keywardv1.APIKeyCode_API_KEY_CODE_MALFORMED: 401, keywardv1.APIKeyCode_API_KEY_CODE_NOT_FOUND: 401,
		keywardv1.APIKeyCode_API_KEY_CODE_REVOKED: 401, keywardv1.APIKeyCode_API_KEY_CODE_DISABLED: 401, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED: 401,
		keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT: 403, keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED: 403, keywardv1.APIKeyCode_API_KEY_CODE_FORBIDDEN: 403,
		keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED: 429, keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED: 429,
		keywardv1.APIKeyCode_API_KEY_CODE_UNSPECIFIED: 401,
	} {
		if a := AnswerOf(&keywardv1.VerifyAPIKeyResponse{Code: code}, now); a.Status != want {
			t.Errorf("%v: %d; want %d", code, a.Status, want)
		}
	}
	// Three layers: the refused one is the tightest, whatever the others
	// have left; its numbers go in the headers and the body.
	a := AnswerOf(&keywardv1.VerifyAPIKeyResponse{Code: keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED, NearLimit: true,
		RateLimits: []*keywardv1.RateLimitState{layer(10, 0, time.Minute, false), layer(1000, 5, 90*time.Minute, true), layer(50, 40, time.Second, false)},
		RetryAfter: durationpb.New(2500 * time.Millisecond)}, now)
	h := a.Header
	if h.Get("RateLimit-Limit") != "1000" || h.Get("RateLimit-Remaining") != "5" || h.Get("RateLimit-Reset") != "5400" ||
		h.Get("Retry-After") != "3" || h.Get(HeaderNearLimit) != "true" || h.Get("Content-Type") != "application/json" {
		t.Errorf("headers %v", h)
	}
	var body map[string]any
	if err := json.Unmarshal(a.Body, &body); err != nil || body["error"] != "rate limit exceeded" || body["current_usage"] != 995.0 ||
		body["limit"] != 1000.0 || body["reset_time"] != "2026-12-05T11:30:00Z" || body["retry_after"] != 3.0 {
		t.Errorf("body %s (%v)", a.Body, err)
	}
	// Without a refused layer, the one with the fewest left.
	a = AnswerOf(&keywardv1.VerifyAPIKeyResponse{Code: keywardv1.APIKeyCode_API_KEY_CODE_VALID,
		RateLimits: []*keywardv1.RateLimitState{layer(10, 7, time.Minute, false), layer(50, 3, time.Second, false)}}, now)
	if a.Status != 0 || a.Header.Get("RateLimit-Limit") != "50" || a.Header.Get("RateLimit-Remaining") != "3" || a.Body != nil {
		t.Errorf("valid: %d %v %s", a.Status, a.Header, a.Body)
	}
	if a := AnswerOf(&keywardv1.VerifyAPIKeyResponse{Code: keywardv1.APIKeyCode_API_KEY_CODE_REVOKED}, now); a.Header.Get("WWW-Authenticate") == "" || a.Header.Get("RateLimit-Limit") != "" {
		t.Errorf("revoked, no layers: %v", a.Header)
	}
}
