// Package admission keeps every caller of keywardd within its budget (the
// policy's Limits): the connections it holds, the calls it has in flight and
// the rate at which it starts them. A caller is a uid, as the kernel tells
// it: every connection of a uid counts against one budget, whatever process
// holds it, so that no caller, bound by the policy or not, can take the
// connections or the calls the others need.
//
// Nothing queues here. A connection or a call over the budget is refused at
// once with a Refusal that says which budget it reached and, for the rate,
// when to retry: a refused caller costs keywardd a counter and a message,
// and never waits in front of anyone else. The rate is a ratelimit.Limiter
// (the GCRA the API keys use) keyed by uid; its state outlives the
// caller's connections, so reconnecting does not refill the bucket.
//
// A cheap refusal is not enough on its own: a client that answers each
// refusal with another call at once would then run as fast as keywardd
// refuses, and take the machine's CPU from everyone (on two cores, it made
// other callers' calls a hundred times slower). So refusals cost the
// caller: past RefusalGrace's worth of them in a burst, each costs
// RefusalCost of not being read (Caller.Wait, which the connections
// honour before every read, and its refused connections before they are
// told why). A client that honours RESOURCE_EXHAUSTED never gets there; a
// flood stalls in its own socket buffers.
package admission

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/ratelimit"
)

// ErrOverBudget is what every Refusal matches with errors.Is.
var ErrOverBudget = errors.New("admission: over budget")

// Budget names the part of a caller's budget a Refusal is about.
type Budget string

// The parts of a budget.
const (
	Connections Budget = "connections" // connections held at once
	Calls       Budget = "calls"       // calls in flight at once
	Rate        Budget = "rate"        // calls started per period
	Refusals    Budget = "refusals"    // what its refusals cost it (see Caller.Wait)
	Hashing     Budget = "hashing"     // binaries hashed to identify it (see Gate.Hash)
)

// Refusal says which budget a caller reached.
type Refusal struct {
	UID    uint32
	Budget Budget
	// Bound: the caller has a role in the policy (if not, the budget is
	// the policy's for unbound callers).
	Bound bool
	// ByUID: refused on the uid alone, before anything else about the
	// caller was read: the uid holds the most connections any of its
	// processes could be allowed.
	ByUID bool
	// Limit is the budget's size, for Connections and Calls; for Hashing,
	// the binary's size in MiB.
	Limit int
	// Rate is the limiter's answer, for Rate and Hashing: each layer's
	// state, and how long until the call or the hashing would pass
	// (RetryAfter).
	Rate ratelimit.Result
	// Wait, for Refusals, is how long until the caller owes nothing.
	Wait time.Duration
}

