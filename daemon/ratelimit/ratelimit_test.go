package ratelimit

import (
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 29, 0, 0, 0, 0, time.UTC)

// TestAccuracy: 100/s with bursts of 20, offered 1 000/s for 10 s, accepts
// 1 020 (±5 %); another key is unaffected.
func TestAccuracy(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 100, Per: time.Second, Burst: 20}}
	accepted := 0
	for i := range 10000 {
		now := t0.Add(time.Duration(i) * time.Millisecond)
		if lim.Allow("a", layers, 1, now).Allowed {
			accepted++
		}
		if i%1000 == 500 && !lim.Allow("b", layers, 1, now).Allowed {
			t.Fatal("key b was limited by key a's traffic")
		}
	}
	if accepted < 969 || accepted > 1071 {
		t.Fatalf("accepted %d, want 1020 ± 5%%", accepted)
	}
}

// TestAllOrNothing: a request one layer refuses takes nothing from the
// others, and says when to retry and what is left.
func TestAllOrNothing(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 10, Per: time.Second, Burst: 10}, {Limit: 5, Per: time.Minute, Burst: 5}}
	for i := range 5 {
		r := lim.Allow("k", layers, 1, t0)
		if !r.Allowed {
			t.Fatalf("request %d refused", i)
		}
	}
	r := lim.Allow("k", layers, 1, t0)
	if r.Allowed || r.Layers[0].Refused || !r.Layers[1].Refused {
		t.Fatalf("the 6th request: %+v; want refused by the minute layer only", r)
	}
	if r.Layers[0].Remaining != 5 {
		t.Fatalf("the per-second layer has %d left after a refusal; the refused request took from it", r.Layers[0].Remaining)
	}
	if r.RetryAfter != 12*time.Second {
		t.Fatalf("RetryAfter %v, want 12s (one request per 12 s refills the minute layer)", r.RetryAfter)
	}
	if r.Layers[1].Remaining != 0 || !r.Layers[1].Reset.Equal(t0.Add(time.Minute)) {
		t.Fatalf("minute layer: %+v", r.Layers[1])
	}
	if !r.NearLimit {
		t.Fatal("a layer at its limit is not near its limit")
	}
	if r := lim.Allow("k", layers, 1, t0.Add(12*time.Second)); !r.Allowed {
		t.Fatalf("after RetryAfter: %+v", r)
	}
}

func TestNearLimitAndCost(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 10, Per: time.Second, Burst: 10}}
	var r Result
	for range 7 {
		r = lim.Allow("k", layers, 1, t0)
	}
	if r.NearLimit || r.Layers[0].Remaining != 3 {
		t.Fatalf("70%% used: %+v", r)
	}
	if r = lim.Allow("k", layers, 1, t0); !r.NearLimit {
		t.Fatal("80% used is not near the limit")
	}
	if r = lim.Allow("k", layers, 3, t0); r.Allowed {
		t.Fatal("a request costing 3 passed with 2 left")
	}
	if r = lim.Allow("k", layers, 2, t0); !r.Allowed || r.Layers[0].Remaining != 0 {
		t.Fatalf("a request costing 2 with 2 left: %+v", r)
	}
	// A second later the bucket is full and the key's state is gone.
	if r = lim.Allow("k", layers, 10, t0.Add(2*time.Second)); !r.Allowed {
		t.Fatalf("a full bucket refused its burst: %+v", r)
	}
	lim.Allow("k", layers, 1, t0.Add(10*time.Second))
	if n := lim.Len(); n != 1 {
		t.Fatalf("%d keys have state", n)
	}
	lim.Forget("k")
	if lim.Len() != 0 {
		t.Fatal("Forget kept the state")
	}
}

func TestLayerCheck(t *testing.T) {
	for _, l := range []Layer{{0, time.Second, 1}, {1, 0, 1}, {1, time.Second, 0}, {10, time.Nanosecond, 1}} {
		if l.Check() == nil {
			t.Errorf("%+v passed", l)
		}
	}
	if (Layer{100, time.Second, 20}).Check() != nil {
		t.Error("a good layer failed")
	}
}

// TestConcurrent: many goroutines on one key never get more than the limit
// allows. Run with -race.
func TestConcurrent(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 50, Per: time.Second, Burst: 50}}
	var mu sync.Mutex
	accepted := 0
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				if lim.Allow("k", layers, 1, t0).Allowed {
					mu.Lock()
					accepted++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if accepted != 50 {
		t.Fatalf("accepted %d at one instant, want exactly the burst of 50", accepted)
	}
}

