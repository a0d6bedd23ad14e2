package ratelimit

import (
	"testing"
	"time"
)

// Refund with the time the request was allowed at, after other keys moved
// the limiter's clock on by more than jitter (the fleet's admit waited for
// the store), is taken for a clock set back: skew grows by the wait, and
// every key's buckets drain that much early.
func TestRefundLate(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 1, Per: 10 * time.Second, Burst: 1}}
	t0 := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	if !lim.Allow("k", layers, 1, t0).Allowed { // allowed, then the fleet waited 5 s
		t.Fatal("k refused")
	}
	if !lim.Allow("x", layers, 1, t0.Add(5*time.Second)).Allowed { // another key meanwhile
		t.Fatal("x refused")
	}
	lim.Refund("k", layers, 1, t0) // the fleet refused k after its wait
	t.Logf("skew after the refund: %v", lim.skew)
	if lim.Allow("x", layers, 1, t0.Add(10*time.Second)).Allowed {
		t.Errorf("x allowed 5 s after its last request on a limit of 1 per 10 s (skew %v)", lim.skew)
	}
}
