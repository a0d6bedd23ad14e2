package apikeys

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

var pepper = hsm.KeyID{Name: "keyward-apikeys", Version: 1}

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time               { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration)          { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func newClock() *clock                        { return &clock{t: time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)} }
func (c *clock) in(d time.Duration) time.Time { return c.now().Add(d) }

// countingMAC counts the HSM calls the Manager makes.
type countingMAC struct {
	MACer
	mu sync.Mutex
	n  int
}

func (c *countingMAC) HMACSHA256(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, error) {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return c.MACer.HMACSHA256(ctx, id, msg)
}

func (c *countingMAC) calls() int { c.mu.Lock(); defer c.mu.Unlock(); return c.n }

type fixture struct {
	h     *hsm.HSM
	mac   *countingMAC
	path  string
	store *store.Store
	clk   *clock
	m     *Manager
	geo   Geo // Options.Geo of the Managers reopen makes
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	h, _ := hsmtest.Open(t)
	if err := h.CreateKey(context.Background(), pepper, hsm.HMACSHA256); err != nil {
		t.Fatal(err)
	}
	f := &fixture{h: h, mac: &countingMAC{MACer: h}, path: filepath.Join(t.TempDir(), "keyward.db"), clk: newClock()}
	f.reopen(t)
	return f
}

// reopen closes the store and opens a new Manager on it, as a restart does.
func (f *fixture) reopen(t testing.TB) {
	t.Helper()
	if f.store != nil {
		f.store.Close()
	}
	s, err := store.Open(f.path, storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	f.store = s
	if f.m, err = NewManager(s, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, Geo: f.geo}); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) create(t testing.TB, s Spec) (string, *Record) {
	t.Helper()
	secret, rec, err := f.m.Create(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	return secret, rec
}

func (f *fixture) verify(t *testing.T, key string, req Request, want Code) Result {
	t.Helper()
	res := f.m.Verify(context.Background(), key, req)
	if res.Code != want {
		t.Fatalf("Verify = %s (%s), want %s", res.Code, res.Detail, want)
	}
	return res
}

func spec() Spec {
	return Spec{Owner: "team-a", Name: "billing", Environment: "prod", Permissions: []string{"invoices:read"}}
}

var prod = Request{Environment: "prod", Permissions: []string{"invoices:read"}}

func TestManagerLifecycle(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	if !strings.HasPrefix(key, "kwtest_") || !strings.HasPrefix(rec.ID, "ak_") {
		t.Fatalf("key %q... id %q: want the kwtest_ prefix and an ak_ ID", key[:7], rec.ID)
	}
	f.verify(t, key, prod, Valid)
	f.verify(t, key, Request{Environment: "prod", Permissions: []string{"invoices:write"}}, Forbidden)
	f.verify(t, key, Request{Environment: "staging", Permissions: []string{"invoices:read"}}, WrongEnvironment)

	// A typo is caught by the checksum before any HSM call; a well-formed
	// key nobody issued is NOT_FOUND.
	before := f.mac.calls()
	typo := key[:len(key)-8] + string(key[len(key)-8]^1) + key[len(key)-7:]
	f.verify(t, typo, prod, Malformed)
	if f.mac.calls() != before {
		t.Errorf("a malformed key cost %d HSM calls, want 0", f.mac.calls()-before)
	}
	other, err := Generate("kwtest", strings.NewReader(strings.Repeat("x", 64)))
	if err != nil {
		t.Fatal(err)
	}
	f.verify(t, other, prod, NotFound)

	// The second verify of a key is answered from the digest cache.
	before = f.mac.calls()
	f.verify(t, key, prod, Valid)
	if f.mac.calls() != before {
		t.Errorf("a verified key cost %d HSM calls again, want 0", f.mac.calls()-before)
	}

	// Revocation counts from the very next verify, cached or not, and
	// survives a restart.
	if _, err := f.m.Revoke(rec.ID); err != nil {
		t.Fatal(err)
	}
	f.verify(t, key, prod, Revoked)
	f.reopen(t)
	f.verify(t, key, prod, Revoked)
	if _, err := f.m.Revoke("ak_000000000000000000000000"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Revoke of an unknown ID: %v, want ErrNotFound", err)
	}
}

func TestManagerCreateRefuses(t *testing.T) {
	f := newFixture(t)
	for name, mod := range map[string]func(*Spec){
		"no permissions":  func(s *Spec) { s.Permissions = nil },
		"bad permission":  func(s *Spec) { s.Permissions = []string{"everything"} },
		"no owner":        func(s *Spec) { s.Owner = "" },
		"expired already": func(s *Spec) { s.Expires = f.clk.in(-time.Second) },
		"a long owner":    func(s *Spec) { s.Owner = strings.Repeat("o", 129) },
		"many tags":       func(s *Spec) { s.Tags = make([]string, 33) },
		"five layers":     func(s *Spec) { s.Limits = make([]ratelimit.Layer, 5) },
		"big metadata": func(s *Spec) {
			s.Metadata = map[string]string{}
			for i := range 9 {
				s.Metadata[fmt.Sprint(i)] = strings.Repeat("v", 1000)
			}
		},
	} {
		s := spec()
		mod(&s)
		if _, _, err := f.m.Create(context.Background(), s); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Create = %v, want ErrInvalid", name, err)
		}
	}
}

