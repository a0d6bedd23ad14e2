package apikeys

// Limits across a fleet (Options.FleetNodes). On a fleet a key's rate limits
// and its quota mean the whole fleet, not each node. The fleet's bucket
// (Record.Shared) and quota counter (Record.Quota) are kept in the key's
// record in the store, and each node takes requests from them in blocks:
// one store write per block, never one per verification.
//
//   - A verification first passes the node's own limiter, as on one host
//     (a key over its limit on one node alone costs the store nothing),
//     then spends from the node's block of the key.
//   - A node with less than half a block left asks the store for the next
//     one in the background. A node with none left spends on credit, up to
//     one block; once it owes half a block it asks for a block, and what
//     it spent on credit is charged to the fleet with it, even past the
//     limit (the fleet then refuses until it drains). Less than half a
//     block owed is charged by the next flush, many keys a transaction, so
//     a key used now and then costs no write of its own. A verification
//     waits for the store only when one node spends more than a block and
//     its credit before a block arrives.
//   - The writes of many keys go together: one goroutine settles the keys
//     queued, as many a transaction as the store takes.
//   - A block unused for blockIdle is given back at the next Flush, and
//     every block when RunFlusher ends (the node stops).
//   - When the fleet refuses (the limit or the quota is used up), the node
//     refuses on its own until the retry time, at most a second later, and
//     then spends nothing on credit until the fleet grants a block again:
//     a key hammered past its limit costs the store one write a second per
//     node, and is never overspent again and again.
//
// The bound. A block is b = max(1, ⌊m / 4N⌋) requests (FleetBlock), where
// m is the smallest burst of the key's layers (or the quota left, if
// smaller) and N the nodes of the fleet (a key verified at a cost c above
// b takes blocks of 2c: read b as max(b, 2c) below). A node holds at most
// one block and owes at most one (what it spent on credit, charged or being
// charged), so over any stretch with no refill the fleet admits at most
// N·b more than the limit (a quarter of a burst, or N for a burst under
// 4·N), and in any window at most 2·N·b more (a block taken before the
// window may be spent in it), plus what a clock skew of s between nodes
// lets through (s times the rate). A quota is overspent by at most N·b
// (a quarter of what was left, or N): blocks are taken from the counter,
// so only credit can overspend it. A node that dies holding a block loses
// it: the fleet admits less, never more.
//
// Credit goes only as far as the node's copy of the record says the
// fleet's bucket and quota still hold, less what the node owes: what the
// nodes spent and the flush charged counts against the next credit,
// whatever the traffic. A node killed loses its block (the fleet admits
// less) and what it owed (at most a block more, per node killed).
//
// While the store cannot be reached (etcd without quorum), a node spends
// what it holds, then admits a key with rate limits by 1/N of them alone
// (the fleet as a whole then within its limits, plus what nodes held), and
// refuses a key with a quota as UNAVAILABLE: a quota is never spent
// without its counter. After a write failed the node stays on that
// fallback until one succeeds (tried again by a verification every
// fleetRetry, and by every flush); a verification waits for a block at
// most maxWait, and is then answered from that fallback too (as far as the
// node's copy of the record shows room). The fallback admits uncharged,
// so while some nodes are on it the fleet may run over the bound by what
// they admit there (at most 1/N of the limits each); a verification
// admitted so says OnNodeShare. A write whose answer
// was lost may have committed: what it charged is owed again (charged
// twice at worst), what it took or gave back is lost: the fleet errs
// towards admitting less.
//
// The load governor (Options.LimitFactor) scales each node's limiter only:
// the fleet's bucket holds the key's own limits. A limit window
// (Options.WindowFactor) changes the key's own limits for a time, so it
// scales them everywhere: the node's limiter, the blocks' size, the
// fleet's bucket (Manager.limitsNow).
//
// Written here, not taken from a library: the blocks live in keyward's own
// store records, next to the key they limit, under its authentication.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/daemon/store"
)

