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

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

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
	if q := quotaState(r, now); q != nil {
		tight = tightest([]*keywardv1.RateLimitState{tight, q})
	}
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

// NoKey is the answer to a request that presents no key at all in header
// (where it was looked for, for the client): 401 with a challenge that
// names no error, as RFC 6750 asks of a request without credentials.
func NoKey(header string) Answer {
	a := Answer{Status: http.StatusUnauthorized, Header: http.Header{}, Body: JSON(map[string]any{"error": "an API key is required", "code": "missing", "header": header})}
	a.Header.Set("WWW-Authenticate", `Bearer realm="api"`)
	a.Header.Set("Content-Type", "application/json")
	return a
}

// quotaState is a quota that refills (Quota.refill uses every
// refill_every) as a limit like a rate-limit layer's, for the RateLimit-*
// headers on every answer and a refusal's body: its refill is its limit,
// what is left its remaining, its next refill its reset (the verdict's
// quota_refill_time, or for a refusal by it its retry_after; from a
// keywardd too old to give them, one refill_every from now, by when it has
// been refilled, whenever it last was). Nil for
// no quota, or one that never refills: no wait lets the key through, and
// the RateLimit-* fields have no reset to say.
func quotaState(r *keywardv1.VerifyAPIKeyResponse, now time.Time) *keywardv1.RateLimitState {
	q := r.GetQuota()
	every := q.GetRefillEvery().AsDuration()
	if q.GetRefill() <= 0 || every <= 0 {
		return nil
	}
	reset := now.Add(every)
	if t := r.GetQuotaRefillTime(); t != nil && t.AsTime().Before(reset) {
		reset = t.AsTime()
	}
	if ra := r.GetRetryAfter(); ra != nil && r.GetCode() == keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED && now.Add(ra.AsDuration()).Before(reset) {
		reset = now.Add(max(ra.AsDuration(), 0))
	}
	limit := uint32(min(max(q.GetRefill(), q.GetRemaining()), math.MaxUint32))
	return &keywardv1.RateLimitState{Limit: &keywardv1.RateLimit{Limit: limit, Burst: limit, Per: durationpb.New(every)},
		Remaining: uint32(min(max(q.GetRemaining(), 0), math.MaxUint32)), ResetTime: timestamppb.New(reset),
		Refused: r.GetCode() == keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED}
}

// quotaBody is the body of a refusal for the key's quota (USAGE_EXCEEDED):
// for a quota that refills (quotaState), its usage, its limit, when it is
// refilled and the Retry-After until then; one that never refills says so
// ("refills": false), with no Retry-After.
func quotaBody(a Answer, r *keywardv1.VerifyAPIKeyResponse, now time.Time) map[string]any {
	body := map[string]any{"error": "quota exceeded"}
	qs := quotaState(r, now)
	if qs == nil {
		body["refills"] = false
		if q := r.GetQuota(); q != nil {
			body["remaining"] = max(q.GetRemaining(), 0)
		}
		return body
	}
	reset := qs.GetResetTime().AsTime()
	body["current_usage"], body["limit"] = max(int64(qs.GetLimit().GetBurst())-int64(qs.GetRemaining()), 0), qs.GetLimit().GetBurst()
	body["reset_time"] = ceilSecond(reset).UTC().Format(time.RFC3339)
	retryAfter(a, body, max(reset.Sub(now), 0))
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
// first); nil entries are none.
func tightest(ls []*keywardv1.RateLimitState) *keywardv1.RateLimitState {
	var t *keywardv1.RateLimitState
	for _, l := range ls {
		switch {
		case l == nil:
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
// no key); "" when there is none, or the header is there more than once.
func Key(h http.Header, name string) string {
	if len(h.Values(name)) != 1 {
		return "" // none, or the header sent more than once: ambiguous
	}
	return KeyOf(name, h.Get(name))
}

// KeyOf is Key for the one value of header name. A value holding a ","
// is a header sent more than once and joined by a proxy (a key never
// holds one): no key.
func KeyOf(name, value string) string {
	if strings.Contains(value, ",") {
		return ""
	}
	if !strings.EqualFold(name, "Authorization") {
		return value
	}
	scheme, rest, ok := strings.Cut(value, " ")
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
