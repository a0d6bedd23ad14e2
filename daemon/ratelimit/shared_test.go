package ratelimit

import (
	"testing"
	"time"
)

// TestSharedTakeGive: blocks taken from a shared bucket never add up to
// more than the layers allow; what is given back can be taken again;
// requests owed are charged even past the bucket, which then refuses
// until they drain.
func TestSharedTakeGive(t *testing.T) {
	layers := []Layer{{Limit: 10, Per: time.Second, Burst: 20}, {Limit: 100, Per: time.Hour, Burst: 30}}
	now := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	var s Shared
	total := 0
	for {
		n, next, retry := s.Take(layers, 0, 1, 7, now)
		if n == 0 {
			if retry <= 0 {
				t.Fatalf("refused with no retry after %d", total)
			}
			break
		}
		s, total = next, total+n
	}
	if total != 20 { // the second layer's burst, the smaller, would allow 30
		t.Fatalf("took %d at once; the burst is 20", total)
	}
	s = s.Give(layers, 5, now)
	n, s, _ := s.Take(layers, 0, 5, 9, now)
	if n != 5 {
		t.Fatalf("after giving back 5, took %d", n)
	}
	// One second later the per-second layer has 10 again.
	now = now.Add(time.Second)
	n, s, _ = s.Take(layers, 0, 1, 100, now)
	if n != 10 {
		t.Fatalf("a second later took %d, want 10", n)
	}
	// Owed requests are charged whatever: 20 more than the bucket holds.
	now = now.Add(10 * time.Second) // the per-second layer is full again; the hour's has 0
	n, s, retry := s.Take(layers, 20, 1, 1, now)
	if n != 0 || retry < time.Hour/100*20 {
		t.Fatalf("after 20 owed: took %d, retry %v; want 0 and at least %v", n, retry, time.Hour/100*20)
	}
	// want 0: a settlement only.
	if n, _, _ := s.Take(layers, 0, 0, 0, now); n != 0 {
		t.Fatalf("want 0 took %d", n)
	}
	// The state carries across a change of layers, by period: the owed
	// 20 took the per-second layer 2 s ahead too.
	narrowed := []Layer{{Limit: 10, Per: time.Second, Burst: 20}}
	if n, _, _ := s.Take(narrowed, 0, 1, 100, now); n != 0 {
		t.Fatalf("with the hour's layer removed took %d at once, want 0", n)
	}
	if n, _, _ := s.Take(narrowed, 0, 1, 100, now.Add(2*time.Second)); n != 20 {
		t.Fatalf("with the hour's layer removed took %d 2 s later, want the second's 20", n)
	}
}

// TestLimiterRefund: a refunded request can be made again.
func TestLimiterRefund(t *testing.T) {
	lim := New()
	layers := []Layer{{Limit: 1, Per: time.Minute, Burst: 2}}
	now := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	for i := range 2 {
		if !lim.Allow("k", layers, 1, now).Allowed {
			t.Fatalf("request %d refused", i)
		}
	}
	if lim.Allow("k", layers, 1, now).Allowed {
		t.Fatal("third allowed")
	}
	lim.Refund("k", layers, 1, now)
	if !lim.Allow("k", layers, 1, now).Allowed {
		t.Fatal("refunded request refused")
	}
	if lim.Allow("k", layers, 1, now).Allowed {
		t.Fatal("allowed past the burst after one refund")
	}
}