const (
	// blockDivisor: a block is the smallest burst (or the quota left) over
	// blockDivisor × N (FleetBlock).
	blockDivisor = 4
	// maxRefusal is the longest a node refuses on its own after the fleet
	// refused; fleetRetry, how long it goes on without the store after a
	// write to it failed.
	maxRefusal = time.Second
	fleetRetry = time.Second
	// blockIdle: a block unused this long is given back at the next flush.
	blockIdle = 5 * time.Second
	// maxWaits is how many blocks a verification waits for before it
	// answers RATE_LIMITED: other verifications of the key took them.
	maxWaits = 3
	// maxWait is the longest a verification waits for a block; then the
	// node's share answers.
	maxWait = time.Second
)

// fleetLimits is a node's share of its keys' fleet-wide limits.
type fleetLimits struct {
	m     *Manager
	nodes func() int
	// fallback limits keys by 1/N while the store cannot be reached.
	fallback *ratelimit.Limiter

	mu       sync.Mutex
	held     map[string]*block
	queue    map[string]*block // to be settled
	settling bool              // the settler runs
}

// block is a node's share of one key.
type block struct {
	left   int           // requests taken from the fleet, not yet spent
	owed   int           // requests spent on credit, not yet charged
	owing  int           // requests spent on credit, being charged now
	need   int           // what a verification waiting for the store needs
	size   int           // b, as of the last verification
	cost   int           // the last verification's cost: a block is at least twice it
	refill time.Time     // the quota's last refill when the block was taken
	used   time.Time     // the last verification
	busy   chan struct{} // queued or being settled: closed when settled

	refused time.Time // the fleet refused until then, with code and retry
	code    Code
	retry   time.Time
	// denied: the fleet's last answer was a refusal; no credit until it
	// grants again (else each node would overspend a block a second).
	denied bool
	// failing: the last write to the store failed; the fallback until one
	// succeeds, tried again every fleetRetry from tried.
	failing bool
	tried   time.Time
}

func newFleetLimits(m *Manager, nodes func() int) *fleetLimits {
	if nodes == nil {
		nodes = func() int { return 1 }
	}
	return &fleetLimits{m: m, nodes: nodes, fallback: ratelimit.New(), held: map[string]*block{}, queue: map[string]*block{}}
}

// limits says whether a key has limits the fleet shares.
func limits(rec *Record) bool { return len(rec.Limits) > 0 || rec.Quota != nil }

// check is Check for a key with limits on a fleet: the access checks, the
// node's own limiter, then the node's share of the fleet's bucket and
// quota. rec is the caller's copy; check does not change it.
func (f *fleetLimits) check(ctx context.Context, rec *Record, secret int, req Request, now time.Time) Result {
	if res, ok := access(rec, secret, req, now); !ok {
		return res
	}
	cost := max(req.Cost, 1)
	var res Result
	own := f.m.limitsNow(rec, now)
	if b := ratelimit.MinBurst(own); b > 0 && cost > b {
		// The fleet's bucket has the key's own bursts (the load governor
		// scales only each node's limiter): more can never pass.
		res.Limits.TooLarge = true
		return limited(res)
	}
	layers := scaled(own, req.LimitFactor)
	if len(layers) > 0 {
		res.Limits = f.m.lim.Allow(rec.ID, layers, cost, now)
		if !res.Limits.Allowed {
			return limited(res)
		}
	}
	code, detail, retry := f.admit(ctx, rec, own, cost, now)
	if code != Valid {
		if len(layers) > 0 {
			f.m.lim.Refund(rec.ID, layers, cost, f.m.now())
		}
		res.Code, res.Detail = code, detail
		res.Limits.Allowed, res.Limits.RetryAfter = false, retry
		return res
	}
	res.Code, res.Detail = Valid, detail // the fallback says so
	return res
}

// OnNodeShare is what a verification admitted on the node's own share of
// the key's limits says (the fleet's store slow or out of reach).
const OnNodeShare = "admitted on this node's share of the key's limits: the fleet's store is slow or out of reach"

// size is b for rec, whose own limits are now own (the package doc).
func (f *fleetLimits) size(rec *Record, own []ratelimit.Layer, now time.Time) int {
	n := max(f.nodes(), 1)
	m := ratelimit.MinBurst(own)
	if q := rec.Quota; q != nil {
		left := quotaLeft(q, now)
		if m == 0 || left < int64(m) {
			m = int(max(min(left, 1<<30), 0))
		}
	}
	return FleetBlock(m, n)
}

