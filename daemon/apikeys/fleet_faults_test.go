package apikeys

// The fleet-wide limits under the faults and patterns an independent
// review found them wanting in: low traffic, idle blocks, a store that
// fails slowly, writes that commit and answer an error.

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
)

// settled waits until no node's settler runs and no block is busy.
func settled(t *testing.T, nodes []*Manager) {
	t.Helper()
	for range 2000 {
		idle := true
		for _, m := range nodes {
			m.fleet.mu.Lock()
			if m.fleet.settling {
				idle = false
			}
			for _, b := range m.fleet.held {
				if b.busy != nil {
					idle = false
				}
			}
			m.fleet.mu.Unlock()
		}
		if idle {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("settler never idle")
}

// 1. A node spending less than half a block between flushes is never asked
// to take a block: the flush charges its credit (in-use branch of giveBack)
// and never sets denied, so the fleet bucket is never consulted.
func TestFleetLimitsCreditRenewedByFlush(t *testing.T) {
	const n = 3
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 240, Per: 24 * time.Hour, Burst: 240}}
	key, rec := f.create(t, s)
	nodes, _ := fleetOf(t, f, n)
	b := FleetBlock(240, n) // 20
	valid := 0
	for round := 0; round < 200; round++ {
		for _, m := range nodes {
			for range (b+1)/2 - 1 { // 9: under half a block
				if m.Verify(context.Background(), key, prod).Code == Valid {
					valid++
				}
			}
			if err := m.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		settled(t, nodes)
		f.clk.add(time.Second) // 200 s in all: 0.5 request of refill at 240/day
	}
	r, _ := nodes[0].load(rec.ID)
	t.Logf("admitted %d on a limit of 240/day (bound 240+N·b = %d); fleet bucket TAT %v ahead", valid, 240+n*b, r.Shared[0].TAT.Sub(f.clk.now()))
	if valid > 240+n*b {
		t.Errorf("the fleet admitted %d; the stated bound is %d", valid, 240+n*b)
	}
}

// 2. A denied block that sits idle for blockIdle is deleted at the next
// flush, and with it denied: the next use gets a fresh block of credit.
func TestFleetLimitsDeniedForgottenWhenIdle(t *testing.T) {
	const n = 3
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 240, Per: 24 * time.Hour, Burst: 240}}
	key, _ := f.create(t, s)
	nodes, _ := fleetOf(t, f, n)
	b := FleetBlock(240, n)
	valid := hammer(t, nodes, key, 200, RateLimited)
	first := valid
	for range 20 {
		settled(t, nodes)
		f.clk.add(6 * time.Second) // idle past blockIdle (0.017 requests of refill)
		for _, m := range nodes {
			if err := m.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		for _, m := range nodes {
			for range 2 * b {
				if m.Verify(context.Background(), key, prod).Code == Valid {
					valid++
				}
			}
		}
	}
	t.Logf("hammer admitted %d; after 20 idle cycles of 2 minutes in all: %d (bound 240+N·b = %d)", first, valid, 240+n*b)
	if valid > 240+n*b {
		t.Errorf("the fleet admitted %d; the stated bound is %d", valid, 240+n*b)
	}
}

// slowDown fails every write to the API keys after 5 s of the test's
// clock, as etcd without quorum does at its deadline.
type slowDown struct {
	Store
	clk    *clock
	writes atomic.Int64
	down   atomic.Bool
}

func (s *slowDown) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	if s.down.Load() && bucket == store.BucketAPIKeys {
		s.writes.Add(1)
		s.clk.add(5 * time.Second)
		return fmt.Errorf("%w: no quorum (after 5 s)", store.ErrUnavailable)
	}
	return s.Store.UpdateEach(bucket, keys, fn)
}

// 4. With a store that takes its timeout to fail, a node goes to its
// fallback (1/N of the limits) rather than keep every verification waiting
// for failing writes.
func TestFleetLimitsDegradedWhenStoreSlow(t *testing.T) {
	const n = 3
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 300, Per: time.Hour, Burst: 300}}
	key, _ := f.create(t, s)
	sd := &slowDown{Store: f.store, clk: f.clk}
	m, err := NewManager(sd, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return n }})
	if err != nil {
		t.Fatal(err)
	}
	sd.down.Store(true)
	codes := map[Code]int{}
	for i := range 40 {
		w0, t0 := sd.writes.Load(), f.clk.now()
		res := m.Verify(context.Background(), key, prod)
		codes[res.Code]++
		if w := sd.writes.Load() - w0; w > 0 || res.Code != Valid {
			t.Logf("verification %d: %s after %d failing writes (%v of store time): %s", i, res.Code, w, f.clk.now().Sub(t0), res.Detail)
		}
	}
	t.Logf("40 verifications with the store down: %v, %d failing writes (each 5 s with etcd)", codes, sd.writes.Load())
	if codes[Valid] < 30 {
		t.Errorf("with the store down a node admitted %d of 40; its credit is %d, its 1/N share a burst of 100", codes[Valid], FleetBlock(300, n))
	}
}

// ambiguous: commits, then answers an error (as Node.UpdateEachEmit does
// when the local copy misses the commit within its timeout).
type ambiguous struct {
	Store
	on atomic.Bool
}