func (r *Refusal) Error() string {
	whose := "as many as its role's budget allows (limits." + string(r.Budget) + " in the policy)"
	switch {
	case r.ByUID:
		whose = "the most any process of this uid may hold (limits.connections in the policy)"
	case !r.Bound:
		whose = "as many as a caller with no role in the policy may"
	}
	switch r.Budget {
	case Connections:
		return fmt.Sprintf("admission: uid %d holds %d connections, %s; one connection carries many calls at once", r.UID, r.Limit, whose)
	case Calls:
		return fmt.Sprintf("admission: uid %d has %d calls in flight, %s; retry when one has finished", r.UID, r.Limit, whose)
	case Refusals:
		return fmt.Sprintf("admission: uid %d went on calling or connecting over its budget after it was refused; it is not served for %v", r.UID, r.Wait.Round(time.Millisecond))
	case Hashing:
		if r.Rate.TooLarge {
			return fmt.Sprintf("admission: uid %d runs a binary of %d MiB, more than keywardd hashes for one uid at once (%d MiB)", r.UID, r.Limit, HashRate.Burst)
		}
		return fmt.Sprintf("admission: uid %d runs binaries keywardd has not hashed before, or changed since, faster than it hashes them for one uid (%d MiB per %v, bursts of %d MiB); retry in %v",
			r.UID, HashRate.Limit, HashRate.Per, HashRate.Burst, r.Rate.RetryAfter.Round(time.Millisecond))
	}
	var layers []string
	for _, l := range r.Rate.Layers {
		if l.Refused {
			layers = append(layers, fmt.Sprintf("%d calls per %v with bursts of %d", l.Layer.Limit, l.Layer.Per, l.Layer.Burst))
		}
	}
	return fmt.Sprintf("admission: uid %d is over its call rate (%s); retry in %v", r.UID, strings.Join(layers, ", "), r.Rate.RetryAfter.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrOverBudget) true.
func (r *Refusal) Is(target error) bool { return target == ErrOverBudget }

// Gate counts every caller's connections and calls. It is safe for
// concurrent use; its memory holds the callers that have a connection open
// and the rate-limit state of those whose bucket is not full.
type Gate struct {
	now  func() time.Time
	rate *ratelimit.Limiter

	mu      sync.Mutex
	callers map[uint32]*Caller
}

// New returns a Gate reading time from now (nil: time.Now).
func New(now func() time.Time) *Gate {
	if now == nil {
		now = time.Now
	}
	return &Gate{now: now, rate: ratelimit.New(), callers: map[uint32]*Caller{}}
}

// What a refusal costs its caller: past RefusalGrace of them (100 in a
// burst), each makes its connections wait RefusalCost before they are read
// again, so that a caller calling on regardless is refused 100 times a
// second at most. A caller owes MaxOwed at most beyond the grace: one that
// stops misbehaving is served again within that.
const (
	RefusalCost  = 10 * time.Millisecond
	RefusalGrace = time.Second
	MaxOwed      = 10 * time.Second
)

// Caller is one uid's account, shared by all of its connections.
type Caller struct {
	g   *Gate
	uid uint32
	key string // the uid, as the rate limiter's key

	conns, calls int          // guarded by g.mu
	owed         int64        // guarded by g.mu: refusals paid up to this time (unix ns), as a GCRA counts
	paused       atomic.Int64 // its connections are not read before this time (unix ns)
}

// Holds is how many connections uid holds now.
func (g *Gate) Holds(uid uint32) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c := g.callers[uid]; c != nil {
		return c.conns
	}
	return 0
}

// Connect takes one of uid's connection slots and returns the caller's
// account, or a *Refusal if the uid holds most connections already, or
// owes for its refusals (Caller.Wait). The connection gives its slot back
// with Disconnect. A slot is taken before anything is learnt about the
// caller but its uid, with the most any caller of the uid could hold
// (bindable: some binding of the policy could match the uid); once its
// budget is known, Narrow checks it against that.
func (g *Gate) Connect(uid uint32, most int, bindable bool) (*Caller, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	c := g.callers[uid]
	if c == nil {
		c = &Caller{g: g, uid: uid, key: strconv.FormatUint(uint64(uid), 10)}
	}
	if w := c.Wait(); w > 0 {
		c.refused()
		return nil, &Refusal{UID: uid, Budget: Refusals, Bound: bindable, Wait: c.Wait()}
	}
	if c.conns >= most {
		c.refused()
		return nil, &Refusal{UID: uid, Budget: Connections, ByUID: bindable, Bound: bindable, Limit: most}
	}
	c.conns++
	g.callers[uid] = c
	return c, nil
}

// Narrow checks a connection just made against the caller's budget l: if
// the caller holds more than l.Connections with it, the connection's slot
// is given back and Narrow returns a *Refusal.
func (c *Caller) Narrow(l policy.Limits, bound bool) error {
	c.g.mu.Lock()
	over := c.conns > l.Connections
	if over {
		c.refused()
	}
	c.g.mu.Unlock()
	if over {
		c.Disconnect()
		return &Refusal{UID: c.uid, Budget: Connections, Bound: bound, Limit: l.Connections}
	}
	return nil
}

// Disconnect gives back the slot of one of the caller's connections. Call
// it once for each Connect that succeeded.
func (c *Caller) Disconnect() {
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	c.conns--
	c.g.forget(c)
}

