// Package ratelimit is keyward's layered rate limiting: each API key has
// limits per second, minute, hour and day (any of them), all checked at once
// and all or nothing: a request one layer refuses consumes nothing from the
// others.
//
// Each layer is a GCRA (the generic cell rate algorithm, the token bucket
// stated as a "theoretical arrival time"): exact, one timestamp of state per
// layer, and able to say how much is left, when the layer is full again and
// how long to wait. golang.org/x/time/rate was the first choice, but its
// reservations can only be cancelled "as much as possible", and layers must
// be checked together without consuming anything when one refuses; with GCRA
// that is a comparison before any update, under one lock. Time comes from the
// caller, so tests run days in microseconds.
package ratelimit

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"
)

// Layer is one limit: Limit requests per Per, with bursts of up to Burst
// (at least 1; the bucket starts full).
type Layer struct {
	Limit int
	Per   time.Duration
	Burst int
}

// MaxPer is the longest period a layer may have.
const MaxPer = 366 * 24 * time.Hour

// ErrInvalid: a layer cannot be.
var ErrInvalid = errors.New("ratelimit: invalid limit")

// Check says whether the layer can be.
func (l Layer) Check() error {
	if l.Limit < 1 || l.Per <= 0 || l.Burst < 1 {
		return fmt.Errorf("%w: %d per %v with bursts of %d; use a positive limit, period and burst", ErrInvalid, l.Limit, l.Per, l.Burst)
	}
	if l.Per > MaxPer {
		return fmt.Errorf("%w: a period of %v; at most %v", ErrInvalid, l.Per, MaxPer)
	}
	if l.Per < time.Duration(l.Limit) {
		return fmt.Errorf("%w: %d per %v is more than one a nanosecond", ErrInvalid, l.Limit, l.Per)
	}
	if l.interval() > time.Duration(math.MaxInt64)/time.Duration(l.Burst+1) {
		return fmt.Errorf("%w: a burst of %d at %d per %v is too long a time to count", ErrInvalid, l.Burst, l.Limit, l.Per)
	}
	return nil
}

// MaxLayers is the most layers one set of limits may have: a second, a
// minute, an hour and a day.
const MaxLayers = 4

// CheckLayers says whether layers can be one set of limits: at most
// MaxLayers, each passing Check, each period once (a Limiter keeps its
// state by period).
func CheckLayers(layers []Layer) error {
	if len(layers) > MaxLayers {
		return fmt.Errorf("%w: %d layers; at most %d", ErrInvalid, len(layers), MaxLayers)
	}
	for i, l := range layers {
		if err := l.Check(); err != nil {
			return err
		}
		if slices.ContainsFunc(layers[:i], func(o Layer) bool { return o.Per == l.Per }) {
			return fmt.Errorf("%w: two layers per %v; give each period once", ErrInvalid, l.Per)
		}
	}
	return nil
}

// interval is the time one request costs, rounded up so that a limit that
// does not divide its period evenly errs on the strict side.
func (l Layer) interval() time.Duration {
	return (l.Per + time.Duration(l.Limit) - 1) / time.Duration(l.Limit)
}

// tolerance is how far ahead of now a layer's arrival time may run: a full
// bucket minus the request that fills it.
func (l Layer) tolerance() time.Duration { return l.interval() * time.Duration(l.Burst-1) }

// Scale returns layers with their limits and bursts times f (each at
// least 1), as keywardd tightens limits under load (f < 1) or raises them
// for keys in good standing (f > 1). The use counted so far carries over
// (see carry): neither a tightened nor a restored key gets a fresh
// bucket. A scaled layer that would not pass Check (more than one a
// nanosecond, a burst too long to count) stays as it was.
func Scale(layers []Layer, f float64) []Layer {
	out := make([]Layer, len(layers))
	for i, l := range layers {
		out[i] = l
		if f > 0 && !math.IsInf(f, 0) && float64(l.Limit)*f < math.MaxInt32 && float64(l.Burst)*f < math.MaxInt32 {
			s := Layer{Limit: max(1, int(math.Round(float64(l.Limit)*f))), Per: l.Per, Burst: max(1, int(math.Round(float64(l.Burst)*f)))}
			if s.Check() == nil {
				out[i] = s
			}
		}
	}
	return out
}

