package apikeys

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// Code is the outcome of verifying an API key.
type Code string

// The codes. Check decides them in this order, except that the quota is
// checked before the rate limit (and taken only after every layer allows).
const (
	Valid            Code = "VALID"
	Malformed        Code = "MALFORMED"
	NotFound         Code = "NOT_FOUND"
	Revoked          Code = "REVOKED"
	Disabled         Code = "DISABLED"
	Expired          Code = "EXPIRED"
	WrongEnvironment Code = "WRONG_ENVIRONMENT"
	IPNotAllowed     Code = "IP_NOT_ALLOWED"
	Forbidden        Code = "FORBIDDEN"
	RateLimited      Code = "RATE_LIMITED"
	UsageExceeded    Code = "USAGE_EXCEEDED"
)

// State is whether a key may be used.
type State string

const (
	Active        State = "active"
	StateDisabled State = "disabled"
	StateRevoked  State = "revoked"
)

// Roles are permission sets: a key's permissions are role names or
// resource:action strings, and a role stands for its patterns.
var Roles = map[string][]string{
	"read-only": {"*:read"},
	"standard":  {"*:read", "*:write"},
	"admin":     {"*:*"},
}

// Record is an API key's data, without its secret: the store keeps only
// HMACs of secrets, under a key in the HSM.
type Record struct {
	ID          string         `json:"id"` // public: names the key in every call but Verify
	Owner       string         `json:"owner"`
	Name        string         `json:"name"`
	Environment string         `json:"environment"`
	Permissions []string       `json:"permissions"`
	Expires     time.Time      `json:"expires,omitzero"` // zero: no expiry
	AllowedIPs  []netip.Prefix `json:"allowed_ips,omitempty"`
	// AllowedCountries, if set, are the only countries (ISO 3166-1
	// alpha-2) the key may be used from, by the GeoIP database
	// (Options.Geo): a use from elsewhere, or whose country is unknown,
	// is refused.
	AllowedCountries []string          `json:"allowed_countries,omitempty"`
	Limits           []ratelimit.Layer `json:"limits,omitempty"`
	Quota            *Quota            `json:"quota,omitempty"`
	// Shared is the fleet's bucket of the key's rate limits, from which
	// the nodes of a fleet take requests in blocks (fleet.go); unused on
	// one host.
	Shared   ratelimit.Shared  `json:"shared,omitempty"`
	Tags     []string          `json:"tags,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
	State    State             `json:"state"`
	Created  time.Time         `json:"created"`
	Secrets  []Secret          `json:"secrets"` // the current one last
	// ExpiryNoticed is the expiry an api_key_expiring event was written
	// for (NoticeExpiring): one event per expiry, however often it looks.
	ExpiryNoticed time.Time `json:"expiry_noticed,omitzero"`
}

// Secret is one secret of a key: its HMAC, and after a rotation, when the
// old one stops working.
type Secret struct {
	MAC      []byte    `json:"mac"`
	Created  time.Time `json:"created"`
	NotAfter time.Time `json:"not_after,omitzero"` // set when a newer secret replaced it
}

// Quota is a count of uses; if Refill and RefillEvery are set, it is topped
// up to Refill every RefillEvery (unused uses do not pile up).
type Quota struct {
	Remaining   int64         `json:"remaining"`
	Refill      int64         `json:"refill,omitempty"`
	RefillEvery time.Duration `json:"refill_every,omitempty"`
	LastRefill  time.Time     `json:"last_refill,omitzero"`
}

// Request is what a verification asks.
type Request struct {
	Permissions []string   // all required
	SourceIP    netip.Addr // zero: unknown (refused when the key has an allowlist)
	Environment string     // must equal the key's
	Cost        int        // rate-limit and quota cost; 0 means 1
	// Owners, if set, says whose keys the caller may verify; a key of
	// another owner is NOT_FOUND to it, and nothing of its limits is used.
	Owners func(owner string) bool
	// LimitFactor scales the key's rate limits for this check (0 or 1:
	// as they are); the Manager sets it from Options.LimitFactor.
	LimitFactor float64

	// country is SourceIP's country ("" unknown), which the Manager's
	// Verify looks up (Options.Geo).
	country string
}

// Result is a verification's answer.
type Result struct {
	Code   Code
	Detail string
	Limits ratelimit.Result // every layer's limit, remaining and reset; RetryAfter when limited
	// Key is the key the presented secret belongs to, without any secret
	// or MAC, for every code but MALFORMED, NOT_FOUND and UNAVAILABLE; its
	// Quota is what is left after this verification.
	Key *Record
}

// Check decides a verification of a key whose secret (number secret in
// rec.Secrets) matched: state, expiry, environment, source, permissions,
// then the rate limit and the quota. The rate limit is taken only if
// everything before it passes, and the quota only if the rate limit does;
// the caller saves a changed quota.
func Check(rec *Record, secret int, req Request, lim *ratelimit.Limiter, now time.Time) Result {
	if res, ok := access(rec, secret, req, now); !ok {
		return res
	}
	cost := max(req.Cost, 1)
	if q := rec.Quota; q != nil {
		q.refill(now)
		if q.Remaining < int64(cost) {
			return Result{Code: UsageExceeded, Detail: "the key's usage quota is used up"}
		}
	}
	var res Result
	if layers := scaled(rec.Limits, req.LimitFactor); len(layers) > 0 {
		res.Limits = lim.Allow(rec.ID, layers, cost, now)
		if !res.Limits.Allowed {
			return limited(res)
		}
	}
	if q := rec.Quota; q != nil {
		q.Remaining -= int64(cost)
	}
	res.Code = Valid
	return res
}

// access is Check up to the limits: state, expiry, environment, source,
// permissions; ok if all pass.
func access(rec *Record, secret int, req Request, now time.Time) (Result, bool) {
	if secret < 0 || secret >= len(rec.Secrets) {
		return Result{Code: NotFound, Detail: "no such secret"}, false
	}
	switch {
	case rec.State == StateRevoked:
		return Result{Code: Revoked, Detail: "the key was revoked"}, false
	case rec.State == StateDisabled:
		return Result{Code: Disabled, Detail: "the key is disabled"}, false
	case !rec.Expires.IsZero() && !now.Before(rec.Expires):
		return Result{Code: Expired, Detail: "the key expired at " + rec.Expires.UTC().Format(time.RFC3339)}, false
	case !rec.Secrets[secret].NotAfter.IsZero() && !now.Before(rec.Secrets[secret].NotAfter):
		return Result{Code: Expired, Detail: "this secret was rotated; its overlap ended at " + rec.Secrets[secret].NotAfter.UTC().Format(time.RFC3339)}, false
	case req.Environment != rec.Environment:
		return Result{Code: WrongEnvironment, Detail: fmt.Sprintf("the key is for %q", rec.Environment)}, false
	case len(rec.AllowedIPs) > 0 && !slices.ContainsFunc(rec.AllowedIPs, func(p netip.Prefix) bool { return req.SourceIP.IsValid() && p.Contains(req.SourceIP.Unmap()) }):
		return Result{Code: IPNotAllowed, Detail: "the source address is not in the key's allowlist"}, false
	case len(rec.AllowedCountries) > 0 && !slices.Contains(rec.AllowedCountries, req.country):
		if req.country == "" || req.country == UnknownCountry {
			return Result{Code: IPNotAllowed, Detail: "the key is limited to countries, and the source address's country is unknown (no address, or not in the GeoIP database)"}, false
		}
		return Result{Code: IPNotAllowed, Detail: "the source address is in " + req.country + ", not in a country the key may be used from"}, false
	}
	for _, p := range req.Permissions {
		if !rec.Grants(p) {
			return Result{Code: Forbidden, Detail: fmt.Sprintf("the key lacks %q", p)}, false
		}
	}
	return Result{}, true
}

// scaled are layers times f (0 or 1: as they are).
func scaled(layers []ratelimit.Layer, f float64) []ratelimit.Layer {
	if len(layers) > 0 && f > 0 && f != 1 {
		return ratelimit.Scale(layers, f)
	}
	return layers
}

// limited is the answer to a request res.Limits refused.
func limited(res Result) Result {
	res.Code, res.Detail = RateLimited, fmt.Sprintf("retry after %v", res.Limits.RetryAfter.Round(time.Millisecond))
	if res.Limits.TooLarge {
		res.Detail = "the request costs more than the key's burst allows"
	}
	return res
}

// refill adds the refills due since the last one.
func (q *Quota) refill(now time.Time) {
	if q.Refill <= 0 || q.RefillEvery <= 0 {
		return
	}
	if q.LastRefill.IsZero() {
		q.LastRefill = now
		return
	}
	if n := now.Sub(q.LastRefill) / q.RefillEvery; n > 0 {
		q.Remaining = max(q.Remaining, q.Refill)
		q.LastRefill = q.LastRefill.Add(n * q.RefillEvery)
	}
}

// NextRefill is when the quota is next topped up; zero if it never is.
func (q *Quota) NextRefill() time.Time {
	if q.Refill <= 0 || q.RefillEvery <= 0 || q.LastRefill.IsZero() {
		return time.Time{}
	}
	return q.LastRefill.Add(q.RefillEvery)
}

// Grants says whether the key's permissions cover perm ("resource:action").
func (rec *Record) Grants(perm string) bool {
	res, act, ok := strings.Cut(perm, ":")
	if !ok {
		return false
	}
	for _, p := range rec.Permissions {
		pats := Roles[p]
		if pats == nil {
			pats = []string{p}
		}
		for _, pat := range pats {
			pr, pa, _ := strings.Cut(pat, ":")
			if (pr == "*" || pr == res) && (pa == "*" || pa == act) {
				return true
			}
		}
	}
	return false
}
