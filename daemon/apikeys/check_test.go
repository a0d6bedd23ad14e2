package apikeys

import (
	"net/netip"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
)

var t0 = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

func record() *Record {
	return &Record{
		ID: "key1", Owner: "team-a", Environment: "prod", Permissions: []string{"read-only", "orders:write"},
		Expires:    t0.Add(24 * time.Hour),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("2001:db8::/32")},
		Limits:     []ratelimit.Layer{{Limit: 2, Per: time.Second, Burst: 2}},
		State:      Active, Created: t0,
		Secrets: []Secret{{Created: t0, NotAfter: t0.Add(time.Hour)}, {Created: t0.Add(time.Minute)}},
	}
}

var okReq = Request{Permissions: []string{"orders:read"}, SourceIP: netip.MustParseAddr("10.1.2.3"), Environment: "prod"}

// TestEveryCode: each result code, decided in order.
func TestEveryCode(t *testing.T) {
	with := func(f func(*Record)) *Record { r := record(); f(r); return r }
	req := func(f func(*Request)) Request { r := okReq; f(&r); return r }
	for _, tc := range []struct {
		name   string
		rec    *Record
		secret int
		req    Request
		at     time.Time
		want   Code
	}{
		{"valid, new secret", record(), 1, okReq, t0, Valid},
		{"valid, old secret within the overlap", record(), 0, okReq, t0.Add(59 * time.Minute), Valid},
		{"old secret after the overlap", record(), 0, okReq, t0.Add(time.Hour), Expired},
		{"new secret after the old one's overlap", record(), 1, okReq, t0.Add(time.Hour), Valid},
		{"revoked", with(func(r *Record) { r.State = StateRevoked }), 1, okReq, t0, Revoked},
		{"disabled", with(func(r *Record) { r.State = StateDisabled }), 1, okReq, t0, Disabled},
		{"expired", record(), 1, okReq, t0.Add(24 * time.Hour), Expired},
		{"wrong environment", record(), 1, req(func(r *Request) { r.Environment = "dev" }), t0, WrongEnvironment},
		{"IP not allowed", record(), 1, req(func(r *Request) { r.SourceIP = netip.MustParseAddr("10.2.0.1") }), t0, IPNotAllowed},
		{"IPv6 allowed", record(), 1, req(func(r *Request) { r.SourceIP = netip.MustParseAddr("2001:db8::1") }), t0, Valid},
		{"IPv4-mapped IPv6 allowed", record(), 1, req(func(r *Request) { r.SourceIP = netip.MustParseAddr("::ffff:10.1.2.3") }), t0, Valid},
		{"unknown source with an allowlist", record(), 1, req(func(r *Request) { r.SourceIP = netip.Addr{} }), t0, IPNotAllowed},
		{"no allowlist, any source", with(func(r *Record) { r.AllowedIPs = nil }), 1, req(func(r *Request) { r.SourceIP = netip.MustParseAddr("192.0.2.1") }), t0, Valid},
		{"forbidden", record(), 1, req(func(r *Request) { r.Permissions = []string{"orders:delete"} }), t0, Forbidden},
		{"custom permission", record(), 1, req(func(r *Request) { r.Permissions = []string{"orders:write", "invoices:read"} }), t0, Valid},
		{"a malformed permission is never granted", with(func(r *Record) { r.Permissions = []string{"admin"} }), 1, req(func(r *Request) { r.Permissions = []string{"orders"} }), t0, Forbidden},
		{"usage exceeded", with(func(r *Record) { r.Quota = &Quota{Remaining: 0} }), 1, okReq, t0, UsageExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Check(tc.rec, tc.secret, tc.req, ratelimit.New(), tc.at)
			if got.Code != tc.want {
				t.Fatalf("got %s (%s), want %s", got.Code, got.Detail, tc.want)
			}
		})
	}
}

// TestRateLimitAndQuota: the rate limit is taken only when everything
// before it passes; the quota only when the rate limit passes; the quota
// refills.
func TestRateLimitAndQuota(t *testing.T) {
	rec := record()
	rec.Quota = &Quota{Remaining: 3, Refill: 2, RefillEvery: time.Hour}
	lim := ratelimit.New()
	for i := range 2 {
		if r := Check(rec, 1, okReq, lim, t0); r.Code != Valid {
			t.Fatalf("request %d: %s", i, r.Code)
		}
	}
	r := Check(rec, 1, okReq, lim, t0)
	if r.Code != RateLimited || r.Limits.RetryAfter != 500*time.Millisecond || r.Limits.Layers[0].Remaining != 0 {
		t.Fatalf("third request in a second: %+v", r)
	}
	if rec.Quota.Remaining != 1 {
		t.Fatalf("a rate-limited request took quota: %d left", rec.Quota.Remaining)
	}
	// A forbidden request takes no rate limit.
	if r := Check(rec, 1, Request{Permissions: []string{"x:delete"}, SourceIP: okReq.SourceIP, Environment: "prod"}, lim, t0.Add(time.Second)); r.Code != Forbidden {
		t.Fatal(r.Code)
	}
	if r := Check(rec, 1, okReq, lim, t0.Add(time.Second)); r.Code != Valid || r.Limits.Layers[0].Remaining != 1 {
		t.Fatalf("after a forbidden request: %+v", r)
	}
	if r := Check(rec, 1, okReq, lim, t0.Add(2*time.Second)); r.Code != UsageExceeded {
		t.Fatalf("quota used up: %s", r.Code)
	}
	if r := Check(rec, 1, okReq, lim, t0.Add(time.Hour+time.Second)); r.Code != Valid || rec.Quota.Remaining != 1 {
		t.Fatalf("after a refill to 2: %s, %d left", r.Code, rec.Quota.Remaining)
	}
	// Idle for ten periods: topped up to 2, not 20.
	Check(rec, 1, okReq, lim, t0.Add(11*time.Hour+2*time.Second))
	if rec.Quota.Remaining != 1 {
		t.Fatalf("after ten idle periods: %d left, want 1 (refill tops up, it does not pile up)", rec.Quota.Remaining)
	}
	for _, bad := range []int{-1, 2} {
		if r := Check(record(), bad, okReq, ratelimit.New(), t0); r.Code != NotFound {
			t.Fatalf("secret index %d: %s", bad, r.Code)
		}
	}
}
