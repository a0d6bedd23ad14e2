package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

func TestLatencyBucket(t *testing.T) {
	last := len(LatencyBounds) - 1
	cases := []struct {
		took time.Duration
		want int
	}{
		{0, 0},
		{-time.Microsecond, 0}, // never from a monotonic clock; still a bucket
		{time.Microsecond, 0},
		{10 * time.Microsecond, 0},
		{10*time.Microsecond + 1, 1},
		{30 * time.Microsecond, 2},
		{time.Millisecond, 6},
		{time.Millisecond + 1, 7},
		{3 * time.Millisecond, 8},
		{time.Second, last},
		{time.Second + 1, last + 1},
		{time.Hour, last + 1},
	}
	for _, c := range cases {
		if got := latencyBucket(c.took); got != c.want {
			t.Errorf("latencyBucket(%v) = %d, want %d", c.took, got, c.want)
		}
	}
	// Every bound is its own bucket's; a nanosecond more is the next's.
	for i, b := range LatencyBounds {
		if latencyBucket(b) != i || latencyBucket(b+1) != i+1 {
			t.Errorf("bound %v: buckets %d and %d, want %d and %d", b, latencyBucket(b), latencyBucket(b+1), i, i+1)
		}
		if i > 0 && b <= LatencyBounds[i-1] {
			t.Errorf("bound %v is not above %v", b, LatencyBounds[i-1])
		}
	}
}

func TestLatencyQuantile(t *testing.T) {
	at := func(counts map[int]int64) []int64 {
		h := make([]int64, LatencyBuckets)
		for i, n := range counts {
			h[i] = n
		}
		return h
	}
	le := func(d time.Duration) string { return "≤" + d.String() }
	cases := []struct {
		name   string
		counts []int64
		q      float64
		want   string // "" for no estimate
	}{
		{"empty", at(nil), 0.5, ""},
		{"nil", nil, 0.5, ""},
		{"short", []int64{1, 2, 3}, 0.5, ""},
		{"q zero", at(map[int]int64{0: 1}), 0, ""},
		{"q above one", at(map[int]int64{0: 1}), 1.5, ""},
		{"q NaN", at(map[int]int64{0: 1}), float64NaN(), ""},
		{"one", at(map[int]int64{3: 1}), 0.5, le(100 * time.Microsecond)},
		{"one, p99", at(map[int]int64{3: 1}), 0.99, le(100 * time.Microsecond)},
		{"median of 100", at(map[int]int64{0: 50, 6: 49, 9: 1}), 0.5, le(10 * time.Microsecond)},
		{"median past half", at(map[int]int64{0: 49, 6: 50, 9: 1}), 0.5, le(time.Millisecond)},
		{"p99 of 100", at(map[int]int64{0: 98, 6: 1, 9: 1}), 0.99, le(time.Millisecond)},
		{"p100", at(map[int]int64{0: 98, 6: 1, 9: 1}), 1, le(10 * time.Millisecond)},
		{"p99 of 1000 with a slow tail", at(map[int]int64{0: 980, 4: 15, 12: 5}), 0.99, le(250 * time.Microsecond)},
		{"p99 in the tail", at(map[int]int64{0: 980, 4: 5, 12: 15}), 0.99, le(100 * time.Millisecond)},
		{"overflow", at(map[int]int64{0: 1, LatencyBuckets - 1: 3}), 0.5, ">1s"},
		{"negative counts are none", at(map[int]int64{0: -5, 2: 1}), 0.5, le(50 * time.Microsecond)},
		{"only negative", at(map[int]int64{0: -5}), 0.5, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e, ok := LatencyQuantile(LatencyBounds[:], c.counts, c.q)
			got := ""
			if ok {
				got = e.String()
			}
			if got != c.want {
				t.Errorf("LatencyQuantile(%v, %v) = %q (ok %v), want %q", c.counts, c.q, got, ok, c.want)
			}
		})
	}
	// Other bounds: what a client got from the API.
	if e, ok := LatencyQuantile([]time.Duration{time.Millisecond}, []int64{0, 2}, 0.5); !ok || e != (LatencyEstimate{Bound: time.Millisecond, Over: true}) {
		t.Errorf("one bound, all over: %v %v", e, ok)
	}
	if _, ok := LatencyQuantile(nil, []int64{1}, 0.5); ok {
		t.Error("no bounds: an estimate")
	}
}

func float64NaN() float64 {
	var zero float64
	return zero / zero
}