// forget drops the caller's account once it holds nothing and owes
// nothing (a caller does not shed its refusals by reconnecting). g.mu is
// held.
func (g *Gate) forget(c *Caller) {
	if c.conns == 0 && c.calls == 0 && c.owed <= g.now().UnixNano() && g.callers[c.uid] == c {
		delete(g.callers, c.uid)
	}
}

// refused charges the caller for a refusal, and pauses its connections
// while it owes more than RefusalGrace. g.mu is held.
func (c *Caller) refused() {
	now := c.g.now().UnixNano()
	c.owed = min(max(c.owed, now)+int64(RefusalCost), now+int64(RefusalGrace+MaxOwed))
	if over := c.owed - now - int64(RefusalGrace); over > 0 {
		c.paused.Store(now + over)
	}
}

// HashRate is how much of its binaries keywardd hashes to identify one
// uid, in MiB: 256 a minute, in bursts of 2 GiB (at about 1.5 GB/s, a
// second and a half of one CPU at once, a fifth of a second a minute). A
// binary hashed before and unchanged since costs nothing.
var HashRate = ratelimit.Layer{Limit: 256, Per: time.Minute, Burst: 2048}

// Hash charges uid for hashing a binary of size bytes, and refuses it (a
// *Refusal for Hashing) if HashRate does not allow that now: a caller can
// make keywardd hash its binary again at every connection (touching the
// file is enough), and the binary can be as large as it likes.
func (g *Gate) Hash(uid uint32, size int64) error {
	const mib = 1 << 20
	cost := int(min(max((size+mib-1)/mib, 1), math.MaxInt32))
	res := g.rate.Allow("hash "+strconv.FormatUint(uint64(uid), 10), []ratelimit.Layer{HashRate}, cost, g.now())
	if res.Allowed {
		return nil
	}
	g.mu.Lock()
	if c := g.callers[uid]; c != nil {
		c.refused()
	}
	g.mu.Unlock()
	return &Refusal{UID: uid, Budget: Hashing, Limit: cost, Rate: res}
}

// Wait is how long uid's connections should wait before they are read or
// answered: 0, or what it still owes beyond RefusalGrace.
func (g *Gate) Wait(uid uint32) time.Duration {
	g.mu.Lock()
	c := g.callers[uid]
	g.mu.Unlock()
	if c == nil {
		return 0
	}
	return c.Wait()
}

// Wait is how long reads of the caller's connections should wait before
// they go on: 0, or what it still owes beyond RefusalGrace.
func (c *Caller) Wait() time.Duration {
	p := c.paused.Load()
	if p == 0 {
		return 0
	}
	return max(time.Duration(p-c.g.now().UnixNano()), 0)
}

// Call counts a new call of the caller against its budget l: it is refused
// with a *Refusal if the caller has l.Calls calls in flight, or if l.Rate
// does not allow it now (then nothing is taken from the rate). The
// returned func ends the call; calling it again does nothing.
func (c *Caller) Call(l policy.Limits, bound bool) (end func(), err error) {
	g := c.g
	g.mu.Lock()
	if c.calls >= l.Calls {
		c.refused()
		g.mu.Unlock()
		return nil, &Refusal{UID: c.uid, Budget: Calls, Bound: bound, Limit: l.Calls}
	}
	c.calls++
	g.mu.Unlock()
	var ended atomic.Bool
	end = func() {
		if ended.CompareAndSwap(false, true) {
			g.mu.Lock()
			c.calls--
			g.forget(c)
			g.mu.Unlock()
		}
	}
	if len(l.Rate) > 0 {
		if res := g.rate.Allow(c.key, l.Rate, 1, g.now()); !res.Allowed {
			g.mu.Lock()
			c.refused()
			g.mu.Unlock()
			end()
			return nil, &Refusal{UID: c.uid, Budget: Rate, Bound: bound, Rate: res}
		}
	}
	return end, nil
}