// FleetBlock is the block b of a key whose smallest burst (or quota left)
// is m, on a fleet of n nodes: max(1, ⌊m / 4n⌋).
func FleetBlock(m, n int) int { return max(1, m/(blockDivisor*max(n, 1))) }

// quotaLeft is what a quota holds now, refills due counted.
func quotaLeft(q *Quota, now time.Time) int64 {
	c := *q
	c.refill(now)
	return c.Remaining
}

// admit spends cost from the node's share of rec's fleet limits.
func (f *fleetLimits) admit(ctx context.Context, rec *Record, own []ratelimit.Layer, cost int, now time.Time) (Code, string, time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for waits := 0; ; waits++ {
		// Looked up again each round: a flush may have dropped the block
		// while this verification waited.
		b := f.held[rec.ID]
		if b == nil {
			b = &block{}
			f.held[rec.ID] = b
		}
		b.used = now
		b.size, b.cost = f.size(rec, own, now), cost
		switch {
		case b.left >= cost:
			b.left -= cost
			if b.left < (max(b.size, 2*b.cost)+1)/2 && now.After(b.refused) && !b.failing {
				f.settle(rec.ID, b)
			}
			return Valid, "", 0
		case now.Before(b.refused):
			retry := max(b.retry.Sub(now), time.Millisecond)
			if b.code == UsageExceeded {
				return UsageExceeded, "the key's usage quota is used up, across the fleet", retry
			}
			return RateLimited, fmt.Sprintf("the key's limit is used up across the fleet; retry after %v", retry.Round(time.Millisecond)), retry
		case b.failing:
			// The store could not be reached at the last try: the
			// fallback, and a try in the background now and then.
			if now.Sub(b.tried) >= fleetRetry {
				f.settle(rec.ID, b)
			}
			return f.degraded(rec, own, cost, now)
		case rec.Quota != nil && quotaLeft(rec.Quota, now) < int64(cost):
			// The node's copy already says the quota is spent: no credit.
			return UsageExceeded, "the key's usage quota is used up, across the fleet", 0
		case !b.denied && b.owing+b.owed+cost-b.left <= b.size && b.owing+b.owed+cost-b.left <= room(rec, own, now):
			// Credit, up to a block, and only as far as the node's copy of
			// the record says the fleet's bucket and quota still hold: what
			// a node spent and the flush charged counts against the next.
			b.owed += cost - b.left
			b.left = 0
			// Half a block owed: charged, and a block taken. Less is
			// charged by the next flush, with other keys' (a key used
			// now and then costs no write of its own).
			if b.owing+b.owed >= (b.size+1)/2 {
				f.settle(rec.ID, b)
			}
			return Valid, "", 0
		}
		if waits == maxWaits {
			return RateLimited, "the key's share of its fleet-wide limit is on its way; retry", 10 * time.Millisecond
		}
		b.need = max(b.need, cost-b.left)
		f.settle(rec.ID, b)
		busy := b.busy
		f.mu.Unlock()
		wait := time.NewTimer(maxWait)
		select {
		case <-busy:
			wait.Stop()
		case <-wait.C:
			// The store is slow to answer (etcd electing, losing its
			// quorum, or loaded): the fallback rather than a caller kept
			// waiting, as far as the node's copy shows room.
			f.mu.Lock()
			if room(rec, own, now) < cost {
				return RateLimited, "the key's limit is used up across the fleet, as this node last saw it; retry", 100 * time.Millisecond
			}
			return f.degraded(rec, own, cost, f.m.now())
		case <-ctx.Done():
			wait.Stop()
			f.mu.Lock()
			return Unavailable, "the key's share of its fleet-wide limit did not arrive in time: " + ctx.Err().Error(), 0
		}
		f.mu.Lock()
		now = f.m.now()
	}
}

// room is how many requests the node's copy of rec says the fleet's
// bucket and quota hold now, before what the nodes spent and have not
// yet charged; own are the key's own limits now.
func room(rec *Record, own []ratelimit.Layer, now time.Time) int {
	r := math.MaxInt32
	if len(own) > 0 {
		r, _, _ = rec.Shared.Take(own, 0, 0, r, now)
	}
	if rec.Quota != nil {
		r = min(r, int(max(quotaLeft(rec.Quota, now), 0)))
	}
	return r
}

