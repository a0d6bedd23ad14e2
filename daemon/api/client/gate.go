package client

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/api/gateway"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

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
// and answers the others as gateway.AnswerOf says. An admitted request goes on
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
			// A client's own, also spelt with underscores (which CGI-style
			// backends read as the same variable), never reach the service.
			for k := range r.Header {
				if n := strings.ReplaceAll(k, "_", "-"); strings.EqualFold(n, gateway.HeaderKeyID) || strings.EqualFold(n, gateway.HeaderOwner) {
					delete(r.Header, k)
				}
			}
			key := gateway.Key(r.Header, o.Header)
			if key == "" {
				// No key at all: nothing to ask keywardd.
				a := gateway.NoKey(o.Header)
				maps.Copy(w.Header(), a.Header)
				w.WriteHeader(a.Status)
				w.Write(a.Body)
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
				w.Write(gateway.JSON(map[string]any{"error": "the API key could not be checked"}))
				return
			}
			a := gateway.AnswerOf(resp, o.Now())
			for k, vs := range a.Header {
				w.Header()[k] = vs
			}
			if a.Status != 0 {
				w.WriteHeader(a.Status)
				w.Write(a.Body)
				return
			}
			r.Header.Set(gateway.HeaderKeyID, resp.GetKeyId())
			r.Header.Set(gateway.HeaderOwner, resp.GetOwner())
			next.ServeHTTP(w, r)
		})
	}
}
