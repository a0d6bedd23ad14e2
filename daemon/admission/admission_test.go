package admission

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/ratelimit"
)

// clock is a test's time, moved by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func refusal(t *testing.T, err error, budget Budget) *Refusal {
	t.Helper()
	r, ok := errors.AsType[*Refusal](err)
	if !ok || !errors.Is(err, ErrOverBudget) || r.Budget != budget {
		t.Fatalf("got %v; want a refusal for %s", err, budget)
	}
	return r
}

// TestConnections: each uid has its own count; a slot given back can be
// taken again; the gate forgets a caller that holds nothing.
func TestConnections(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	g := New(clk.now)
	l := policy.Limits{Connections: 2, Calls: 1}
	connect := func(uid uint32, most int) *Caller {
		t.Helper()
		c, err := g.Connect(uid, most, true)
		if err != nil {
			t.Fatalf("uid %d refused below %d connections: %v", uid, most, err)
		}
		return c
	}
	a1, a2 := connect(1000, 4), connect(1000, 4)
	if a1 != a2 || g.Holds(1000) != 2 {
		t.Fatalf("two connections of one uid: accounts %p %p, holds %d", a1, a2, g.Holds(1000))
	}
	if err := a2.Narrow(l, true); err != nil {
		t.Fatalf("two connections in a budget of two: %v", err)
	}
	// A third fits the uid's most (4) but not the caller's budget (2).
	a3 := connect(1000, 4)
	err := a3.Narrow(l, true)
	r := refusal(t, err, Connections)
	if r.UID != 1000 || r.Limit != 2 || !strings.Contains(err.Error(), "uid 1000 holds 2 connections, as many as its role's budget allows (limits.connections in the policy)") {
		t.Fatalf("refusal %+v: %v", r, err)
	}
	if g.Holds(1000) != 2 {
		t.Fatalf("a narrowed-out connection kept its slot: holds %d", g.Holds(1000))
	}
	// At the uid's most, Connect refuses before anything else is known.
	connect(1000, 4)
	connect(1000, 4)
	_, err = g.Connect(1000, 4, true)
	if r := refusal(t, err, Connections); !r.ByUID || !strings.Contains(err.Error(), "uid 1000 holds 4 connections, the most any process of this uid may hold") {
		t.Fatalf("a fifth connection of a uid whose most is 4: %v", err)
	}
	// Another uid is not affected by the first one's count.
	b := connect(2000, 1)
	if err := refusal(t, connect(2000, 2).Narrow(policy.Limits{Connections: 1}, false), Connections); !strings.Contains(err.Error(), "as many as a caller with no role in the policy may") {
		t.Fatalf("unbound refusal: %v", err)
	}
	clk.add(time.Second) // past what the refusals cost
	for range 4 {
		a1.Disconnect()
	}
	b.Disconnect()
	if g.Holds(1000) != 0 || g.Holds(2000) != 0 || len(g.callers) != 0 {
		t.Fatalf("after every disconnect the gate still holds %d callers", len(g.callers))
	}
	if s := (&Refusal{UID: 7, Budget: Connections, ByUID: true, Limit: 3}).Error(); !strings.Contains(s, "uid 7 holds 3 connections, the most any process of this uid may hold") {
		t.Fatalf("refusal by uid: %s", s)
	}
}

// TestCalls: calls in flight are counted per caller across its
// connections; ending one frees its slot once, however often it is ended.
func TestCalls(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	g := New(clk.now)
	l := policy.Limits{Connections: 4, Calls: 2}
	c, _ := g.Connect(1000, l.Connections, true)
	c2, _ := g.Connect(1000, l.Connections, true)
	end1, err := c.Call(l, true)
	if err != nil {
		t.Fatal(err)
	}
	end2, err := c2.Call(l, true)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Call(l, true)
	if r := refusal(t, err, Calls); r.Limit != 2 || !strings.Contains(r.Error(), "uid 1000 has 2 calls in flight, as many as its role's budget allows (limits.calls in the policy); retry when one has finished") {
		t.Fatalf("refusal: %v", r)
	}
	end1()
	end1() // a second end is nothing: the stream's end after the handler's
	end3, err := c.Call(l, true)
	if err != nil {
		t.Fatalf("after one ended: %v", err)
	}
	if _, err := c.Call(l, true); err == nil {
		t.Fatal("ending one call twice freed two slots")
	}
	// A caller whose connections are gone keeps its account while calls
	// are in flight, and gives it up with the last one (once it owes
	// nothing for the two refusals).
	clk.add(time.Second)
	c.Disconnect()
	c2.Disconnect()
	if len(g.callers) != 1 {
		t.Fatal("the account went with the connections while calls were in flight")
	}
	end2()
	end3()
	if len(g.callers) != 0 {
		t.Fatal("the account stayed after its last call ended")
	}
}