func (a *ambiguous) UpdateEach(bucket string, keys []string, fn func(string, []byte) ([]byte, error)) error {
	err := a.Store.UpdateEach(bucket, keys, fn)
	if err == nil && a.on.Load() && bucket == store.BucketAPIKeys {
		return fmt.Errorf("%w: committed, but the copy did not reach it", store.ErrUnavailable)
	}
	return err
}

// 5. giveBack puts what it gave back into the block again when the write
// answers an error, although the write may have committed: the fleet gets
// the requests back and the node keeps them.
func TestFleetLimitsGiveBackAmbiguous(t *testing.T) { giveBackAmbiguous(t, true) }
func TestFleetLimitsGiveBackControl(t *testing.T)   { giveBackAmbiguous(t, false) }

func giveBackAmbiguous(t *testing.T, amb bool) {
	const n = 3
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 240, Per: 24 * time.Hour, Burst: 240}}
	key, _ := f.create(t, s)
	as := &ambiguous{Store: f.store}
	nodes := make([]*Manager, n)
	for i := range nodes {
		m, err := NewManager(as, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return n }})
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = m
	}
	b := FleetBlock(240, n)
	valid := 0
	for range 40 {
		for _, m := range nodes {
			for range b + b/2 {
				if m.Verify(context.Background(), key, prod).Code == Valid {
					valid++
				}
				settled(t, nodes)
			}
		}
		f.clk.add(6 * time.Second)
		as.on.Store(amb)
		for _, m := range nodes {
			_ = m.Flush()
		}
		as.on.Store(false)
	}
	t.Logf("admitted %d on a limit of 240/day, N=%d, b=%d (bound 240+N·b = %d)", valid, n, b, 240+n*b)
	if valid > 240+n*b {
		t.Errorf("admitted %d", valid)
	}
}

// 6. A node holds at most a block: one is asked for when less than half
// is left, and only what fills it up is taken.
func TestFleetLimitsHoldsMoreThanABlock(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 400, Per: 24 * time.Hour, Burst: 400}}
	key, rec := f.create(t, s)
	m, err := NewManager(f.store, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return 1 }})
	if err != nil {
		t.Fatal(err)
	}
	nodes := []*Manager{m}
	b := FleetBlock(400, 1) // 100
	most := 0
	for range 300 {
		if m.Verify(context.Background(), key, prod).Code != Valid {
			t.Fatal("refused")
		}
		settled(t, nodes)
		m.fleet.mu.Lock()
		most = max(most, m.fleet.held[rec.ID].left)
		m.fleet.mu.Unlock()
	}
	t.Logf("b = %d; the node held up to %d", b, most)
	if most > b {
		t.Errorf("the node held %d, more than a block (%d)", most, b)
	}
}

// 7. cost > b: the node takes twice the cost at a time, so half such
// verifications write, not every one.
func TestFleetLimitsCostAboveBlockWritesEach(t *testing.T) {
	const n = 3
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 1000, Per: time.Second, Burst: 20}} // b = 1
	key, _ := f.create(t, s)
	nodes, cs := fleetOf(t, f, n)
	req := prod
	req.Cost = 3
	before := cs.writes.Load()
	for range 50 {
		if res := nodes[0].Verify(context.Background(), key, req); res.Code != Valid {
			t.Fatalf("%s %s", res.Code, res.Detail)
		}
		settled(t, nodes)
		f.clk.add(10 * time.Millisecond)
	}
	writes := cs.writes.Load() - before
	t.Logf("50 verifications of cost 3 (b = %d): %d store writes", FleetBlock(20, n), writes)
	if writes > 26 { // a block of twice the cost each other verification
		t.Errorf("%d store writes for 50 verifications of a cost above the block", writes)
	}
}

// 5b. giveBack, direct: after a write that committed but answered an
// error, the record has the block back and so has the node.
func TestFleetLimitsGiveBackAmbiguousDirect(t *testing.T) {
	f := newFixture(t)
	s := spec()
	s.Limits = []ratelimit.Layer{{Limit: 400, Per: 24 * time.Hour, Burst: 400}}
	key, rec := f.create(t, s)
	as := &ambiguous{Store: f.store}
	m, err := NewManager(as, f.mac, pepper, Options{Prefix: "kwtest", Now: f.clk.now, FleetNodes: func() int { return 1 }})
	if err != nil {
		t.Fatal(err)
	}
	for range 60 {
		m.Verify(context.Background(), key, prod)
		settled(t, []*Manager{m})
	}
	room := func() int {
		r, _ := m.load(rec.ID)
		n, _, _ := r.Shared.Take(r.Limits, 0, 0, 1000, f.clk.now())
		return n
	}
	left := func() int {
		m.fleet.mu.Lock()
		defer m.fleet.mu.Unlock()
		if b := m.fleet.held[rec.ID]; b != nil {
			return b.left
		}
		return 0
	}
	t.Logf("before the flush: the node holds %d, the record has room for %d (sum %d, burst 400, 60 used)", left(), room(), left()+room())
	f.clk.add(6 * time.Second)
	as.on.Store(true)
	t.Logf("flush: %v", m.Flush())
	as.on.Store(false)
	t.Logf("after the flush: the node holds %d, the record has room for %d (sum %d)", left(), room(), left()+room())
	if left()+room() > 400-60+1 {
		t.Errorf("%d requests available after 60 of a burst of 400 were used", left()+room())
	}
}