// TestHugeCost: a cost beyond the burst can never pass, says so without a
// retry time, and consumes nothing (a huge cost once wrapped the arithmetic
// around and passed).
func TestHugeCost(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 10, Per: 24 * time.Hour, Burst: 10}}
	for _, cost := range []int{11, 1 << 21, 1 << 40} {
		r := lim.Allow("k", layers, cost, t0)
		if r.Allowed || !r.TooLarge || r.RetryAfter != 0 {
			t.Fatalf("cost %d: %+v", cost, r)
		}
	}
	if r := lim.Allow("k", layers, 1, t0); !r.Allowed || r.Layers[0].Remaining != 9 {
		t.Fatalf("after refused huge costs: %+v", r)
	}
	if (Layer{Limit: 1, Per: 1 << 62, Burst: 4}).Check() == nil {
		t.Fatal("a layer whose burst overflows the clock passed Check")
	}
	// 2 per 3 ns rounds to the strict side.
	lim2 := New()
	strict := []Layer{{Limit: 2, Per: 3, Burst: 1}}
	n := 0
	for i := range 3000 {
		if lim2.Allow("k", strict, 1, t0.Add(time.Duration(i))).Allowed {
			n++
		}
	}
	if n > 2000 {
		t.Fatalf("%d allowed in 3000 ns at 2 per 3 ns", n)
	}
}

// TestChangedLayersCarryUse: reordering a key's layers, or narrowing one,
// keeps what was used; only a new period starts full.
func TestChangedLayersCarryUse(t *testing.T) {
	lim := New()
	hour := Layer{Limit: 100, Per: time.Hour, Burst: 100} // never the one that refuses
	day := Layer{Limit: 2, Per: 24 * time.Hour, Burst: 2}
	for range 2 {
		if !lim.Allow("k", []Layer{hour, day}, 1, t0).Allowed {
			t.Fatal("a request within the limits was refused")
		}
	}
	// The day is used up. Reordering, dropping the hour layer and adding it
	// back, narrowing the day, or widening it back, hands out nothing.
	narrow := Layer{Limit: 1, Per: 24 * time.Hour, Burst: 1}
	for i, layers := range [][]Layer{{day, hour}, {hour, day}, {day}, {day, hour}, {hour, narrow}, {narrow}, {narrow, hour}, {day, hour}} {
		r := lim.Allow("k", layers, 1, t0)
		if r.Allowed {
			t.Fatalf("change %d (%v) gave a fresh bucket", i, layers)
		}
		for _, l := range r.Layers {
			if l.Layer.Per == time.Hour && (l.Refused || l.Remaining != 98) {
				t.Fatalf("change %d: the hour layer %+v, want 98 left and not refusing", i, l)
			}
		}
	}
	// A layer of a new period starts full.
	r := lim.Allow("k", []Layer{{Limit: 100, Per: time.Minute, Burst: 100}, narrow}, 1, t0)
	if r.Allowed || r.Layers[0].Remaining != 100 || r.Layers[0].Refused {
		t.Fatalf("a new period: %+v", r)
	}
}

func TestMaxPer(t *testing.T) {
	if err := (Layer{Limit: 2, Per: time.Duration(1<<63 - 1), Burst: 3}).Check(); err == nil {
		t.Error("a period of 292 years passed Check")
	}
	if err := (Layer{Limit: 1, Per: MaxPer, Burst: 1}).Check(); err != nil {
		t.Error(err)
	}
}

// TestNarrowedLimitCountsRequests: a layer's use carries over a change of
// its limit in requests, not in time: 2 of a burst of 2 used at 10 a day
// are still 2 used at 5 a day.
func TestNarrowedLimitCountsRequests(t *testing.T) {
	lim := New()
	wide := []Layer{{Limit: 10, Per: 24 * time.Hour, Burst: 2}}
	for range 2 {
		if !lim.Allow("k", wide, 1, t0).Allowed {
			t.Fatal("refused within the limit")
		}
	}
	for _, n := range []int{9, 5, 2, 1} {
		if r := lim.Allow("k", []Layer{{Limit: n, Per: 24 * time.Hour, Burst: 2}}, 1, t0); r.Allowed || r.Layers[0].Remaining != 0 {
			t.Fatalf("narrowed to %d a day: %+v", n, r)
		}
	}
}

