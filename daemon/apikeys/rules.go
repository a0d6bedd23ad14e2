package apikeys

// The rules of a request about API keys that hold whatever the transport:
// daemon/server translates keyward.v1 into these and back, nothing more.

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// MaxOverlap is the longest a rotated-out secret may keep working.
const MaxOverlap = 30 * 24 * time.Hour

// DefaultUsageWindow is the usage window when none is given.
const DefaultUsageWindow = 24 * time.Hour

// MaxLifetime bounds a key's lifetime given as a duration from now.
const MaxLifetime = 100 * 365 * 24 * time.Hour

// Bounds of a verification request, beyond the key's own (Parse).
const (
	MaxVerifyPermissions = 32
	MaxPermissionLen     = 128
	MaxCost              = 1 << 20
)

// RotationOverlap is how long the old secret keeps working after a
// rotation: overlap if given (0: stop it now), else by risk ("high",
// "moderate"; "" is moderate).
func RotationOverlap(overlap *time.Duration, risk string) (time.Duration, error) {
	switch {
	case overlap != nil && risk != "":
		return 0, fmt.Errorf("%w: give overlap or risk, not both", ErrInvalid)
	case overlap != nil:
		if *overlap < 0 || *overlap > MaxOverlap {
			return 0, fmt.Errorf("%w: an overlap from 0 (stop the old secret now) to %v", ErrInvalid, MaxOverlap)
		}
		return *overlap, nil
	case risk == "":
		return Overlaps["moderate"], nil
	}
	d, ok := Overlaps[risk]
	if !ok {
		return 0, fmt.Errorf("%w: risk %q: use high (%v) or moderate (%v), or give an overlap", ErrInvalid, risk, Overlaps["high"], Overlaps["moderate"])
	}
	return d, nil
}

// Lifetime is the expiry of a key that lives ttl from now.
func Lifetime(now time.Time, ttl time.Duration) (time.Time, error) {
	if ttl <= 0 || ttl > MaxLifetime {
		return time.Time{}, fmt.Errorf("%w: ttl must be positive and at most %v", ErrInvalid, MaxLifetime)
	}
	return now.Add(ttl), nil
}

// ParseAllowlist parses CIDR prefixes; a bare address is a prefix of one.
func ParseAllowlist(ss []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ss))
	for i, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil || a.Zone() != "" {
				return nil, fmt.Errorf("%w: allowed_ips[%d] %q is not a CIDR prefix (192.0.2.0/24, 2001:db8::/48) or an address", ErrInvalid, i, s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%w: allowed_ips[%d] %q has host bits set; write %v", ErrInvalid, i, s, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

// CheckLayers refuses rate-limit layers that name one period twice.
func CheckLayers(ls []ratelimit.Layer) error {
	for i, l := range ls {
		if slices.ContainsFunc(ls[:i], func(o ratelimit.Layer) bool { return o.Per == l.Per }) {
			return fmt.Errorf("%w: rate_limits: two layers per %v; give each period once", ErrInvalid, l.Per)
		}
	}
	return nil
}

// Check refuses a quota with a negative count, or a refill without its
// period (or the other way round).
func (q *Quota) Check() error {
	if q == nil {
		return nil
	}
	if q.Remaining < 0 || q.Refill < 0 || q.RefillEvery < 0 || (q.Refill > 0) != (q.RefillEvery > 0) {
		return fmt.Errorf("%w: quota: remaining and refill are not negative, and refill and refill_every come together", ErrInvalid)
	}
	return nil
}

// Check refuses a verification request without its environment, or past
// the bounds.
func (r Request) Check() error {
	switch {
	case r.Environment == "":
		return fmt.Errorf("%w: environment is required: the environment this service runs in (a key works only in its own)", ErrInvalid)
	case len(r.Permissions) > MaxVerifyPermissions || slices.ContainsFunc(r.Permissions, func(p string) bool { return len(p) > MaxPermissionLen }):
		return fmt.Errorf("%w: at most %d permissions of at most %d bytes each", ErrInvalid, MaxVerifyPermissions, MaxPermissionLen)
	case r.Cost > MaxCost:
		return fmt.Errorf("%w: a cost of at most %d", ErrInvalid, MaxCost)
	}
	return nil
}

// watchedCode says whether the anomaly detector hears of a verification,
// by its verdict, and whether it learns from it: a VALID use is learned from; the live
// secret used where or how it may not be (IP_NOT_ALLOWED,
// WRONG_ENVIRONMENT, FORBIDDEN) is watched, not learned from. A
// rotated-out, revoked or disabled key's uses are not watched (they must
// not set off an alert that disables the key its owner holds now), nor
// those its own limits refused (a client retrying into its rate limit).
func watchedCode(c Code) (watch, learn bool) {
	switch c {
	case Valid:
		return true, true
	case IPNotAllowed, WrongEnvironment, Forbidden:
		return true, false
	}
	return false, false
}