func TestManagerExpiryAndAllowlist(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Expires = f.clk.in(time.Hour)
	s.AllowedIPs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	key, _ := f.create(t, s)
	in := prod
	in.SourceIP = netip.MustParseAddr("10.1.2.3")
	f.verify(t, key, in, Valid)
	out := prod
	out.SourceIP = netip.MustParseAddr("192.0.2.1")
	f.verify(t, key, out, IPNotAllowed)
	f.verify(t, key, prod, IPNotAllowed) // unknown source
	f.clk.add(time.Hour)
	f.verify(t, key, in, Expired)
}

func TestManagerRotateOverlap(t *testing.T) {
	f := newFixture(t)
	old, rec := f.create(t, spec())
	f.verify(t, old, prod, Valid)
	fresh, rec2, err := f.m.Rotate(context.Background(), rec.ID, Overlaps["high"])
	if err != nil {
		t.Fatal(err)
	}
	if fresh == old || rec2.ID != rec.ID || len(rec2.Secrets) != 2 {
		t.Fatalf("Rotate: a new secret for the same ID is wanted; got %d secrets, same=%v", len(rec2.Secrets), fresh == old)
	}
	// Both work during the overlap; the old one stops at its end.
	f.verify(t, old, prod, Valid)
	f.verify(t, fresh, prod, Valid)
	f.clk.add(Overlaps["high"] - time.Second)
	f.verify(t, old, prod, Valid)
	f.clk.add(time.Second)
	f.verify(t, old, prod, Expired)
	f.verify(t, fresh, prod, Valid)

	// A second rotation never lengthens an overlap already set.
	f.reopen(t)
	if _, _, err := f.m.Rotate(context.Background(), rec.ID, Overlaps["moderate"]); err != nil {
		t.Fatal(err)
	}
	f.verify(t, old, prod, Expired)
	f.verify(t, fresh, prod, Valid)

	if _, err := f.m.Revoke(rec.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.m.Rotate(context.Background(), rec.ID, 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("Rotate of a revoked key: %v, want ErrInvalid", err)
	}
	f.verify(t, fresh, prod, Revoked)
}

func TestManagerRevokeWhere(t *testing.T) {
	f := newFixture(t)
	var keys []string
	for _, owner := range []string{"team-a", "team-a", "team-b"} {
		s := spec()
		s.Owner, s.Tags = owner, []string{"ci"}
		k, _ := f.create(t, s)
		keys = append(keys, k)
	}
	if _, err := f.m.RevokeWhere(Filter{}, false); !errors.Is(err, ErrInvalid) {
		t.Errorf("an empty filter: %v, want ErrInvalid", err)
	}
	n, err := f.m.RevokeWhere(Filter{Owner: "team-a", Tag: "ci"}, true)
	if err != nil || n != 2 {
		t.Fatalf("dry run = %d, %v; want 2", n, err)
	}
	f.verify(t, keys[0], prod, Valid) // a dry run changes nothing
	if n, err = f.m.RevokeWhere(Filter{Owner: "team-a"}, false); err != nil || n != 2 {
		t.Fatalf("RevokeWhere = %d, %v; want 2", n, err)
	}
	f.verify(t, keys[0], prod, Revoked)
	f.verify(t, keys[1], prod, Revoked)
	f.verify(t, keys[2], prod, Valid)
	if n, _ = f.m.RevokeWhere(Filter{Owner: "team-a"}, false); n != 0 {
		t.Errorf("revoked keys were counted again: %d", n)
	}
}

// TestManagerQuotaPersists: quota use is in memory until Flush, or until a
// change of the key saves it with the record; Get sees it either way.
func TestManagerQuotaPersists(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Quota = &Quota{Remaining: 4}
	key, rec := f.create(t, s)
	remaining := func(want int64) {
		t.Helper()
		got, err := f.m.Get(rec.ID)
		if err != nil || got.Quota.Remaining != want {
			t.Fatalf("Get = %+v, %v; want %d remaining", got.Quota, err, want)
		}
	}
	f.verify(t, key, prod, Valid)
	remaining(3)
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	// The record cache held the record from before the flush; the flush
	// dropped it, so no use comes back.
	if res := f.verify(t, key, prod, Valid); res.Key.Quota.Remaining != 2 {
		t.Fatalf("after a flush, verify left %d, want 2", res.Key.Quota.Remaining)
	}
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	remaining(2)
	s.Quota = &Quota{Remaining: 5}
	key, rec = f.create(t, s)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, Valid)
	remaining(3)
	f.verify(t, key, prod, Valid)
	limited := StateDisabled
	if _, err := f.m.Update(rec.ID, Change{State: &limited}, false); err != nil {
		t.Fatal(err)
	}
	f.reopen(t) // no Flush: the change saved the quota
	remaining(2)
	enabled := Active
	if _, err := f.m.Update(rec.ID, Change{State: &enabled}, true); err != nil {
		t.Fatal(err)
	}
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, UsageExceeded)
	remaining(0)
	f.m.Flush()
	f.reopen(t)
	f.verify(t, key, prod, UsageExceeded)
}