// LayerResult is one layer's state after a check.
type LayerResult struct {
	Layer     Layer
	Remaining int       // requests this layer would still allow now
	Reset     time.Time // when it is full again
	Refused   bool      // this layer refused the request
}

// Result is a check's answer.
type Result struct {
	Allowed bool
	Layers  []LayerResult
	// RetryAfter, when refused, is how long until the request would pass
	// every layer.
	RetryAfter time.Duration
	// NearLimit: after this request some layer has used at least the near
	// fraction (default 0.8) of its burst, so callers can warn first.
	NearLimit bool
	// TooLarge: the request costs more than some layer's burst; it can
	// never pass, so there is no RetryAfter.
	TooLarge bool
}

// Limiter holds the state of many keys' limits. It is safe for concurrent
// use; its memory holds only keys whose buckets are not full.
type Limiter struct {
	mu    sync.Mutex
	state map[string][]arrival // key -> each layer's theoretical arrival time
	// Near is the fraction of a burst that sets NearLimit; default 0.8.
	Near float64

	// The limiter's own time never goes back: a clock set back (by more
	// than jitter) moves skew forward by as much, so that every bucket
	// drains as it would have, instead of refusing its key for as long as
	// the clock was set back.
	last time.Time
	skew time.Duration
}

// jitter is how far back a caller's time may be, against the one before,
// without being taken for a clock set back: callers read the clock before
// they wait for the lock.
const jitter = time.Second

// clock turns a caller's time into the limiter's; under mu.
func (lim *Limiter) clock(now time.Time) time.Time {
	t := now.Add(lim.skew)
	if back := lim.last.Sub(t); back > jitter {
		lim.skew += back
		t = lim.last
	} else if back > 0 {
		t = lim.last
	}
	lim.last = t
	return t
}

// arrival is a layer's theoretical arrival time, kept by the layer's
// period with the interval it was counted in: when a key's layers change
// (reordered, narrowed), each period's use carries over, counted in
// requests, so changing limits never hands out a fresh bucket.
type arrival struct {
	per, interval time.Duration
	tat           time.Time
}

// New returns an empty Limiter.
func New() *Limiter { return &Limiter{state: map[string][]arrival{}} }

// Allow checks a request of cost (≥ 1) for key against layers at now, and
// takes it from every layer only if every layer allows it. The layers must
// have passed Check. A cost above a layer's burst is refused as TooLarge.
func (lim *Limiter) Allow(key string, layers []Layer, cost int, now time.Time) Result {
	if cost < 1 {
		cost = 1
	}
	near := lim.Near
	if near <= 0 || near > 1 {
		near = 0.8
	}
	lim.mu.Lock()
	defer lim.mu.Unlock()
	wall := now
	now = lim.clock(now)
	tats := tatsOf(lim.state[key], layers, now)
	res := Result{Allowed: true, Layers: make([]LayerResult, len(layers))}
	next := make([]time.Time, len(layers))
	for i, l := range layers {
		if cost > l.Burst { // never allowed; and the arithmetic below stays within range
			res.Allowed, res.TooLarge = false, true
			res.Layers[i].Refused = true
		}
	}
	for i, l := range layers {
		if res.TooLarge {
			next[i] = tats[i]
			res.Layers[i].Layer = l
			continue
		}
		tat := tats[i]
		if tat.Before(now) {
			tat = now
		}
		newTAT := tat.Add(l.interval() * time.Duration(cost))
		allowAt := newTAT.Add(-l.tolerance() - l.interval())
		lr := LayerResult{Layer: l}
		if allowAt.After(now) {
			res.Allowed = false
			lr.Refused = true
			res.RetryAfter = max(res.RetryAfter, allowAt.Sub(now))
			next[i] = tats[i]
		} else {
			next[i] = newTAT
		}
		res.Layers[i] = lr
	}
	if res.Allowed {
		tats = next
	}
	if res.TooLarge {
		res.RetryAfter = 0
	}
	full := true
	for i, l := range layers {
		tat := tats[i]
		if tat.Before(now) {
			tat = now
		}
		used := tat.Sub(now) // time the bucket needs to refill
		res.Layers[i].Reset = wall.Add(used)
		remaining := int(math.Floor(float64(l.tolerance()+l.interval()-used) / float64(l.interval())))
		res.Layers[i].Remaining = max(remaining, 0)
		if float64(l.Burst-res.Layers[i].Remaining) >= near*float64(l.Burst) {
			res.NearLimit = true
		}
		if used > 0 {
			full = false
		}
	}
	var st []arrival
	if !full {
		st = keep(lim.state[key], layers, tats, now)
	} else {
		st = keep(lim.state[key], nil, nil, now)
	}
	if len(st) == 0 {
		delete(lim.state, key) // full buckets need no state
	} else {
		lim.state[key] = st
	}
	return res
}

