package apikeys

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

func from(ip string) Request {
	r := prod
	r.SourceIP = netip.MustParseAddr(ip)
	return r
}

func TestUsageCountsAndPersists(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	for _, ip := range []string{"192.0.2.1", "192.0.2.200", "198.51.100.7", "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "::ffff:192.0.2.9"} {
		f.verify(t, key, from(ip), Valid)
	}
	f.verify(t, key, Request{Environment: "prod", Permissions: []string{"orders:write"}}, Forbidden)
	check := func(u *Usage) {
		t.Helper()
		want := map[string]int64{"192.0.2.0/24": 3, "198.51.100.0/24": 1, "2001:db8:1:2::/64": 2, UnknownNetwork: 1}
		if fmt.Sprint(u.Networks) != fmt.Sprint(want) {
			t.Errorf("networks %v, want %v", u.Networks, want)
		}
		if u.Counts[Valid] != 6 || u.Counts[Forbidden] != 1 || len(u.Counts) != 2 {
			t.Errorf("counts %v, want 6 VALID and 1 FORBIDDEN", u.Counts)
		}
		if !u.LastUsed.Equal(f.clk.now()) || len(u.Hours) != 1 {
			t.Errorf("last used %v, %d hours; want %v and 1", u.LastUsed, len(u.Hours), f.clk.now())
		}
	}
	u, err := f.m.GetUsage(rec.ID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	check(u) // pending only
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	if u, err = f.m.GetUsage(rec.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	check(u) // from the store, after a restart

	// Flushed and pending add up; hours split; the window picks hours.
	f.verify(t, key, prod, Valid)
	f.clk.add(3 * time.Hour)
	f.verify(t, key, prod, Valid)
	f.m.Flush()
	f.verify(t, key, prod, Valid)
	if u, _ = f.m.GetUsage(rec.ID, 24*time.Hour); u.Counts[Valid] != 9 || len(u.Hours) != 2 {
		t.Errorf("a day: %v in %d hours, want 9 VALID in 2", u.Counts, len(u.Hours))
	}
	if u, _ = f.m.GetUsage(rec.ID, time.Hour); u.Counts[Valid] != 2 || len(u.Hours) != 1 {
		t.Errorf("the last hour: %v in %d hours, want 2 VALID in 1", u.Counts, len(u.Hours))
	}
	if _, err := f.m.GetUsage(rec.ID, 30*24*time.Hour); !errors.Is(err, ErrInvalid) {
		t.Errorf("a window past retention: %v, want ErrInvalid", err)
	}

	// Past retention, the hours go at the next flush; the last use stays.
	f.m.Flush()
	f.clk.add(UsageRetention + time.Hour)
	other, rec2 := f.create(t, spec())
	f.verify(t, other, prod, Valid)
	f.m.Flush()
	if n := f.records(t, rec.ID); n != 3 {
		t.Errorf("an unused key's usage records: %d, want its 2 hours and last use until it is used again", n)
	}
	f.verify(t, key, prod, Valid)
	f.m.Flush()
	if n := f.records(t, rec.ID); n != 2 {
		t.Errorf("usage records after retention: %d, want the new hour and the last use", n)
	}
	if u, _ = f.m.GetUsage(rec2.ID, time.Hour); u.Counts[Valid] != 1 {
		t.Errorf("the other key: %v", u.Counts)
	}
}

func (f *fixture) records(t *testing.T, id string) int {
	n := 0
	f.store.ForEach(store.BucketAPIKeyUsage, id+"/", func(string, []byte) error { n++; return nil })
	return n
}

func TestUsageNetworksBounded(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	for i := range 40 {
		f.verify(t, key, from(fmt.Sprintf("10.%d.0.1", i)), Valid)
	}
	u, _ := f.m.GetUsage(rec.ID, time.Hour)
	if len(u.Networks) != maxNetworks+1 || u.Networks[OtherNetworks] != 40-maxNetworks {
		t.Fatalf("%d networks, %d other; want %d and %d", len(u.Networks), u.Networks[OtherNetworks], maxNetworks+1, 40-maxNetworks)
	}
}

// failing fails UpdateEach while fail is set.
type failing struct {
	*store.Store
	fail bool
}

func (s *failing) UpdateEach(b string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	if s.fail {
		return errors.New("disk full")
	}
	return s.Store.UpdateEach(b, keys, fn)
}

// TestUsageFlushFailureLosesNothing: counts a failed flush took are
// pending again, and the next flush writes them.
func TestUsageFlushFailureLosesNothing(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	fs := &failing{Store: f.store}
	m, err := NewManager(fs, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if m.Verify(context.Background(), key, prod).Code != Valid {
			t.Fatal("verify failed")
		}
	}
	fs.fail = true
	if err := m.Flush(); err == nil {
		t.Fatal("FlushUsage on a failing store: no error")
	}
	m.Verify(context.Background(), key, prod)
	fs.fail = false
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	if u, _ := m.GetUsage(rec.ID, time.Hour); u.Counts[Valid] != 4 || len(m.usage.pending) != 0 {
		t.Fatalf("after a failed and a good flush: %v, %d pending; want 4 VALID, 0", u.Counts, len(m.usage.pending))
	}
}

func TestRunFlusherFlushesAtEnd(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.m.RunFlusher(ctx, time.Hour, func(err error) { t.Error(err) }); close(done) }()
	f.verify(t, key, prod, Valid)
	cancel()
	<-done
	if n := f.records(t, rec.ID); n != 2 {
		t.Fatalf("usage records after RunFlusher ended: %d, want 2", n)
	}
}

// TestUsageBadRecordDoesNotStopFlush: an unreadable usage record is
// replaced; the other keys' usage is still written.
func TestUsageBadRecordDoesNotStopFlush(t *testing.T) {
	f := newFixture(t)
	a, recA := f.create(t, spec())
	b, recB := f.create(t, spec())
	f.verify(t, a, prod, Valid)
	f.verify(t, b, prod, Valid)
	if err := f.store.Update(store.BucketAPIKeyUsage, recA.ID+"/"+usageLastKey, func([]byte) ([]byte, error) { return []byte("{not json"), nil }); err != nil {
		t.Fatal(err)
	}
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{recA.ID, recB.ID} {
		if u, err := f.m.GetUsage(id, time.Hour); err != nil || u.Counts[Valid] != 1 || u.LastUsed.IsZero() {
			t.Errorf("%s after a flush over a bad record: %+v, %v", id, u, err)
		}
	}
}