// degraded admits a request while the store cannot be reached: by 1/N
// of the key's rate limits, never against a quota.
func (f *fleetLimits) degraded(rec *Record, own []ratelimit.Layer, cost int, now time.Time) (Code, string, time.Duration) {
	if rec.Quota != nil {
		return Unavailable, "the key's quota is counted across the fleet, and the fleet's store cannot be reached; retry", fleetRetry
	}
	res := f.fallback.Allow(rec.ID, ratelimit.Scale(own, 1/float64(max(f.nodes(), 1))), cost, now)
	if !res.Allowed {
		return RateLimited, fmt.Sprintf("the fleet's store cannot be reached: this node allows its share of the key's limits; retry after %v", res.RetryAfter.Round(time.Millisecond)), res.RetryAfter
	}
	return Valid, OnNodeShare, 0
}

// settlement is what one store write settles of a key's share: owed
// charged, give returned, then between need and want taken.
type settlement struct {
	owed, give, need, want int
	refill                 time.Time // give: the quota's last refill when it was taken

	took     int
	code     Code // Valid, or why fewer than need were taken
	retry    time.Duration
	refilled time.Time // the quota's last refill after the write
}

// settle queues b to be settled with the store, unless it is queued or
// being settled; under f.mu. One goroutine settles the queue, as many
// keys a transaction as the store takes (store.BatchKeys): many keys
// used at once cost a few writes, not one each.
func (f *fleetLimits) settle(id string, b *block) {
	if b.busy != nil {
		return
	}
	b.busy = make(chan struct{})
	b.tried = f.m.now()
	f.queue[id] = b
	if !f.settling {
		f.settling = true
		go f.settler()
	}
}

// settler settles the queue until it is empty.
func (f *fleetLimits) settler() {
	batch := store.BatchKeys(f.m.store, 1)
	f.mu.Lock()
	defer f.mu.Unlock()
	for len(f.queue) > 0 {
		ops := map[string]*settlement{}
		blocks := map[string]*block{}
		for id, b := range f.queue {
			if len(ops) == batch {
				break
			}
			delete(f.queue, id)
			// Up to a block held, not more (the bound counts one); or
			// twice the cost of a verification, when that is more, so
			// that costs above a block do not each write.
			need := max(b.need, 1)
			ops[id] = &settlement{owed: b.owed, need: need, want: max(max(b.size, 2*b.cost)-b.left, need)}
			blocks[id] = b
			b.owing, b.owed, b.need = b.owed, 0, 0
		}
		f.mu.Unlock()
		err := f.m.settle(ops, f.m.now())
		now := f.m.now() // refusals and failures count from the answer
		f.mu.Lock()
		for _, b := range blocks {
			close(b.busy)
			b.busy, b.owing = nil, 0
		}
		for id, b := range blocks {
			op := ops[id]
			if err != nil {
				// Maybe committed (an answer lost): what was owed is owed
				// again (charged twice at worst), what was taken is lost
				// (the fleet admits less, never more).
				b.owed += op.owed
				b.failing = true
				continue
			}
			b.failing = false
			b.left += op.took
			b.refill = op.refilled
			b.denied = op.code != Valid
			if b.denied {
				retry := min(max(op.retry, 10*time.Millisecond), maxRefusal)
				b.code, b.refused, b.retry = op.code, now.Add(retry), now.Add(op.retry)
			}
		}
	}
	f.settling = false
}

// errUnchanged: a settlement with nothing to write.
var errUnchanged = errors.New("apikeys: nothing to settle")