// tatsOf is each layer's arrival time in st, by period; a new period
// starts full. Two layers of one period would share it: Check's callers
// refuse them.
func tatsOf(st []arrival, layers []Layer, now time.Time) []time.Time {
	tats := make([]time.Time, len(layers))
	for _, a := range st {
		for i, l := range layers {
			if l.Per == a.per {
				tats[i] = a.carry(l, now)
			}
		}
	}
	return tats
}

// keep is the state to keep: every layer's at tats, and that of a period
// of st dropped from the layers while its bucket refills (it comes back
// as it was if the period is added again).
func keep(st []arrival, layers []Layer, tats []time.Time, now time.Time) []arrival {
	var out []arrival
	for i, l := range layers {
		out = append(out, arrival{l.Per, l.interval(), tats[i]})
	}
	for _, a := range st {
		if a.tat.After(now) && !slices.ContainsFunc(layers, func(l Layer) bool { return l.Per == a.per }) {
			out = append(out, a)
		}
	}
	return out
}

// Refund gives back a request of cost that Allow allowed for key with
// layers, when something checked after the limit refused it.
func (lim *Limiter) Refund(key string, layers []Layer, cost int, now time.Time) {
	lim.mu.Lock()
	defer lim.mu.Unlock()
	// The limiter's time, without moving it: a refund comes after the
	// check, and its time must not pass for a clock set back.
	if now = now.Add(lim.skew); now.Before(lim.last) {
		now = lim.last
	}
	st := lim.state[key]
	if st == nil {
		return
	}
	tats := tatsOf(st, layers, now)
	for i, l := range layers {
		tats[i] = tats[i].Add(-l.interval() * time.Duration(max(cost, 1)))
	}
	lim.state[key] = keep(st, layers, tats, now)
}

// carry is the arrival time for layer l of a period counted before in
// a.interval: the same number of requests used, even past l's burst (a
// narrowed layer then refuses until the excess drains, and widening it
// again hands out nothing). The time is bounded by half the longest
// duration (146 years, more than any bucket Check lets through holds), so
// that the arithmetic stays in range.
func (a arrival) carry(l Layer, now time.Time) time.Time {
	if a.interval == l.interval() || !a.tat.After(now) {
		return a.tat
	}
	used := float64(a.tat.Sub(now)) / float64(a.interval)
	return now.Add(time.Duration(min(math.Ceil(used*float64(l.interval())), float64(math.MaxInt64/2))))
}

// Forget drops a key's state (its key was revoked).
func (lim *Limiter) Forget(key string) {
	lim.mu.Lock()
	delete(lim.state, key)
	lim.mu.Unlock()
}

// Len is how many keys have state; for tests and metrics.
func (lim *Limiter) Len() int {
	lim.mu.Lock()
	defer lim.mu.Unlock()
	return len(lim.state)
}
