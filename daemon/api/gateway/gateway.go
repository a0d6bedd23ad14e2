// Package gateway is the one HTTP answer keyward's gateways give to an API
// key's verdict: the Go middleware (client.Gate) and the endpoints keywardd
// serves for Envoy and nginx. A verdict becomes a status (401, 403, 429),
// the IETF draft's RateLimit-* headers for the tightest layer, Retry-After
// and a JSON body on a 429, and Keyward-Near-Limit (docs/gateways.md).
// Written here: no library speaks keyward's verdicts.
package gateway

import (
	"encoding/json"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// Headers a gateway answers with or hands on (docs/gateways.md).
const (
	// HeaderKeyID and HeaderOwner carry an admitted request's key ID and
	// owner to the service behind; any the client sent are removed first.
	HeaderKeyID = "Keyward-Key-Id"
	HeaderOwner = "Keyward-Owner"
	// HeaderNearLimit is "true" on an answer whose key has used most of a
	// rate-limit layer's burst (api_keys.near_limit, default 80 %): a
	// warning before enforcement starts.
	HeaderNearLimit = "Keyward-Near-Limit"
)

// Answer is what a gateway tells a client about its API key: nothing but
// headers when it is admitted (Status 0: pass it on), or the refusal's
// status, headers and body.
type Answer struct {
	Status int
	Header http.Header
	Body   []byte
}

// AnswerOf turns a VerifyAPIKey verdict into the HTTP answer every keyward
// gateway gives: 401 for a key that is malformed, unknown, revoked,
// disabled or expired; 403 for one that may not do this (environment,
// address, permission); 429 for one over its rate limit or quota, with
// Retry-After and a JSON body. Every answer carries RateLimit-Limit,
// RateLimit-Remaining and RateLimit-Reset (the IETF draft's fields, in
// requests and seconds) for the tightest layer, the one with the fewest
// requests left, and Keyward-Near-Limit when a layer is nearly used up.
func AnswerOf(r *keywardv1.VerifyAPIKeyResponse, now time.Time) Answer {
	a := Answer{Header: http.Header{}}
	tight := tightest(r.GetRateLimits())
	if tight != nil {
		a.Header.Set("RateLimit-Limit", strconv.FormatUint(uint64(tight.GetLimit().GetBurst()), 10))
		a.Header.Set("RateLimit-Remaining", strconv.FormatUint(uint64(tight.GetRemaining()), 10))
		a.Header.Set("RateLimit-Reset", strconv.FormatInt(secondsUntil(tight.GetResetTime().AsTime(), now), 10))
	}
	if r.GetNearLimit() {
		a.Header.Set(HeaderNearLimit, "true")
	}
	switch r.GetCode() {
	case keywardv1.APIKeyCode_API_KEY_CODE_VALID:
		return a
	case keywardv1.APIKeyCode_API_KEY_CODE_FORBIDDEN, keywardv1.APIKeyCode_API_KEY_CODE_WRONG_ENVIRONMENT, keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED:
		a.Status = http.StatusForbidden
		a.Body = JSON(map[string]any{"error": "forbidden", "code": codeName(r.GetCode())})
	case keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED:
		a.Status = http.StatusTooManyRequests
		body := map[string]any{"error": "rate limit exceeded"}
		if tight != nil {
			used := int64(tight.GetLimit().GetBurst()) - int64(tight.GetRemaining())
			body["current_usage"], body["limit"] = max(used, 0), tight.GetLimit().GetBurst()
			body["reset_time"] = ceilSecond(tight.GetResetTime().AsTime()).UTC().Format(time.RFC3339)
		}
		if ra := r.GetRetryAfter(); ra != nil {
			retryAfter(a, body, ra.AsDuration())
		}
		a.Body = JSON(body)
	case keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED:
		a.Status = http.StatusTooManyRequests
		a.Body = JSON(quotaBody(a, r, now))
	default: // malformed, unknown, revoked, disabled, expired
		a.Status = http.StatusUnauthorized
		a.Header.Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		a.Body = JSON(map[string]any{"error": "invalid API key", "code": codeName(r.GetCode())})
	}
	a.Header.Set("Content-Type", "application/json")
	return a
}

// quotaBody is the body of a refusal for the key's quota (USAGE_EXCEEDED),
// and sets its headers. A quota that refills (Quota.refill uses every
// refill_every) is a limit like a rate-limit layer's: its usage, its
// limit, when it is refilled and the Retry-After until then, which is the
// verdict's retry_after when keywardd gives it, else one refill_every: by
// then the quota has been refilled, whenever it last was. That quota is
// then the tightest limit, and the RateLimit-* headers say so. A quota
// that never refills says so ("refills": false), with no Retry-After: no
// wait lets the key through.
func quotaBody(a Answer, r *keywardv1.VerifyAPIKeyResponse, now time.Time) map[string]any {
	body := map[string]any{"error": "quota exceeded"}
	q := r.GetQuota()
	every := q.GetRefillEvery().AsDuration()
	if q.GetRefill() <= 0 || every <= 0 {
		body["refills"] = false
		if q != nil {
			body["remaining"] = max(q.GetRemaining(), 0)
		}
		return body
	}
	wait := every
	if ra := r.GetRetryAfter(); ra != nil && ra.AsDuration() <= every {
		wait = max(ra.AsDuration(), 0)
	}
	left := max(q.GetRemaining(), 0)
	body["current_usage"], body["limit"] = max(q.GetRefill()-left, 0), q.GetRefill()
	body["reset_time"] = ceilSecond(now.Add(wait)).UTC().Format(time.RFC3339)
	retryAfter(a, body, wait)
	a.Header.Set("RateLimit-Limit", strconv.FormatInt(q.GetRefill(), 10))
	a.Header.Set("RateLimit-Remaining", strconv.FormatInt(left, 10))
	a.Header.Set("RateLimit-Reset", strconv.FormatInt(secondsUntil(now.Add(wait), now), 10))
	return body
}

// retryAfter sets Retry-After and the body's retry_after to d, in whole
// seconds rounded up (a client that waits that long is let through).
func retryAfter(a Answer, body map[string]any, d time.Duration) {
	secs := int64(math.Ceil(d.Seconds()))
	a.Header.Set("Retry-After", strconv.FormatInt(secs, 10))
	body["retry_after"] = secs
}

// tightest is the layer with the fewest requests left (a refused one
// first).
func tightest(ls []*keywardv1.RateLimitState) *keywardv1.RateLimitState {
	var t *keywardv1.RateLimitState
	for _, l := range ls {
		switch {
		case t == nil, l.GetRefused() && !t.GetRefused(),
			l.GetRefused() == t.GetRefused() && l.GetRemaining() < t.GetRemaining():
			t = l
		}
	}
	return t
}

// ceilSecond is t rounded up to a whole second, as a client is told it.
func ceilSecond(t time.Time) time.Time { return t.Add(time.Second - 1).Truncate(time.Second) }

func secondsUntil(t, now time.Time) int64 { return max(int64(math.Ceil(t.Sub(now).Seconds())), 0) }

func codeName(c keywardv1.APIKeyCode) string {
	return strings.ToLower(strings.TrimPrefix(c.String(), "API_KEY_CODE_"))
}

// Key is the API key a request presents in header name: the key itself,
// or for Authorization the token of "Bearer KEY" (anything else there is
// no key); "" when there is none.
func Key(h http.Header, name string) string {
	key := h.Get(name)
	if !strings.EqualFold(name, "Authorization") {
		return key
	}
	scheme, rest, ok := strings.Cut(key, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(rest)
}

// JSON is v as a one-line JSON body.
func JSON(v any) []byte {
	b, _ := json.Marshal(v) // strings and numbers: cannot fail
	return append(b, '\n')
}