// TestRate: a caller over its rate is refused with each layer's state and
// when to retry; a refused call takes nothing; the state outlives the
// caller's connections, so reconnecting does not refill the bucket.
func TestRate(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	g := New(clk.now)
	l := policy.Limits{Connections: 1, Calls: 10, Rate: []ratelimit.Layer{{Limit: 10, Per: time.Second, Burst: 2}}}
	c, _ := g.Connect(1000, l.Connections, true)
	for range 2 {
		end, err := c.Call(l, true)
		if err != nil {
			t.Fatal(err)
		}
		end()
	}
	_, err := c.Call(l, true)
	r := refusal(t, err, Rate)
	if r.Rate.RetryAfter != 100*time.Millisecond || len(r.Rate.Layers) != 1 || !r.Rate.Layers[0].Refused || r.Rate.Layers[0].Remaining != 0 {
		t.Fatalf("rate refusal %+v", r.Rate)
	}
	if !strings.Contains(err.Error(), "uid 1000 is over its call rate (10 calls per 1s with bursts of 2); retry in 100ms") {
		t.Fatalf("message: %v", err)
	}
	if g.callers[1000].calls != 0 {
		t.Fatal("a call refused for its rate holds a slot")
	}
	// Reconnecting: the bucket is as it was.
	c.Disconnect()
	c, _ = g.Connect(1000, l.Connections, true)
	if _, err := c.Call(l, true); err == nil {
		t.Fatal("a new connection refilled the bucket")
	}
	// Another uid has a bucket of its own.
	o, _ := g.Connect(2000, l.Connections, true)
	if _, err := o.Call(l, true); err != nil {
		t.Fatalf("another uid: %v", err)
	}
	clk.add(100 * time.Millisecond)
	if _, err := c.Call(l, true); err != nil {
		t.Fatalf("after the wait it was told: %v", err)
	}
}

// TestConcurrent: many goroutines of a few callers connect and call at
// once (run with -race); no budget is ever exceeded and everything is
// given back (a caller is remembered only for what it owes).
func TestConcurrent(t *testing.T) {
	g := New(nil)
	l := policy.Limits{Connections: 3, Calls: 5}
	var wg sync.WaitGroup
	var mu sync.Mutex
	most := map[uint32]int{}
	for i := range 64 {
		uid := uint32(i % 4)
		wg.Go(func() {
			for range 200 {
				c, err := g.Connect(uid, l.Connections, true)
				if err != nil {
					continue
				}
				if end, err := c.Call(l, true); err == nil {
					g.mu.Lock()
					n := c.calls
					g.mu.Unlock()
					mu.Lock()
					most[uid] = max(most[uid], n)
					mu.Unlock()
					end()
				}
				if n := g.Holds(uid); n > l.Connections {
					t.Errorf("uid %d holds %d connections", uid, n)
				}
				c.Disconnect()
			}
		})
	}
	wg.Wait()
	for uid, n := range most {
		if n > l.Calls {
			t.Errorf("uid %d had %d calls in flight", uid, n)
		}
	}
	for uid, c := range g.callers { // those left owe for their refusals
		if c.conns != 0 || c.calls != 0 || c.owed <= time.Now().UnixNano() {
			t.Errorf("uid %d is still known after everything closed: %d connections, %d calls", uid, c.conns, c.calls)
		}
	}
}