// TestHourUsageLatencyJSON: the stored hour with and without its latency,
// and with one that does not fit the bounds.
func TestHourUsageLatencyJSON(t *testing.T) {
	var h HourUsage
	h.Latency[0], h.Latency[LatencyBuckets-1] = 3, 1
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	want := `"latency":[3` + strings.Repeat(",0", LatencyBuckets-2) + `,1]`
	if !strings.Contains(string(b), want) {
		t.Errorf("stored as %s, want %s in it", b, want)
	}
	var back HourUsage
	if err := json.Unmarshal(b, &back); err != nil || back.Latency != h.Latency {
		t.Errorf("read back %v, %v", back.Latency, err)
	}
	if b, _ := json.Marshal(HourUsage{Counts: map[Code]int64{Valid: 1}}); strings.Contains(string(b), "latency") {
		t.Errorf("an hour without latency is stored with it: %s", b)
	}

	hour := `{"hour":"2026-11-29T12:00:00Z","counts":{"VALID":4},"networks":{"unknown":4},"last":"2026-11-29T12:10:00Z"%s}`
	for _, c := range []struct{ name, field string }{
		{"old, without", ""},
		{"null", `,"latency":null`},
		{"empty", `,"latency":[]`},
		{"shorter", `,"latency":[1,2,1]`},
		{"longer", `,"latency":[` + strings.Repeat("1,", LatencyBuckets) + `0]`},
		{"negative", `,"latency":[-1` + strings.Repeat(",1", LatencyBuckets-1) + `]`},
	} {
		var h HourUsage
		if err := json.Unmarshal(fmt.Appendf(nil, hour, c.field), &h); err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if h.Latency != (LatencyHistogram{}) || h.Counts[Valid] != 4 || h.Networks[UnknownNetwork] != 4 || h.Last.IsZero() {
			t.Errorf("%s: read as %+v, want the counts and no latency", c.name, h)
		}
	}
	if err := json.Unmarshal(fmt.Appendf(nil, hour, `,"latency":"fast"`), &h); err == nil {
		t.Error("a latency that is not an array of counts: no error")
	}
}

// slowMAC is the real HSM, answering after a delay (a busy network HSM).
type slowMAC struct {
	MACer
	delay time.Duration
}

func (s slowMAC) HMACSHA256(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, error) {
	time.Sleep(s.delay)
	return s.MACer.HMACSHA256(ctx, id, msg)
}

// latencySum is how many verifications a histogram counts.
func latencySum(h []int64) int64 {
	var n int64
	for _, c := range h {
		n += c
	}
	return n
}

func countSum(c map[Code]int64) int64 {
	var n int64
	for _, v := range c {
		n += v
	}
	return n
}

// TestUsageLatency: every verification of a known key is counted in its
// hour's latency, pending and flushed, across a restart; each hour's
// histogram counts as many as its outcomes.
func TestUsageLatency(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	other, _ := f.create(t, spec())
	for range 7 {
		f.verify(t, key, prod, Valid)
	}
	f.verify(t, key, Request{Environment: "dev", Permissions: prod.Permissions}, WrongEnvironment)
	f.verify(t, other, prod, Valid)
	f.verify(t, "kwtest_"+strings.Repeat("a", 32), prod, Malformed) // no key: not counted
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	f.clk.add(time.Hour)
	for range 5 {
		f.verify(t, key, prod, Valid)
	}
	check := func(when string, wantHours ...int64) {
		t.Helper()
		u, err := f.m.GetUsage(rec.ID, 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Hours) != len(wantHours) {
			t.Fatalf("%s: %d hours, want %d", when, len(u.Hours), len(wantHours))
		}
		var total int64
		for i, h := range u.Hours {
			if n := latencySum(h.Latency[:]); n != wantHours[i] || n != countSum(h.Counts) {
				t.Errorf("%s: hour %v: latency counts %d verifications (%v), outcomes %d; want %d", when, h.Hour, n, h.Latency, countSum(h.Counts), wantHours[i])
			}
			total += wantHours[i]
		}
		if n := latencySum(u.Latency[:]); n != total {
			t.Errorf("%s: total latency counts %d, want %d", when, n, total)
		}
		if _, ok := LatencyQuantile(LatencyBounds[:], u.Latency[:], 0.99); !ok {
			t.Errorf("%s: no p99 from %v", when, u.Latency)
		}
	}
	check("flushed and pending", 8, 5)
	if err := f.m.Flush(); err != nil {
		t.Fatal(err)
	}
	f.reopen(t)
	check("after a restart", 8, 5)
	f.verify(t, key, prod, Valid)
	check("more pending", 8, 6)
}

