package apikeys

import (
	"context"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// TestFleetWindow: a limit window (Options.WindowFactor) changes a key's
// own limits, so on a fleet it scales the fleet's bucket and blocks, not
// only the node's limiter: a raise ×3 admits about three bursts, a cut ×½
// about half of one, and a request costing more than the key's own burst
// but within the raised one passes. The load governor (LimitFactor) still
// scales the node's limiter only.
func TestFleetWindow(t *testing.T) {
	for _, c := range []struct {
		name   string
		factor float64
		want   int // admitted of 400, give or take 2 blocks
	}{
		{"raise", 3, 300},
		{"cut", 0.5, 50},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			s := spec()
			s.Limits = []ratelimit.Layer{{Limit: 100, Per: 24 * time.Hour, Burst: 100}}
			key, _ := f.create(t, s)
			m, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return 1 },
				WindowFactor: func(*Record, time.Time) float64 { return c.factor }})
			if err != nil {
				t.Fatal(err)
			}
			valid, reported := 0, 0
			for range 400 {
				res := m.Verify(context.Background(), key, prod)
				if res.Code == Valid {
					valid++
				}
				if len(res.Limits.Layers) > 0 {
					reported = res.Limits.Layers[0].Layer.Limit
				}
			}
			b := FleetBlock(c.want, 1)
			if valid < c.want-2*b || valid > c.want+b || reported != c.want {
				t.Fatalf("×%v on a burst of 100: the fleet admitted %d and reported a limit of %d; want %d (±%d) and %d", c.factor, valid, reported, c.want, 2*b, c.want)
			}
		})
	}
	t.Run("large cost", func(t *testing.T) {
		f := newFixture(t)
		s := spec()
		s.Limits = []ratelimit.Layer{{Limit: 100, Per: 24 * time.Hour, Burst: 100}}
		key, _ := f.create(t, s)
		m, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return 1 },
			WindowFactor: func(*Record, time.Time) float64 { return 3 }})
		if err != nil {
			t.Fatal(err)
		}
		req := prod
		req.Cost = 150
		if res := m.Verify(context.Background(), key, req); res.Code != Valid {
			t.Fatalf("a request costing 150 under a ×3 window on a burst of 100: %s (%s)", res.Code, res.Detail)
		}
	})
}