// TestRefusalsCost: past RefusalGrace's worth of refusals, each costs the
// caller RefusalCost of waiting, MaxOwed at most beyond the grace; the
// debt outlives its connections and is forgotten once paid.
func TestRefusalsCost(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	g := New(clk.now)
	l := policy.Limits{Connections: 1, Calls: 1}
	c, _ := g.Connect(1000, l.Connections, true)
	end, err := c.Call(l, true)
	if err != nil {
		t.Fatal(err)
	}
	refuse := func(n int) {
		t.Helper()
		for range n {
			if _, err := c.Call(l, true); err == nil {
				t.Fatal("a call over the budget was let in")
			}
		}
	}
	free := int(RefusalGrace / RefusalCost)
	refuse(free)
	if w := c.Wait(); w != 0 {
		t.Fatalf("after %d refusals (the grace) the caller waits %v", free, w)
	}
	refuse(1)
	if w := c.Wait(); w != RefusalCost {
		t.Fatalf("one refusal past the grace: wait %v, want %v", w, RefusalCost)
	}
	// A caller that owes is not let in, and its refused connections cost
	// as much as refused calls.
	_, err = g.Connect(1000, 10, true)
	if r := refusal(t, err, Refusals); r.Wait != 2*RefusalCost ||
		!strings.Contains(err.Error(), "uid 1000 went on calling or connecting over its budget after it was refused; it is not served for 20ms") {
		t.Fatalf("a connection while owing: %v", err)
	}
	if w := g.Wait(1000); w != 2*RefusalCost {
		t.Fatalf("after a refused connection: wait %v, want %v", w, 2*RefusalCost)
	}
	refuse(10 * free)
	if w := c.Wait(); w != MaxOwed {
		t.Fatalf("a flood of refusals: wait %v, want the most, %v", w, MaxOwed)
	}
	// The debt outlives the connections: reconnecting does not shed it.
	end()
	c.Disconnect()
	if _, err := g.Connect(1000, l.Connections, true); err == nil || g.Wait(1000) != MaxOwed {
		t.Fatalf("reconnecting while owing: %v, wait %v", err, g.Wait(1000))
	}
	clk.add(MaxOwed)
	if w := g.Wait(1000); w != 0 {
		t.Fatalf("after waiting it out: wait %v", w)
	}
	if c, err = g.Connect(1000, l.Connections, true); err != nil {
		t.Fatalf("after waiting it out: %v", err)
	}
	clk.add(RefusalGrace)
	c.Disconnect()
	if len(g.callers) != 0 || g.Wait(1000) != 0 {
		t.Fatal("a caller that owes nothing and holds nothing is still known")
	}
}

// TestHash: binaries hashed for a uid are limited by HashRate, in MiB;
// a refusal says when to retry, and costs the caller like any other;
// another uid has a budget of its own.
func TestHash(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	g := New(clk.now)
	c, _ := g.Connect(1000, 1, true)
	const mib = 1 << 20
	if err := g.Hash(1000, int64(HashRate.Burst)*mib); err != nil {
		t.Fatalf("a burst's worth: %v", err)
	}
	err := g.Hash(1000, 1)
	r := refusal(t, err, Hashing)
	if want := HashRate.Per / time.Duration(HashRate.Limit); r.Rate.RetryAfter != want || r.Limit != 1 ||
		!strings.Contains(err.Error(), "uid 1000 runs binaries keywardd has not hashed before, or changed since, faster than it hashes them for one uid (256 MiB per 1m0s, bursts of 2048 MiB); retry in 234ms") {
		t.Fatalf("refusal %+v: %v; want a retry in %v", r, err, want)
	}
	if err := g.Hash(2000, 100*mib); err != nil {
		t.Fatalf("another uid: %v", err)
	}
	if err := g.Hash(3000, int64(HashRate.Burst+1)*mib); !strings.Contains(fmt.Sprint(err), "uid 3000 runs a binary of 2049 MiB, more than keywardd hashes for one uid at once (2048 MiB)") {
		t.Fatalf("a binary larger than a burst: %v", err)
	}
	clk.add(HashRate.Per / time.Duration(HashRate.Limit))
	if err := g.Hash(1000, 1); err != nil {
		t.Fatalf("after the wait it was told: %v", err)
	}
	for range int(RefusalGrace/RefusalCost) + 1 { // one past the grace
		g.Hash(1000, 1)
	}
	if c.Wait() == 0 {
		t.Fatal("refused hashing costs the caller nothing")
	}
}
