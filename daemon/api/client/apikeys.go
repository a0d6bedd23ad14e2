package client

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// VerifyAPIKey checks a key a client presented. Every verdict about the key
// is in the answer's Code; an error means keywardd could not say (treat the
// request as unauthenticated, answer 503, never let it through).
func (c *Client) VerifyAPIKey(ctx context.Context, r *keywardv1.VerifyAPIKeyRequest) (*keywardv1.VerifyAPIKeyResponse, error) {
	resp, err := c.APIKeys.VerifyAPIKey(ctx, r)
	return resp, Wrap(err)
}

// APIKeyHTTPStatus is the HTTP status an API should answer a verdict with:
// 200 to go on; 401 for a key that identifies nobody it will serve (missing,
// malformed, unknown, revoked, disabled, expired); 403 for a good key that
// may not do this (permission, source address, environment); 429 for a key
// over its rate limit or quota.
func APIKeyHTTPStatus(code keywardv1.APIKeyCode) int {
	switch code {
	case keywardv1.APIKeyCode_API_KEY_CODE_VALID:
		return http.StatusOK
	case keywardv1.APIKeyCode_API_KEY_CODE_FORBIDDEN, keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED,
		keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT:
		return http.StatusForbidden
	case keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED, keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED:
		return http.StatusTooManyRequests
	}
	return http.StatusUnauthorized
}

// SetRateLimitHeaders sets the rate-limit headers of a verification on h,
// in the form of the IETF RateLimit header fields draft:
//
//	RateLimit-Policy: 100;w=1, 5000;w=3600   every layer: limit per window (seconds)
//	RateLimit-Limit: 200                      the layer closest to its limit: its burst,
//	RateLimit-Remaining: 37                   what is left of it,
//	RateLimit-Reset: 1                        and seconds until it is full again
//	Retry-After: 1                            when refused: seconds to wait
//
// Limit is the burst, the most a full bucket allows at once, so Remaining
// never exceeds it.
//
// Nothing is set for a key without limits or a verdict that did not reach
// them.
func SetRateLimitHeaders(h http.Header, r *keywardv1.VerifyAPIKeyResponse) {
	if ra := r.GetRetryAfter(); ra != nil {
		h.Set("Retry-After", strconv.FormatInt(ceilSeconds(ra.AsDuration()), 10))
	}
	layers := r.GetRateLimits()
	if len(layers) == 0 {
		return
	}
	policy := make([]string, len(layers))
	tight := layers[0]
	for i, l := range layers {
		policy[i] = fmt.Sprintf("%d;w=%d", l.GetLimit().GetLimit(), ceilSeconds(l.GetLimit().GetPer().AsDuration()))
		if l.GetRemaining() < tight.GetRemaining() {
			tight = l
		}
	}
	h.Set("RateLimit-Policy", strings.Join(policy, ", "))
	h.Set("RateLimit-Limit", strconv.FormatUint(uint64(tight.GetLimit().GetBurst()), 10))
	h.Set("RateLimit-Remaining", strconv.FormatUint(uint64(tight.GetRemaining()), 10))
	h.Set("RateLimit-Reset", strconv.FormatInt(ceilSeconds(time.Until(tight.GetResetTime().AsTime())), 10))
}

// ceilSeconds rounds up to whole seconds, never below 0.
func ceilSeconds(d time.Duration) int64 {
	return int64(math.Ceil(max(d, 0).Seconds()))
}