// TestScaleCarriesUse: limits halved under load allow half, counting what
// was used before; restored, they allow the rest, not a fresh bucket.
func TestScaleCarriesUse(t *testing.T) {
	lim := New()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	layers := []Layer{{Limit: 10, Per: time.Minute, Burst: 10}}
	half := Scale(layers, 0.5)
	if half[0].Limit != 5 || half[0].Burst != 5 || half[0].Per != time.Minute || layers[0].Limit != 10 {
		t.Fatalf("Scale: %+v (from %+v)", half, layers)
	}
	allowed := func(l []Layer, n int) int {
		ok := 0
		for range n {
			if lim.Allow("k", l, 1, now).Allowed {
				ok++
			}
		}
		return ok
	}
	if n := allowed(layers, 3); n != 3 {
		t.Fatalf("%d of 3 at the full limit", n)
	}
	if n := allowed(half, 5); n != 2 {
		t.Fatalf("%d allowed at half the limit after 3 used, want 2", n)
	}
	if n := allowed(layers, 10); n != 5 {
		t.Fatalf("%d allowed back at the full limit after 5 used, want 5", n)
	}
	if tiny := Scale([]Layer{{Limit: 1, Per: time.Second, Burst: 1}}, 0.01); tiny[0].Limit != 1 || tiny[0].Burst != 1 {
		t.Fatalf("a layer scaled below 1: %+v", tiny)
	}
	// A layer that would not pass Check scaled stays as it was.
	long := Layer{Limit: 1, Per: 24 * time.Hour, Burst: 100_000}
	if err := long.Check(); err != nil {
		t.Fatal(err)
	}
	if got := Scale([]Layer{long}, 1.4); got[0] != long {
		t.Fatalf("scaled past what can be counted: %+v", got)
	}
	// A full burst used, one refused call while tightened, restored at the
	// same instant: nothing more (the excess over the tightened burst is
	// not forgiven).
	lim2 := New()
	full := []Layer{{Limit: 100, Per: time.Minute, Burst: 100}}
	for range 100 {
		if !lim2.Allow("k", full, 1, now).Allowed {
			t.Fatal("refused within the burst")
		}
	}
	if lim2.Allow("k", Scale(full, 0.5), 1, now).Allowed {
		t.Fatal("allowed while tightened with the burst used")
	}
	if lim2.Allow("k", full, 1, now).Allowed {
		t.Fatal("restored limits handed out a fresh half bucket")
	}
	// The same with a bucket longer than two years (2 a day, bursts of
	// 2 000: 1 000 days to refill).
	lim3 := New()
	slow := []Layer{{Limit: 2, Per: 24 * time.Hour, Burst: 2000}}
	if !lim3.Allow("k", slow, 2000, now).Allowed {
		t.Fatal("a full burst refused")
	}
	for _, l := range [][]Layer{Scale(slow, 0.5), slow, Scale(slow, 0.25), slow} {
		if r := lim3.Allow("k", l, 1, now); r.Allowed || r.Layers[0].Remaining != 0 {
			t.Fatalf("after the burst, under %+v: %+v", l, r)
		}
	}
}

// TestClockJumps: a clock set back an hour neither refuses a key for that
// hour nor hands out a fresh bucket; set forward, buckets are full (never
// more than a burst).
func TestClockJumps(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 5, Per: time.Minute, Burst: 5}}
	for range 5 {
		if !lim.Allow("k", layers, 1, t0).Allowed {
			t.Fatal("refused within the burst")
		}
	}
	back := t0.Add(-time.Hour)
	r := lim.Allow("k", layers, 1, back)
	if r.Allowed {
		t.Fatal("a clock set back handed out a fresh bucket")
	}
	if r.RetryAfter > 12*time.Second || r.RetryAfter <= 0 {
		t.Fatalf("a clock set back an hour: retry after %v, want the 12 s one request costs", r.RetryAfter)
	}
	if got := r.Layers[0].Reset; got.Before(back) || got.After(back.Add(time.Minute)) {
		t.Fatalf("reset %v is not within a minute of the caller's clock %v", got, back)
	}
	if !lim.Allow("k", layers, 1, back.Add(12*time.Second)).Allowed {
		t.Fatal("the bucket did not drain after the clock was set back")
	}
	// Forward: the bucket is full, and holds no more than its burst.
	fwd := back.Add(2 * time.Hour)
	n := 0
	for lim.Allow("k", layers, 1, fwd).Allowed {
		n++
	}
	if n != 5 {
		t.Fatalf("after a clock set forward %d requests passed at once, want the burst of 5", n)
	}
	// Callers' clocks a little out of order are no jump.
	lim = New()
	lim.Allow("j", layers, 1, t0)
	lim.Allow("j", layers, 1, t0.Add(-time.Millisecond))
	if lim.skew != 0 {
		t.Fatalf("a millisecond out of order moved the limiter's clock by %v", lim.skew)
	}
}