// settle writes settlements to their keys' records, in one transaction.
func (m *Manager) settle(ops map[string]*settlement, now time.Time) error {
	ids := slices.Sorted(maps.Keys(ops))
	err := m.store.UpdateEach(store.BucketAPIKeys, ids, func(id string, old []byte) ([]byte, error) {
		op := ops[id]
		op.code = NotFound
		if old == nil {
			return nil, nil
		}
		r, err := decode(id, old)
		if err != nil {
			return old, nil // left as it is: one bad record must not stop the rest
		}
		op.code = Valid
		took := op.want
		if q := r.Quota; q != nil {
			q.refill(now)
			if op.give > 0 && q.LastRefill.Equal(op.refill) {
				q.Remaining += int64(op.give) // a refill since took its place
			}
			q.Remaining -= int64(op.owed)
			if q.Remaining < int64(op.need) {
				op.code, took = UsageExceeded, 0
				if q.Refill > 0 && q.RefillEvery > 0 {
					op.retry = q.LastRefill.Add(q.RefillEvery).Sub(now)
				}
			} else {
				took = int(min(int64(took), q.Remaining))
			}
		}
		if own := m.limitsNow(r, now); len(own) > 0 {
			need := op.need
			if op.code != Valid {
				need = 0
			}
			sh := r.Shared.Give(own, op.give, now)
			var retry time.Duration
			took, r.Shared, retry = sh.Take(own, op.owed, need, took, now)
			if op.code == Valid && took < op.need {
				op.code, op.retry = RateLimited, retry
			}
		}
		if q := r.Quota; q != nil {
			q.Remaining -= int64(took)
			op.refilled = q.LastRefill
		}
		op.took = took
		if len(ops) == 1 && op.owed == 0 && op.give == 0 && took == 0 {
			return nil, errUnchanged // a refusal alone: nothing to write
		}
		return json.Marshal(r)
	})
	if errors.Is(err, errUnchanged) {
		return nil
	}
	if err == nil {
		m.Forget(ids)
	}
	return err
}

// giveBack settles the blocks unused for idle (all of them if all): what
// is left goes back to the fleet, what is owed is charged; it forgets
// the blocks with nothing in them. Of the blocks in use, it charges what
// they owe.
func (f *fleetLimits) giveBack(idle time.Duration, all bool) error {
	now := f.m.now()
	f.mu.Lock()
	ops := map[string]*settlement{}
	blocks := map[string]*block{}
	for id, b := range f.held {
		if b.busy != nil {
			continue
		}
		unused := all || now.Sub(b.used) >= idle
		switch {
		case b.failing:
			// Tried again here too, so that a key unused since the store
			// came back is not answered from the fallback first.
			ops[id] = &settlement{owed: b.owed, give: b.left, refill: b.refill}
			b.owing, b.owed, b.left = b.owed, 0, 0
		case unused && b.left == 0 && b.owed == 0:
			if now.After(b.refused) && !b.failing {
				delete(f.held, id)
			}
			continue
		case unused:
			ops[id] = &settlement{owed: b.owed, give: b.left, refill: b.refill}
			b.owing, b.owed, b.left = b.owed, 0, 0
		case b.owed > 0: // in use: what it owes is charged, the block kept
			ops[id] = &settlement{owed: b.owed}
			b.owing, b.owed = b.owed, 0
		default:
			continue
		}
		blocks[id] = b
		b.busy = make(chan struct{})
	}
	f.mu.Unlock()
	var err error
	batch := store.BatchKeys(f.m.store, 1)
	ids := slices.Sorted(maps.Keys(ops))
	for lo := 0; lo < len(ids); lo += batch {
		part := map[string]*settlement{}
		for _, id := range ids[lo:min(lo+batch, len(ids))] {
			part[id] = ops[id]
		}
		if e := f.m.settle(part, now); e != nil {
			err = e
			break
		}
		for id := range part {
			delete(ops, id)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, b := range blocks {
		if op := ops[id]; op != nil {
			// Not settled, or maybe (an answer lost): what was owed is
			// owed again, what was given back stays given (the fleet
			// admits less, never more).
			b.owed += op.owed
		} else {
			b.failing = false // a write went through
		}
		close(b.busy)
		b.busy, b.owing = nil, 0
		if b.left == 0 && b.owed == 0 && !b.used.After(now.Add(-idle)) && !all {
			delete(f.held, id)
		}
	}
	return err
}

// share is what the node holds of a key's fleet quota, for answers.
func (f *fleetLimits) share(id string) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if b := f.held[id]; b != nil {
		return int64(b.left - b.owed)
	}
	return 0
}
