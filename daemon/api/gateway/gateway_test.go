package gateway

import (
	"encoding/json"
	"maps"
	"net/http"
	"strings"
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

// TestKey: the key a request presents, in Authorization or another header.
func TestKey(t *testing.T) {
	for _, tc := range []struct{ name, header, value, want string }{
		{"bearer", "Authorization", "Bearer kw_abc", "kw_abc"},
		{"bearer, any case", "authorization", "bEARER  kw_abc ", "kw_abc"},
		{"basic is no key", "Authorization", "Basic a2V5Og==", ""},
		{"a bare key in Authorization is none", "Authorization", "kw_abc", ""},
		{"none", "Authorization", "", ""},
		{"X-API-Key", "X-API-Key", "kw_abc", "kw_abc"},
		{"joined by a proxy", "X-API-Key", "kw_abc,kw_def", ""},
		{"bearer joined", "Authorization", "Bearer kw_abc,Bearer kw_def", ""},
	} {
		h := http.Header{}
		h.Set(tc.header, tc.value)
		if got := Key(h, tc.header); got != tc.want {
			t.Errorf("%s: Key = %q, want %q", tc.name, got, tc.want)
		}
	}
	// Sent twice: which is the client's key is ambiguous.
	if got := Key(http.Header{"X-Api-Key": {"kw_abc", "kw_def"}}, "X-API-Key"); got != "" {
		t.Errorf("two X-API-Key headers: Key = %q, want none", got)
	}
}

// FuzzKey: whatever a client sends in Authorization, the key is empty or a
// trimmed part of it after "Bearer ".
func FuzzKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, value string) {
		h := http.Header{"Authorization": {value}}
		got := Key(h, "Authorization")
		if got == "" {
			return
		}
		if got != strings.TrimSpace(got) || !strings.HasSuffix(strings.TrimSpace(value), got) || !strings.EqualFold(value[:7], "bearer ") {
			t.Fatalf("Key(%q) = %q", value, got)
		}
	})
}

// TestAnswerOfQuota: a key over its quota is told, like one over its rate
// limit, its usage, the limit, when the quota is refilled and how long to
// wait (keywardd's retry_after, or at most one refill period); a quota
// that never refills says so, with no Retry-After.
func TestAnswerOfQuota(t *testing.T) {
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	exceeded := keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED
	for _, tc := range []struct {
		name   string
		resp   *keywardv1.VerifyAPIKeyResponse
		header map[string]string // "" for absent
		body   map[string]any
	}{
		{name: "refills, keywardd says when",
			resp: &keywardv1.VerifyAPIKeyResponse{Code: exceeded, Quota: &keywardv1.Quota{Remaining: 0, Refill: 1000, RefillEvery: durationpb.New(24 * time.Hour)},
				RetryAfter: durationpb.New(3599500 * time.Millisecond)},
			header: map[string]string{"Retry-After": "3600", "RateLimit-Limit": "1000", "RateLimit-Remaining": "0", "RateLimit-Reset": "3600", "Content-Type": "application/json"},
			body:   map[string]any{"error": "quota exceeded", "current_usage": 1000.0, "limit": 1000.0, "reset_time": "2026-12-05T11:00:00Z", "retry_after": 3600.0}},
		{name: "refills, at the latest in one period",
			resp:   &keywardv1.VerifyAPIKeyResponse{Code: exceeded, Quota: &keywardv1.Quota{Remaining: 2, Refill: 10, RefillEvery: durationpb.New(time.Hour)}},
			header: map[string]string{"Retry-After": "3600", "RateLimit-Limit": "10", "RateLimit-Remaining": "2", "RateLimit-Reset": "3600"},
			body:   map[string]any{"error": "quota exceeded", "current_usage": 8.0, "limit": 10.0, "reset_time": "2026-12-05T11:00:00Z", "retry_after": 3600.0}},
		{name: "never refills",
			resp:   &keywardv1.VerifyAPIKeyResponse{Code: exceeded, Quota: &keywardv1.Quota{Remaining: 0}},
			header: map[string]string{"Retry-After": "", "RateLimit-Limit": "", "Content-Type": "application/json"},
			body:   map[string]any{"error": "quota exceeded", "refills": false, "remaining": 0.0}},
		{name: "no quota in the verdict",
			resp:   &keywardv1.VerifyAPIKeyResponse{Code: exceeded},
			header: map[string]string{"Retry-After": ""},
			body:   map[string]any{"error": "quota exceeded", "refills": false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := AnswerOf(tc.resp, now)
			if a.Status != http.StatusTooManyRequests {
				t.Errorf("status %d, want 429", a.Status)
			}
			for k, v := range tc.header {
				if got := a.Header.Get(k); got != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
			var body map[string]any
			if err := json.Unmarshal(a.Body, &body); err != nil || !maps.Equal(body, tc.body) {
				t.Errorf("body %s (%v), want %v", a.Body, err, tc.body)
			}
		})
	}
}

// TestAnswerOfQuotaTightest: on an admitted request the RateLimit-* fields
// are the quota's when it refills and is tighter than every rate-limit
// layer (its refill, what is left, the seconds to quota_refill_time); a
// quota that never refills has no reset, and the layers' fields stand.
func TestAnswerOfQuotaTightest(t *testing.T) {
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	layer := []*keywardv1.RateLimitState{{Limit: &keywardv1.RateLimit{Limit: 100, Per: durationpb.New(time.Minute), Burst: 100}, Remaining: 90,
		ResetTime: timestamppb.New(now.Add(6 * time.Second))}}
	valid := keywardv1.APIKeyCode_API_KEY_CODE_VALID
	for _, tc := range []struct {
		name string
		resp *keywardv1.VerifyAPIKeyResponse
		want [3]string // RateLimit-Limit, -Remaining, -Reset
	}{
		{"quota tighter", &keywardv1.VerifyAPIKeyResponse{Code: valid, RateLimits: layer,
			Quota: &keywardv1.Quota{Remaining: 5, Refill: 1000, RefillEvery: durationpb.New(24 * time.Hour)}, QuotaRefillTime: timestamppb.New(now.Add(2 * time.Hour))},
			[3]string{"1000", "5", "7200"}},
		{"layer tighter", &keywardv1.VerifyAPIKeyResponse{Code: valid, RateLimits: layer,
			Quota: &keywardv1.Quota{Remaining: 500, Refill: 1000, RefillEvery: durationpb.New(24 * time.Hour)}, QuotaRefillTime: timestamppb.New(now.Add(2 * time.Hour))},
			[3]string{"100", "90", "6"}},
		{"quota never refills", &keywardv1.VerifyAPIKeyResponse{Code: valid, RateLimits: layer, Quota: &keywardv1.Quota{Remaining: 5}},
			[3]string{"100", "90", "6"}},
		{"quota alone", &keywardv1.VerifyAPIKeyResponse{Code: valid,
			Quota: &keywardv1.Quota{Remaining: 7, Refill: 10, RefillEvery: durationpb.New(time.Hour)}, QuotaRefillTime: timestamppb.New(now.Add(90 * time.Second))},
			[3]string{"10", "7", "90"}},
	} {
		a := AnswerOf(tc.resp, now)
		got := [3]string{a.Header.Get("RateLimit-Limit"), a.Header.Get("RateLimit-Remaining"), a.Header.Get("RateLimit-Reset")}
		if got != tc.want || a.Status != 0 {
			t.Errorf("%s: status %d, RateLimit-Limit, -Remaining, -Reset %q; want 0 and %q", tc.name, a.Status, got, tc.want)
		}
	}
}
