package ratelimit

import (
	"math"
	"time"
)

// Shared is the state of one key's layers kept outside any Limiter: the
// bucket a fleet of keywardd nodes shares, kept with the key's record in
// the store, from which each node takes requests in blocks (see
// daemon/apikeys). It is the Limiter's state for one key, by period, so a
// change of the layers carries the use over as it does there. The zero
// value is every bucket full.
type Shared []SharedLayer

// SharedLayer is one period's arrival time, with the interval it was
// counted in.
type SharedLayer struct {
	Per      time.Duration `json:"per"`
	Interval time.Duration `json:"interval"`
	TAT      time.Time     `json:"tat"`
}

func (s Shared) arrivals() []arrival {
	out := make([]arrival, len(s))
	for i, l := range s {
		out[i] = arrival{per: l.Per, interval: l.Interval, tat: l.TAT}
	}
	return out
}

func shared(st []arrival) Shared {
	var out Shared
	for _, a := range st {
		out = append(out, SharedLayer{Per: a.per, Interval: a.interval, TAT: a.tat})
	}
	return out
}

// Take charges owed requests to the bucket whatever it holds (requests
// already allowed on credit: the bucket then refuses until they drain),
// then takes as many requests as every layer allows, up to want; fewer
// than need (≥ 0) is none. It returns how many it took, the state after,
// and, if it took fewer than need, how long until need would pass. The
// layers must have passed Check; time is the caller's wall clock.
func (s Shared) Take(layers []Layer, owed, need, want int, now time.Time) (took int, next Shared, retry time.Duration) {
	st := s.arrivals()
	tats := tatsOf(st, layers, now)
	avail := want
	for i, l := range layers {
		if tats[i].Before(now) {
			tats[i] = now
		}
		tats[i] = addCount(tats[i], l.interval(), owed)
		// Requests this layer allows now: GCRA allows n while
		// tat + n·interval - tolerance - interval <= now.
		room := now.Add(l.tolerance() + l.interval()).Sub(tats[i])
		avail = min(avail, int(max(room, 0)/l.interval()))
	}
	if avail < need {
		for i, l := range layers {
			if at := addCount(tats[i], l.interval(), need).Add(-l.tolerance() - l.interval()); at.After(now) {
				retry = max(retry, at.Sub(now))
			}
		}
		avail = 0
	}
	for i, l := range layers {
		tats[i] = addCount(tats[i], l.interval(), avail)
	}
	return avail, shared(keep(st, layers, tats, now)), retry
}

// Give returns n requests taken and not used.
func (s Shared) Give(layers []Layer, n int, now time.Time) Shared {
	st := s.arrivals()
	tats := tatsOf(st, layers, now)
	for i, l := range layers {
		tats[i] = addCount(tats[i], l.interval(), -n)
		if tats[i].Before(now) {
			tats[i] = now
		}
	}
	return shared(keep(st, layers, tats, now))
}

// addCount is t moved by n requests of interval, within half the longest
// duration of now either way (as carry bounds it).
func addCount(t time.Time, interval time.Duration, n int) time.Time {
	d := float64(interval) * float64(n)
	d = max(min(d, math.MaxInt64/2), -math.MaxInt64/2)
	return t.Add(time.Duration(d))
}

// MinBurst is the smallest burst of layers, 0 if none.
func MinBurst(layers []Layer) int {
	b := 0
	for i, l := range layers {
		if i == 0 || l.Burst < b {
			b = l.Burst
		}
	}
	return b
}
