package apikeys

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
)

// countingStore counts the writes a Manager makes, and fails them all
// while down (as etcd without quorum does).
type countingStore struct {
	Store
	writes atomic.Int64
	down   atomic.Bool
}

func (c *countingStore) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	c.writes.Add(1)
	if c.down.Load() {
		return fmt.Errorf("%w: no quorum", store.ErrUnavailable)
	}
	return c.Store.UpdateEach(bucket, keys, fn)
}

// fleetOf is n Managers on one store, as n nodes of a fleet share etcd.
func fleetOf(t *testing.T, f *fixture, n int) ([]*Manager, *countingStore) {
	t.Helper()
	cs := &countingStore{Store: f.store}
	nodes := make([]*Manager, n)
	for i := range nodes {
		m, err := NewManager(cs, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return n }})
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = m
	}
	return nodes, cs
}

// hammer verifies key on every node from 4 goroutines each, tries times
// per goroutine, and counts the VALID answers; any answer but VALID and
// refused is a failure.
func hammer(t *testing.T, nodes []*Manager, key string, tries int, refused Code) int {
	t.Helper()
	var valid atomic.Int64
	var wg sync.WaitGroup
	for _, m := range nodes {
		for range 4 {
			wg.Go(func() {
				for range tries {
					switch res := m.Verify(context.Background(), key, prod); res.Code {
					case Valid:
						valid.Add(1)
					case refused, RateLimited:
					default:
						t.Errorf("Verify = %s (%s)", res.Code, res.Detail)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	return int(valid.Load())
}

// drain gives every block back, then verifies on each node in turn until
// every node is refused, and returns the VALID answers.
func drain(t *testing.T, f *fixture, nodes []*Manager, key string) int {
	t.Helper()
	for _, m := range nodes {
		if err := m.flush(true); err != nil {
			t.Fatal(err)
		}
	}
	f.clk.add(2 * maxRefusal) // past every node's own refusal
	n := 0
	for _, m := range nodes {
		for m.Verify(context.Background(), key, prod).Code == Valid {
			n++
		}
	}
	return n
}

// TestFleetLimits: a key's rate limit and quota hold across the nodes of a
// fleet within the stated bound (2·N·b over the limit, N·b over the quota;
// fleet.go), nothing given back is lost, and the nodes write to the store
// once a block, not once a verification.
func TestFleetLimits(t *testing.T) {
	const n = 3
	t.Run("rate", func(t *testing.T) {
		f := newFixture(t)
		s := spec()
		s.Limits = []ratelimit.Layer{{Limit: 240, Per: 24 * time.Hour, Burst: 240}} // no refill to speak of in the test
		key, rec := f.create(t, s)
		nodes, cs := fleetOf(t, f, n)
		b := FleetBlock(240, n)
		before := cs.writes.Load()
		got := hammer(t, nodes, key, 200, RateLimited)
		writes := cs.writes.Load() - before
		// No refill to speak of: the whole test is one window, and only
		// credit can overspend it (N·b; 2·N·b in a window a block spans).
		if got > 240+n*b {
			t.Fatalf("the fleet admitted %d; the limit is 240 and the bound N·b = %d over it", got, n*b)
		}
		if got < 240-2*n*b {
			t.Fatalf("the fleet admitted only %d of 240 while hammered", got)
		}
		if tries := int64(n * 4 * 200); writes > tries/10 {
			t.Fatalf("%d store writes for %d verifications: not one a block", writes, tries)
		}
		got += drain(t, f, nodes, key)
		if got < 240 || got > 240+n*b {
			t.Fatalf("after every block was given back the fleet admitted %d in all; want 240 to %d", got, 240+n*b)
		}
		t.Logf("rate: %d admitted of a limit of 240 (b = %d), %d store writes for %d verifications", got, b, writes, n*4*200)
		// The record keeps the fleet's bucket; a node's answer never shows it.
		res := nodes[0].Verify(context.Background(), key, prod)
		if res.Key == nil || res.Key.Shared != nil {
			t.Fatalf("a verification's answer shows the fleet's bucket: %+v", res.Key)
		}
		if r, err := nodes[1].load(rec.ID); err != nil || len(r.Shared) != 1 {
			t.Fatalf("the record's fleet bucket: %+v, %v", r, err)
		}
	})
	t.Run("quota", func(t *testing.T) {
		f := newFixture(t)
		s := spec()
		s.Limits = []ratelimit.Layer{}
		s.Quota = &Quota{Remaining: 300}
		key, rec := f.create(t, s)
		nodes, cs := fleetOf(t, f, n)
		b := FleetBlock(300, n)
		before := cs.writes.Load()
		got := hammer(t, nodes, key, 200, UsageExceeded)
		writes := cs.writes.Load() - before
		if got > 300+n*b {
			t.Fatalf("the fleet admitted %d on a quota of 300; the bound is N·b = %d over it", got, n*b)
		}
		if tries := int64(n * 4 * 200); writes > tries/5 {
			t.Fatalf("%d store writes for %d verifications: not one a block", writes, tries)
		}
		got += drain(t, f, nodes, key)
		if got < 300 || got > 300+n*b {
			t.Fatalf("the fleet admitted %d in all on a quota of 300; want 300 to %d", got, 300+n*b)
		}
		r, err := nodes[2].Get(rec.ID)
		if err != nil || r.Quota.Remaining > 0 {
			t.Fatalf("after the quota was spent the record says %+v, %v", r.Quota, err)
		}
		t.Logf("quota: %d admitted of 300 (b = %d), %d store writes", got, b, writes)
	})
	t.Run("store down", func(t *testing.T) {
		f := newFixture(t)
		s := spec()
		s.Limits = []ratelimit.Layer{{Limit: 30, Per: time.Hour, Burst: 30}}
		key, _ := f.create(t, s)
		q := spec()
		q.Name, q.Limits, q.Quota = "quota", []ratelimit.Layer{}, &Quota{Remaining: 100}
		qkey, _ := f.create(t, q)
		nodes, cs := fleetOf(t, f, n)
		cs.down.Store(true)
		m := nodes[0]
		valid := 0
		for range 100 {
			if m.Verify(context.Background(), key, prod).Code == Valid {
				valid++
			}
		}
		// The node's credit (one block), then its 1/N share of the limit.
		if b := FleetBlock(30, n); valid > b+30/n || valid < 30/n {
			t.Fatalf("without the store a node admitted %d; want its share %d (and at most a block %d more)", valid, 30/n, b)
		}
		res := m.Verify(context.Background(), qkey, prod)
		for res.Code == Valid { // the credit of one block at most
			res = m.Verify(context.Background(), qkey, prod)
		}
		if res.Code != Unavailable {
			t.Fatalf("a key with a quota without the store: %s (%s), want UNAVAILABLE", res.Code, res.Detail)
		}
	})
}