// TestUsageLatencySpansTheHSM: a verification's latency runs from the
// call's start to its decision on the monotonic clock, the HSM call
// included (the fixture's clock stands still).
func TestUsageLatencySpansTheHSM(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	const delay = 30 * time.Millisecond
	m, err := NewManager(f.store, slowMAC{MACer: f.h, delay: delay}, pepper, Options{Prefix: "kwtest", Now: f.clk.now})
	if err != nil {
		t.Fatal(err)
	}
	if res := m.Verify(context.Background(), key, prod); res.Code != Valid {
		t.Fatalf("Verify = %s (%s)", res.Code, res.Detail)
	}
	u, err := m.GetUsage(rec.ID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	slow := latencyBucket(delay)
	if latencySum(u.Latency[:]) != 1 || latencySum(u.Latency[slow:]) != 1 {
		t.Fatalf("a verification that waited %v for the HSM counted in %v, want one in bucket %d (≤%v) or above", delay, u.Latency, slow, LatencyBounds[slow])
	}
}

// TestUsageLatencyMerges: a flush adds the latency counted to the hour's
// record: one written before keyward measured latency, one whose latency
// fits no bounds (replaced by what was measured since), and one whose
// flush failed (put back, written by the next).
func TestUsageLatencyMerges(t *testing.T) {
	f := newFixture(t)
	hour := f.clk.now().UTC().Truncate(time.Hour)
	put := func(id, latency string) {
		t.Helper()
		rec := fmt.Sprintf(`{"hour":%q,"counts":{"VALID":10},"networks":{"unknown":10}%s,"last":%q}`,
			hour.Format(time.RFC3339), latency, hour.Format(time.RFC3339))
		if err := f.store.Update(store.BucketAPIKeyUsage, hourKey(id, hour.Unix()), func([]byte) ([]byte, error) { return []byte(rec), nil }); err != nil {
			t.Fatal(err)
		}
	}
	old, recOld := f.create(t, spec())
	put(recOld.ID, "")
	odd, recOdd := f.create(t, spec())
	put(recOdd.ID, `,"latency":[4,4,2]`)
	for range 3 {
		f.verify(t, old, prod, Valid)
		f.verify(t, odd, prod, Valid)
	}
	fs := &failing{Store: f.store, fail: true}
	m := f.m
	m.store = fs // the flush fails: its counts are put back
	if err := m.Flush(); err == nil {
		t.Fatal("a flush to a failing store: no error")
	}
	f.verify(t, old, prod, Valid)
	f.verify(t, odd, prod, Valid)
	fs.fail = false
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(m.usage.pending) != 0 {
		t.Fatalf("%d keys still pending", len(m.usage.pending))
	}
	for _, id := range []string{recOld.ID, recOdd.ID} {
		b, err := f.store.Get(store.BucketAPIKeyUsage, hourKey(id, hour.Unix()))
		if err != nil {
			t.Fatal(err)
		}
		var h HourUsage
		if err := json.Unmarshal(b, &h); err != nil {
			t.Fatal(err)
		}
		if h.Counts[Valid] != 14 || latencySum(h.Latency[:]) != 4 {
			t.Errorf("%s's hour after the flushes: %d VALID, latency %v; want 14, of which the 4 measured", id, h.Counts[Valid], h.Latency)
		}
		u, err := m.GetUsage(id, time.Hour)
		if err != nil || u.Counts[Valid] != 14 || latencySum(u.Latency[:]) != 4 {
			t.Errorf("%s's usage: %+v, %v", id, u, err)
		}
	}
}

// TestUsageLatencyFleet: the nodes of a fleet each measure their own
// verifications (a key with rate limits: through the fleet's blocks) and
// their flushes add up in the shared record.
func TestUsageLatencyFleet(t *testing.T) {
	f := newFixture(t)
	key, rec := f.create(t, spec())
	nodes, _ := fleetOf(t, f, 3)
	for i, m := range nodes {
		for range i + 2 {
			if res := m.Verify(context.Background(), key, prod); res.Code != Valid {
				t.Fatalf("node %d: Verify = %s (%s)", i, res.Code, res.Detail)
			}
		}
	}
	for _, m := range nodes {
		if err := m.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	u, err := nodes[0].GetUsage(rec.ID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if u.Counts[Valid] != 9 || latencySum(u.Latency[:]) != 9 || len(u.Hours) != 1 || latencySum(u.Hours[0].Latency[:]) != 9 {
		t.Fatalf("the fleet's usage: %v, latency %v; want 9 VALID, 9 measured", u.Counts, u.Latency)
	}
}

// FuzzHourUsage: a stored hour never panics its reader; what reads has a
// latency of the bounds' length, no negative count, and is stored again as
// it was read.
func FuzzHourUsage(f *testing.F) {
	f.Add([]byte(`{"hour":"2026-11-29T12:00:00Z","counts":{"VALID":4},"last":"2026-11-29T12:10:00Z"}`))
	f.Add([]byte(`{"hour":"2026-11-29T12:00:00Z","counts":{"VALID":2},"latency":[1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1],"last":"2026-11-29T12:10:00Z"}`))
	f.Add([]byte(`{"latency":[1,2]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var h HourUsage
		if json.Unmarshal(b, &h) != nil {
			return
		}
		for _, n := range h.Latency {
			if n < 0 {
				t.Fatalf("read a negative count: %v", h.Latency)
			}
		}
		again, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		var back HourUsage
		if err := json.Unmarshal(again, &back); err != nil || back.Latency != h.Latency {
			t.Fatalf("stored again as %s: %v, %v", again, back.Latency, err)
		}
	})
}