// TestManagerStoresNoSecret: neither the key nor its random part is in the
// store file, so a copy of it (or a backup) gives no working key.
func TestManagerStoresNoSecret(t *testing.T) {
	f := newFixture(t)
	key, _ := f.create(t, spec())
	f.verify(t, key, prod, Valid)
	f.store.Close()
	b, err := os.ReadFile(f.path)
	if err != nil {
		t.Fatal(err)
	}
	body := key[len("kwtest_") : len(key)-6]
	if bytes.Contains(b, []byte(body)) {
		t.Fatal("the store file holds the key's secret")
	}
}

func TestManagerConcurrentVerify(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Quota = &Quota{Remaining: 50}
	key, rec := f.create(t, s)
	var wg sync.WaitGroup
	var mu sync.Mutex
	valid := 0
	for range 8 {
		wg.Go(func() {
			for range 10 {
				if f.m.Verify(context.Background(), key, prod).Code == Valid {
					mu.Lock()
					valid++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	got, err := f.m.Get(rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if valid != 50 || got.Quota.Remaining != 0 {
		t.Fatalf("80 verifies against a quota of 50: %d valid, %d remaining; want 50 and 0", valid, got.Quota.Remaining)
	}
}

// TestManagerIndexOnlyPoints: an index entry pointing a key's MAC at another
// key (a stale entry, or a store someone wrote to) does not let it verify as
// that key: the record's own MAC decides.
func TestManagerIndexOnlyPoints(t *testing.T) {
	f := newFixture(t)
	a, recA := f.create(t, spec())
	_, recB := f.create(t, spec())
	if len(recA.Secrets[0].MAC) != 0 {
		t.Fatal("Create returned a MAC")
	}
	macA, err := f.h.HMACSHA256(context.Background(), pepper, []byte(a))
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := json.Marshal(secretRef{ID: recB.ID, Secret: 0})
	if err := f.store.Update(store.BucketAPIKeyMACs, hex.EncodeToString(macA), func([]byte) ([]byte, error) { return ref, nil }); err != nil {
		t.Fatal(err)
	}
	f.verify(t, a, prod, NotFound)
}

func TestManagerList(t *testing.T) {
	f := newFixture(t)
	ids := map[string]bool{}
	for i := range 7 {
		s := spec()
		if i%2 == 1 {
			s.Owner, s.Tags = "team-b", []string{"odd"}
		}
		_, rec := f.create(t, s)
		ids[rec.ID] = true
	}
	var seen []string
	after, pages := "", 0
	for {
		recs, next, err := f.m.List(Filter{}, after, 3)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, r := range recs {
			if !ids[r.ID] || len(r.Secrets) != 1 || r.Secrets[0].MAC != nil {
				t.Fatalf("List gave %q with %d secrets, MAC %x: want a known key, one secret, no MAC", r.ID, len(r.Secrets), r.Secrets[0].MAC)
			}
			seen = append(seen, r.ID)
		}
		if next == "" {
			break
		}
		after = next
	}
	if len(seen) != 7 || pages != 3 || !slices.IsSorted(seen) {
		t.Fatalf("paged list: %d keys in %d pages, sorted %v; want 7 in 3, sorted", len(seen), pages, slices.IsSorted(seen))
	}
	recs, next, err := f.m.List(Filter{Owner: "team-b", Tag: "odd"}, "", 0)
	if err != nil || len(recs) != 3 || next != "" {
		t.Fatalf("filtered list: %d keys, next %q, %v; want 3 on one page", len(recs), next, err)
	}
	if _, err := f.m.Revoke(recs[0].ID); err != nil {
		t.Fatal(err)
	}
	if recs, _, _ = f.m.List(Filter{State: StateRevoked}, "", 0); len(recs) != 1 {
		t.Fatalf("revoked keys listed: %d, want 1", len(recs))
	}
}

// TestManagerIDNotEchoed: a key pasted where an ID belongs is refused
// without appearing in the error.
func TestManagerIDNotEchoed(t *testing.T) {
	f := newFixture(t)
	key, _ := f.create(t, spec())
	for _, call := range []func() error{
		func() error { _, err := f.m.Get(key); return err },
		func() error { _, err := f.m.Revoke(key); return err },
		func() error { _, _, err := f.m.Rotate(context.Background(), key, 0); return err },
		func() error { _, err := f.m.Update(key, Change{}, true); return err },
	} {
		err := call()
		if !errors.Is(err, ErrInvalid) || strings.Contains(err.Error(), key[7:20]) {
			t.Fatalf("a key given as an ID: %v; want ErrInvalid without the key", err)
		}
	}
}

func TestManagerUpdateNarrows(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Permissions = []string{"standard"}
	s.Expires = f.clk.in(30 * 24 * time.Hour)
	s.AllowedIPs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")}
	s.Limits = []ratelimit.Layer{{Limit: 10, Per: time.Second, Burst: 10}}
	key, rec := f.create(t, s)
	req := Request{Environment: "prod", Permissions: []string{"orders:write"}, SourceIP: netip.MustParseAddr("10.9.9.9")}
	f.verify(t, key, req, Valid)

	later, never, enabled := s.Expires.Add(time.Hour), time.Time{}, Active
	widen := map[string]Change{
		"admin role":     {Permissions: []string{"admin"}},
		"a new action":   {Permissions: []string{"orders:delete"}},
		"no limits":      {Limits: &[]ratelimit.Layer{}},
		"a higher limit": {Limits: &[]ratelimit.Layer{{Limit: 20, Per: time.Second, Burst: 10}}},
		"another period": {Limits: &[]ratelimit.Layer{{Limit: 600, Per: time.Minute, Burst: 10}}},
		"no allowlist":   {AllowedIPs: &[]netip.Prefix{}},
		"a wider prefix": {AllowedIPs: &[]netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}},
		"an outside /64": {AllowedIPs: &[]netip.Prefix{netip.MustParsePrefix("2001:db9::/64")}},
		"a later expiry": {Expires: &later},
		"no expiry":      {Expires: &never},
	}
	for name, c := range widen {
		if _, err := f.m.Update(rec.ID, c, false); !errors.Is(err, ErrWidens) {
			t.Errorf("%s by a non-admin: %v, want ErrWidens", name, err)
		}
	}
	f.verify(t, key, req, Valid) // nothing changed

	sooner := f.clk.in(time.Hour)
	got, err := f.m.Update(rec.ID, Change{
		Permissions: []string{"orders:read", "*:read"},
		Limits:      &[]ratelimit.Layer{{Limit: 5, Per: time.Second, Burst: 5}, {Limit: 100, Per: time.Hour, Burst: 10}},
		AllowedIPs:  &[]netip.Prefix{netip.MustParsePrefix("10.9.0.0/16"), netip.MustParsePrefix("2001:db8:1::/48")},
		Expires:     &sooner,
	}, false)
	if err != nil {
		t.Fatalf("narrowing by a non-admin: %v", err)
	}
	if len(got.Limits) != 2 || !got.Expires.Equal(sooner) {
		t.Fatalf("the update was not applied: %+v", got)
	}
	// Effective from the very next verify of the cached key.
	f.verify(t, key, req, Forbidden)
	read := req
	read.Permissions = []string{"orders:read"}
	f.verify(t, key, read, Valid)
	read.SourceIP = netip.MustParseAddr("10.8.0.1")
	f.verify(t, key, read, IPNotAllowed)

	disabled := StateDisabled
	if _, err := f.m.Update(rec.ID, Change{State: &disabled}, false); err != nil {
		t.Fatal(err)
	}
	f.verify(t, key, req, Disabled)
	if _, err := f.m.Update(rec.ID, Change{State: &enabled}, false); !errors.Is(err, ErrWidens) {
		t.Errorf("enabling by a non-admin: %v, want ErrWidens", err)
	}
	// An admin may widen.
	if _, err := f.m.Update(rec.ID, Change{State: &enabled, Permissions: []string{"admin"}, AllowedIPs: &[]netip.Prefix{}}, true); err != nil {
		t.Fatal(err)
	}
	f.verify(t, key, Request{Environment: "prod", Permissions: []string{"orders:delete"}}, Valid)
	revoked := StateRevoked
	if _, err := f.m.Update(rec.ID, Change{State: &revoked}, true); !errors.Is(err, ErrInvalid) {
		t.Errorf("revoking through Update: %v, want ErrInvalid", err)
	}
}

// TestManagerReviewFixes: what an independent review found, fixed.
func TestManagerReviewFixes(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 2, Per: time.Hour, Burst: 2}}
	key, rec := f.create(t, s)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, RateLimited)
	// A change that keeps the limits does not refill them.
	active := Active
	if _, err := f.m.Update(rec.ID, Change{State: &active}, false); err != nil {
		t.Fatal(err)
	}
	f.verify(t, key, prod, RateLimited)

	// Another daemon's prefix costs no HSM call.
	before := f.mac.calls()
	foreign, _ := Generate("zz", strings.NewReader(strings.Repeat("y", 64)))
	f.verify(t, foreign, prod, NotFound)
	if f.mac.calls() != before {
		t.Error("a key with a foreign prefix cost an HSM call")
	}

	// Rotating with no overlap stops the old secret at once.
	old, rec2 := f.create(t, spec())
	fresh, _, err := f.m.Rotate(context.Background(), rec2.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.verify(t, old, prod, Expired)
	f.verify(t, fresh, prod, Valid)

	// An IPv4-mapped allowlist prefix would never match: refused.
	s = spec()
	s.AllowedIPs = []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/104")}
	if _, _, err := f.m.Create(context.Background(), s); !errors.Is(err, ErrInvalid) {
		t.Errorf("a mapped prefix: %v, want ErrInvalid", err)
	}
}

func TestManagerCreateMany(t *testing.T) {
	f := newFixture(t)
	bad := []Spec{spec(), spec(), spec()}
	bad[2].Permissions = nil
	if _, _, err := f.m.CreateMany(context.Background(), bad); !errors.Is(err, ErrInvalid) || !strings.HasPrefix(err.Error(), "key 2: ") {
		t.Fatalf("a batch with a bad spec: %v, want ErrInvalid naming key 2", err)
	}
	if recs, _, _ := f.m.List(Filter{}, "", 0); len(recs) != 0 {
		t.Fatalf("a refused batch wrote %d keys", len(recs))
	}
	specs := make([]Spec, 50)
	for i := range specs {
		specs[i] = spec()
		specs[i].Name = fmt.Sprint("k", i)
	}
	secrets, recs, err := f.m.CreateMany(context.Background(), specs)
	if err != nil {
		t.Fatal(err)
	}
	for i, key := range secrets {
		f.verify(t, key, prod, Valid)
		if got, err := f.m.Get(recs[i].ID); err != nil || got.Name != specs[i].Name || recs[i].Secrets[0].MAC != nil {
			t.Fatalf("key %d: %+v, %v; want %q and no MAC returned", i, got, err, specs[i].Name)
		}
	}
	if _, _, err := f.m.CreateMany(context.Background(), nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("an empty batch: %v", err)
	}
}

// TestManagerDefaultLimits: a key created without limits gets its role's;
// an empty list means none; the more powerful role decides.
func TestManagerDefaultLimits(t *testing.T) {
	f := newFixture(t)
	for _, c := range []struct {
		perms []string
		role  string
	}{
		{[]string{"read-only"}, "read-only"},
		{[]string{"read-only", "orders:write"}, "standard"},
		{[]string{"invoices:read"}, "read-only"},
		{[]string{"invoices:write"}, "standard"},
		{[]string{"*:*"}, "admin"},
		{[]string{"standard", "admin"}, "admin"},
	} {
		s := spec()
		s.Permissions = c.perms
		_, rec := f.create(t, s)
		if !slices.Equal(rec.Limits, DefaultLimits[c.role]) {
			t.Errorf("%v: limits %v, want %s's %v", c.perms, rec.Limits, c.role, DefaultLimits[c.role])
		}
	}
	s := spec()
	s.Limits = []ratelimit.Layer{}
	key, rec := f.create(t, s)
	if len(rec.Limits) != 0 {
		t.Errorf("an empty limit list gave %v, want none", rec.Limits)
	}
	if res := f.verify(t, key, prod, Valid); len(res.Limits.Layers) != 0 {
		t.Errorf("an unlimited key answered layers %v", res.Limits.Layers)
	}
	if _, err := NewManager(f.store, f.mac, pepper, Options{DefaultLimits: map[string][]ratelimit.Layer{"owner": nil}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("default limits for an unknown role: %v, want ErrInvalid", err)
	}
	twice := map[string][]ratelimit.Layer{"read-only": {{Limit: 1, Per: time.Hour, Burst: 1}, {Limit: 1000, Per: time.Hour, Burst: 1000}}}
	if _, err := NewManager(f.store, f.mac, pepper, Options{DefaultLimits: twice}); !errors.Is(err, ErrInvalid) {
		t.Errorf("default limits with a period twice: %v, want ErrInvalid", err)
	}
	if _, err := NewManager(f.store, f.mac, pepper, Options{NearLimit: 1.5}); !errors.Is(err, ErrInvalid) {
		t.Errorf("a near-limit threshold of 1.5: %v, want ErrInvalid", err)
	}
}

// TestManagerVerifyAnswer: a verification names the key, its owner,
// permissions, metadata, and every layer's state, with the near-limit flag
// at the configured threshold; never a MAC.
func TestManagerVerifyAnswer(t *testing.T) {
	f := newFixture(t)
	m, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, NearLimit: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	f.m = m
	s := spec()
	s.Metadata = map[string]string{"customer": "42"}
	s.Limits = []ratelimit.Layer{{Limit: 10, Per: time.Second, Burst: 4}, {Limit: 100, Per: time.Hour, Burst: 100}}
	s.Quota = &Quota{Remaining: 50}
	key, rec := f.create(t, s)
	res := f.verify(t, key, prod, Valid)
	k := res.Key
	if k == nil || k.ID != rec.ID || k.Owner != "team-a" || k.Metadata["customer"] != "42" || !slices.Equal(k.Permissions, s.Permissions) {
		t.Fatalf("the answer's key is %+v", k)
	}
	if k.Secrets != nil || k.Quota.Remaining != 49 {
		t.Errorf("the answer holds secrets %v and quota %+v; want none and 49", k.Secrets, k.Quota)
	}
	if l := res.Limits.Layers; len(l) != 2 || l[0].Remaining != 3 || l[1].Remaining != 99 || res.Limits.NearLimit {
		t.Errorf("after one use: %+v", res.Limits)
	}
	res = f.verify(t, key, prod, Valid) // 2 of 4 used: the 50 % threshold
	if !res.Limits.NearLimit {
		t.Errorf("2 of a burst of 4 used with a threshold of 0.5: not near the limit")
	}
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, Valid)
	res = f.verify(t, key, prod, RateLimited)
	if res.Limits.RetryAfter != 100*time.Millisecond || !res.Limits.Layers[0].Refused || res.Limits.Layers[1].Refused || res.Key.Quota.Remaining != 46 {
		t.Errorf("refused: %+v, quota %+v", res.Limits, res.Key.Quota)
	}

	// A caller that may not verify this owner's keys finds nothing and
	// uses nothing.
	other := prod
	other.Owners = func(o string) bool { return o == "team-b" }
	if res := f.verify(t, key, other, NotFound); res.Key != nil {
		t.Errorf("a NOT_FOUND answer named the key %q", res.Key.ID)
	}
	got, _ := f.m.Get(rec.ID)
	if got.Quota.Remaining != 46 {
		t.Errorf("a foreign caller's verify used the quota: %d left", got.Quota.Remaining)
	}
	if recs, _, _ := f.m.List(Filter{Owners: other.Owners}, "", 0); len(recs) != 0 {
		t.Errorf("List showed %d keys of an owner the caller may not see", len(recs))
	}
	if n, _ := f.m.RevokeWhere(Filter{Environment: "prod", Owners: other.Owners}, false); n != 0 {
		t.Errorf("RevokeWhere revoked %d keys of an owner the caller may not see", n)
	}
}

// TestManagerBulkRevoke10k: revoke-all of 10 000 keys: the dry runs count
// right (all, and one owner's), and every key is refused from the very
// next verify, cached or not, and across a restart.
func TestManagerBulkRevoke10k(t *testing.T) {
	f := newFixture(t)
	specs := make([]Spec, MaxCreateBatch)
	for i := range specs {
		specs[i] = spec()
		specs[i].Owner = "leaky-team"
	}
	secrets, _, err := f.m.CreateMany(context.Background(), specs)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := f.create(t, spec())
	for _, k := range secrets[:100] {
		f.verify(t, k, prod, Valid) // cached now
	}
	if n, err := f.m.RevokeWhere(Filter{Owner: "leaky-team"}, true); err != nil || n != len(secrets) {
		t.Fatalf("dry run of one owner = %d, %v", n, err)
	}
	if n, err := f.m.RevokeWhere(Filter{All: true}, true); err != nil || n != len(secrets)+1 {
		t.Fatalf("dry run of all = %d, %v; want %d", n, err, len(secrets)+1)
	}
	f.verify(t, other, prod, Valid) // the dry runs changed nothing
	start := time.Now()
	n, err := f.m.RevokeWhere(Filter{All: true}, false)
	if err != nil || n != len(secrets)+1 {
		t.Fatalf("RevokeWhere(all) = %d, %v; want %d", n, err, len(secrets)+1)
	}
	t.Logf("revoked %d keys in %v", n, time.Since(start))
	for _, k := range append(secrets, other) {
		f.verify(t, k, prod, Revoked)
	}
	if n, err := f.m.RevokeWhere(Filter{All: true}, true); err != nil || n != 0 {
		t.Fatalf("dry run after = %d, %v; want 0", n, err)
	}
	f.reopen(t)
	for _, k := range []string{secrets[0], secrets[len(secrets)/2], secrets[len(secrets)-1], other} {
		f.verify(t, k, prod, Revoked)
	}
}

// TestManagerRotatePrunes: a key keeps at most MaxSecrets; a rotated-out
// secret reads EXPIRED for RotatedGrace, then NOT_FOUND, and its index
// entry goes.
func TestManagerRotatePrunes(t *testing.T) {
	f := newFixture(t)
	first, rec := f.create(t, spec())
	ctx := context.Background()
	second, _, err := f.m.Rotate(ctx, rec.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.verify(t, first, prod, Expired)
	f.clk.add(RotatedGrace + time.Second)
	if _, _, err := f.m.Rotate(ctx, rec.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	f.verify(t, first, prod, NotFound)
	f.verify(t, second, prod, Valid) // in its overlap
	macFirst, _ := f.h.HMACSHA256(ctx, pepper, []byte(first))
	if _, err := f.store.Get(store.BucketAPIKeyMACs, hex.EncodeToString(macFirst)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a pruned secret's index entry is still there: %v", err)
	}
	// Secrets in their overlap are never pruned: once a key has as many as
	// it keeps, a rotation that would keep them all is refused.
	var keys []string
	for {
		k, _, err := f.m.Rotate(ctx, rec.ID, time.Hour)
		if err != nil {
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "still in their overlap") {
				t.Fatal(err)
			}
			break
		}
		keys = append(keys, k)
		if len(keys) > 2*MaxSecrets {
			t.Fatal("rotations without end")
		}
	}
	got, _ := f.m.Get(rec.ID)
	if len(got.Secrets) != MaxSecrets {
		t.Fatalf("%d secrets when rotation was refused, want %d", len(got.Secrets), MaxSecrets)
	}
	for _, k := range append([]string{second}, keys...) {
		f.verify(t, k, prod, Valid) // none pruned inside its overlap
	}
	// Overlap 0 ends them: they stay recognized as EXPIRED, and go only
	// when a later rotation needs room or their grace has passed.
	last, _, err := f.m.Rotate(ctx, rec.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.verify(t, keys[len(keys)-1], prod, Expired)
	f.verify(t, second, prod, NotFound) // the oldest, dropped to make room
	f.clk.add(RotatedGrace + time.Second)
	if _, _, err := f.m.Rotate(ctx, rec.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	f.verify(t, keys[len(keys)-1], prod, NotFound)
	f.verify(t, last, prod, Valid)
	if got, _ := f.m.Get(rec.ID); len(got.Secrets) != 2 {
		t.Errorf("%d secrets after the grace, want 2", len(got.Secrets))
	}
}

// TestManagerNames: owners are names the policy's globs can match, and a
// permission's parts are names or "*" alone.
func TestManagerNames(t *testing.T) {
	f := newFixture(t)
	for _, bad := range []func(*Spec){
		func(s *Spec) { s.Owner = "team/a" },
		func(s *Spec) { s.Owner = "team-*" },
		func(s *Spec) { s.Owner = "team a" },
		func(s *Spec) { s.Permissions = []string{"ord*:read"} },
		func(s *Spec) { s.Permissions = []string{"orders:*read"} },
		func(s *Spec) { s.Permissions = []string{"Orders:read"} },
	} {
		s := spec()
		bad(&s)
		if _, _, err := f.m.Create(context.Background(), s); !errors.Is(err, ErrInvalid) {
			t.Errorf("owner %q permissions %q: %v, want ErrInvalid", s.Owner, s.Permissions, err)
		}
	}
	s := spec()
	s.Owner, s.Permissions = "billing@example.com", []string{"*:read", "orders.v2:*"}
	f.create(t, s)
}

// TestManagerUpdateKeepsLimiter: reordering or narrowing a key's layers
// hands out no fresh bucket (a caller who may only narrow cannot reset its
// limits by updating them).
func TestManagerUpdateKeepsLimiter(t *testing.T) {
	f := newFixture(t)
	s := spec()
	// The hour layer never refuses; the day layer is used up.
	s.Limits = []ratelimit.Layer{{Limit: 100, Per: time.Hour, Burst: 100}, {Limit: 10, Per: 24 * time.Hour, Burst: 2}}
	key, rec := f.create(t, s)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, Valid)
	f.verify(t, key, prod, RateLimited)
	cur := slices.Clone(s.Limits)
	for i := range 10 {
		if i%2 == 0 {
			slices.Reverse(cur)
		} else {
			j := slices.IndexFunc(cur, func(l ratelimit.Layer) bool { return l.Per == 24*time.Hour })
			cur[j].Limit = cur[j].Limit - 1 // and the burst at most 2
		}
		l := slices.Clone(cur)
		if _, err := f.m.Update(rec.ID, Change{Limits: &l}, false); err != nil {
			t.Fatalf("update %d: %v", i, err)
		}
		f.verify(t, key, prod, RateLimited)
	}
}

// TestManagerHints: a well-formed key nobody issued costs no HSM call; in
// a store marked legacy, a key issued before hints still verifies.
func TestManagerHints(t *testing.T) {
	f := newFixture(t)
	key, _ := f.create(t, spec())
	for range 3 {
		stranger, err := Generate("kwtest", rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		before := f.mac.calls()
		f.verify(t, stranger, prod, NotFound)
		if f.mac.calls() != before {
			t.Fatalf("a stranger's key cost %d HSM calls", f.mac.calls()-before)
		}
	}
	// A key from before hints: without its hint it is a stranger, unless
	// the store says it holds such keys.
	if err := f.store.Update(store.BucketAPIKeyHints, f.m.hint(key), func([]byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	f.verify(t, key, prod, NotFound)
	if err := f.store.Update(store.BucketAPIKeyHints, store.LegacyAPIKeys, func([]byte) ([]byte, error) { return []byte{1}, nil }); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	f.verify(t, key, prod, Valid)
}

// FuzzVerify: whatever a client presents, Verify answers without a panic;
// only the issued key is VALID, nothing malformed costs an HSM call, and
// the answer's detail never repeats what was presented.
func FuzzVerify(f *testing.F) {
	fx := newFixture(f)
	key, _ := fx.create(f, benchSpec()) // unlimited: the fixture's clock stands still
	f.Add(key)
	f.Add(key[:len(key)-1])
	f.Add(key + "x")
	f.Add("")
	f.Add("kwtest_")
	f.Add(strings.Repeat("a", 10_000))
	f.Add(strings.ToUpper(key))
	f.Fuzz(func(t *testing.T, presented string) {
		before := fx.mac.calls()
		res := fx.m.Verify(context.Background(), presented, prod)
		switch {
		case presented == key:
			if res.Code != Valid {
				t.Fatalf("the issued key: %s", res.Code)
			}
		case res.Code == Valid:
			t.Fatalf("%q verified as the issued key", presented)
		}
		if res.Code == Malformed && fx.mac.calls() != before {
			t.Fatal("a malformed key cost an HSM call")
		}
		if len(presented) > 8 && strings.Contains(res.Detail, presented) {
			t.Fatalf("the detail repeats what was presented: %q", res.Detail)
		}
	})
}

// TestManagerRevokeAll: the emergency brake: every key, in one call, and
// the dry run counts them right; a caller's owner scope still applies.
func TestManagerRevokeAll(t *testing.T) {
	f := newFixture(t)
	var keys []string
	for _, owner := range []string{"a", "a", "b"} {
		s := spec()
		s.Owner = owner
		k, _ := f.create(t, s)
		keys = append(keys, k)
	}
	if _, err := f.m.RevokeWhere(Filter{All: true, Owner: "a"}, false); !errors.Is(err, ErrInvalid) {
		t.Errorf("all and an owner: %v", err)
	}
	onlyA := func(o string) bool { return o == "a" }
	if n, err := f.m.RevokeWhere(Filter{All: true, Owners: onlyA}, true); n != 2 || err != nil {
		t.Fatalf("dry run of all, scoped to a: %d, %v", n, err)
	}
	if n, err := f.m.RevokeWhere(Filter{All: true}, true); n != 3 || err != nil {
		t.Fatalf("dry run of all: %d, %v", n, err)
	}
	if n, err := f.m.RevokeWhere(Filter{All: true}, false); n != 3 || err != nil {
		t.Fatalf("revoke all: %d, %v", n, err)
	}
	for _, k := range keys {
		f.verify(t, k, prod, Revoked)
	}
}

// heldDuringReads is the store with m.mu held while each read's callback
// runs, as a store write under m.mu (revokeBatch) holds it while it waits
// for reads to end (bbolt's growth of its map waits for every read
// transaction): a callback that waits for m.mu then never returns.
type heldDuringReads struct {
	*store.Store
	mu      *sync.Mutex
	blocked atomic.Bool
}

func (s *heldDuringReads) ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error {
	return s.Store.ForEachAfter(bucket, after, func(k string, b []byte) error {
		s.mu.Lock()
		done := make(chan error, 1)
		go func() { done <- fn(k, b) }()
		select {
		case err := <-done:
			s.mu.Unlock()
			return err
		case <-time.After(time.Second):
			s.blocked.Store(true)
			s.mu.Unlock() // let it go, and fail the test
			return <-done
		}
	})
}

// TestListTakesNoLockInARead: List's walk of the store never waits for the
// Manager's lock (a bulk revocation, holding it around a write that grew
// the file, and the names' survey listing keys deadlocked keywardd).
func TestListTakesNoLockInARead(t *testing.T) {
	f := newFixture(t)
	for i := range 3 {
		f.create(t, Spec{Owner: "shop", Name: fmt.Sprint("k", i), Environment: "prod", Permissions: []string{"read-only"}})
	}
	held := &heldDuringReads{Store: f.store}
	m, err := NewManager(held, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, Geo: f.geo})
	if err != nil {
		t.Fatal(err)
	}
	held.mu = &m.mu
	recs, _, err := m.List(Filter{}, "", 10)
	if err != nil || len(recs) != 3 {
		t.Fatalf("List: %d records, %v", len(recs), err)
	}
	if held.blocked.Load() {
		t.Error("List's callback waited for m.mu inside the store's read")
	}
}

// outboxKinds is the outbox's events as "kind id".
func (f *fixture) outboxKinds(t *testing.T) []string {
	t.Helper()
	var out []string
	f.store.ForEachAfter(store.BucketOutbox, "", func(_ string, b []byte) error {
		var e outbox.Event
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		out = append(out, e.Kind+" "+e.ID)
		return nil
	})
	return out
}

// TestChangeEvents: each change a verdict depends on writes its event, in
// the change's transaction; an update that changes nothing writes none;
// an expiry within the coming days is announced once.
func TestChangeEvents(t *testing.T) {
	f := newFixture(t)
	_, rec := f.create(t, spec())
	disabled, active := StateDisabled, Active
	if _, err := f.m.Update(rec.ID, Change{State: &active}, true); err != nil { // already active
		t.Fatal(err)
	}
	if _, err := f.m.Update(rec.ID, Change{State: &disabled}, true); err != nil {
		t.Fatal(err)
	}
	if _, err := f.m.Update(rec.ID, Change{State: &active}, true); err != nil {
		t.Fatal(err)
	}
	soon := f.clk.now().Add(72 * time.Hour)
	if _, err := f.m.Update(rec.ID, Change{Expires: &soon}, true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.m.Rotate(context.Background(), rec.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second look finds it announced
		if ids, err := f.m.NoticeExpiring(7 * 24 * time.Hour); err != nil {
			t.Fatal(err)
		} else if len(ids) > 1 {
			t.Fatalf("NoticeExpiring: %v", ids)
		}
	}
	f.create(t, spec()) // no expiry within the week
	if ids, _ := f.m.NoticeExpiring(7 * 24 * time.Hour); len(ids) != 0 {
		t.Errorf("a third look announced %v", ids)
	}
	want := []string{"api_key_disabled " + rec.ID, "api_key_enabled " + rec.ID, "api_key_updated " + rec.ID, "api_key_rotated " + rec.ID, "api_key_expiring " + rec.ID}
	if got := f.outboxKinds(t); strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("events %v; want %v", got, want)
	}
}
