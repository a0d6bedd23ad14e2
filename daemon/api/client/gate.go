package client

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"net"
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
		a.Body = jsonBody(map[string]any{"error": "forbidden", "code": codeName(r.GetCode())})
	case keywardv1.APIKeyCode_API_KEY_CODE_RATE_LIMITED:
		a.Status = http.StatusTooManyRequests
		body := map[string]any{"error": "rate limit exceeded"}
		if tight != nil {
			used := int64(tight.GetLimit().GetBurst()) - int64(tight.GetRemaining())
			body["current_usage"], body["limit"] = max(used, 0), tight.GetLimit().GetBurst()
			body["reset_time"] = tight.GetResetTime().AsTime().UTC().Format(time.RFC3339)
		}
		if ra := r.GetRetryAfter(); ra != nil {
			secs := int64(math.Ceil(ra.AsDuration().Seconds()))
			a.Header.Set("Retry-After", strconv.FormatInt(secs, 10))
			body["retry_after"] = secs
		}
		a.Body = jsonBody(body)
	case keywardv1.APIKeyCode_API_KEY_CODE_USAGE_EXCEEDED:
		a.Status = http.StatusTooManyRequests
		body := map[string]any{"error": "quota exceeded"}
		if q := r.GetQuota(); q != nil && q.GetRefillEvery() != nil {
			body["limit"] = q.GetRefill()
		}
		a.Body = jsonBody(body)
	default: // malformed, unknown, revoked, disabled, expired
		a.Status = http.StatusUnauthorized
		a.Header.Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		a.Body = jsonBody(map[string]any{"error": "invalid API key", "code": codeName(r.GetCode())})
	}
	a.Header.Set("Content-Type", "application/json")
	return a
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

func secondsUntil(t, now time.Time) int64 { return max(int64(math.Ceil(t.Sub(now).Seconds())), 0) }

func codeName(c keywardv1.APIKeyCode) string {
	return strings.ToLower(strings.TrimPrefix(c.String(), "API_KEY_CODE_"))
}

func jsonBody(v any) []byte {
	b, _ := json.Marshal(v) // strings and numbers: cannot fail
	return append(b, '\n')
}

// Verifier is what the middleware asks: *Client, or a *VerdictCache.
type Verifier interface {
	Verify(ctx context.Context, r *keywardv1.VerifyAPIKeyRequest) (*keywardv1.VerifyAPIKeyResponse, error)
}

// Verify is VerifyAPIKey, for the middleware (Verifier).
func (c *Client) Verify(ctx context.Context, r *keywardv1.VerifyAPIKeyRequest) (*keywardv1.VerifyAPIKeyResponse, error) {
	return c.VerifyAPIKey(ctx, r)
}

// GateOptions say where the key is and what it must allow.
type GateOptions struct {
	// Header holds the key: "Authorization" (default) takes "Bearer KEY";
	// any other header is the key itself ("X-API-Key").
	Header string
	// Environment the key must be for.
	Environment string
	// Permissions the request needs (fixed), or Route, if set, per request.
	Permissions []string
	Route       func(*http.Request) []string
	// SourceIP is the client's address; default the connection's (a
	// service behind a proxy passes a function that reads the proxy's
	// header, which it must trust).
	SourceIP func(*http.Request) string
	// Now is the clock of the RateLimit-Reset header; default time.Now.
	Now func() time.Time
}

// Gate is a net/http middleware that admits a request only with a valid
// API key, verified by keywardd (through v: the client, or a VerdictCache),
// and answers the others as AnswerOf says. An admitted request goes on
// with Keyward-Key-Id and Keyward-Owner set (any the client sent are
// removed) and the rate-limit headers on its answer. keywardd unreachable
// is 503: fail closed.
func Gate(v Verifier, o GateOptions) func(http.Handler) http.Handler {
	if o.Header == "" {
		o.Header = "Authorization"
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r.Header.Del(HeaderKeyID)
			r.Header.Del(HeaderOwner)
			key := r.Header.Get(o.Header)
			if strings.EqualFold(o.Header, "Authorization") {
				scheme, rest, ok := strings.Cut(key, " ")
				if !ok || !strings.EqualFold(scheme, "Bearer") {
					key = ""
				} else {
					key = strings.TrimSpace(rest)
				}
			}
			if key == "" {
				// No key at all: nothing to ask keywardd.
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
				w.WriteHeader(http.StatusUnauthorized)
				w.Write(jsonBody(map[string]any{"error": "an API key is required", "header": o.Header}))
				return
			}
			perms := o.Permissions
			if o.Route != nil {
				perms = o.Route(r)
			}
			ip := ""
			if o.SourceIP != nil {
				ip = o.SourceIP(r)
			} else if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
				ip = host
			}
			resp, err := v.Verify(r.Context(), &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: o.Environment, Permissions: perms, SourceIp: ip})
			if err != nil {
				status := http.StatusServiceUnavailable
				if errors.Is(err, ErrInvalid) {
					status = http.StatusBadRequest
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(status)
				w.Write(jsonBody(map[string]any{"error": "the API key could not be checked"}))
				return
			}
			a := AnswerOf(resp, o.Now())
			for k, vs := range a.Header {
				w.Header()[k] = vs
			}
			if a.Status != 0 {
				w.WriteHeader(a.Status)
				w.Write(a.Body)
				return
			}
			r.Header.Set(HeaderKeyID, resp.GetKeyId())
			r.Header.Set(HeaderOwner, resp.GetOwner())
			next.ServeHTTP(w, r)
		})
	}
}
