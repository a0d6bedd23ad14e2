package apikeys

import (
	"encoding/json"
	"math"
	"time"
)

// Latency of verifications. Verify measures each verification of a known
// key with the monotonic clock, from the call's start to its decision (the
// HMAC in the HSM, the store read and, on a fleet, the wait for a block
// included), and counts it in its hour's LatencyHistogram: a fixed array
// of counters, so the hot path costs a few comparisons and an increment,
// and a key's hour stays the same size however busy it is.

// monoEpoch anchors monoNow.
var monoEpoch = time.Now()

// monoNow reads the monotonic clock alone: time.Since of a time that has a
// monotonic reading reads only that clock, where time.Now reads the wall
// clock too (measured: a pair of monoNow costs 58 ns here, time.Now and
// time.Since 72 ns).
func monoNow() time.Duration { return time.Since(monoEpoch) }

// LatencyBounds are the upper bounds of the latency buckets, shared by the
// store, the API, the CLI and the dashboard. They are part of the stored
// format (docs/formats.md): changing them needs a new field. Chosen for
// what a verification waits for: a key already seen takes about a
// microsecond in the process (10 µs and under); SoftHSM2's HMAC tens of
// microseconds; a network HSM or a slow disk up to milliseconds; on a
// fleet, a wait for a block from etcd, at most a second.
var LatencyBounds = [...]time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, time.Second,
}

// LatencyBuckets is the length of a LatencyHistogram: a bucket per bound
// and the overflow.
const LatencyBuckets = len(LatencyBounds) + 1

// LatencyHistogram counts verifications by latency: element i those that
// took at most LatencyBounds[i] (and more than the bound before it), the
// last those slower than every bound. The zero value is no data. In JSON
// it is an array of LatencyBuckets counts.
type LatencyHistogram [LatencyBuckets]int64

// latencyBucket is the bucket of a latency.
func latencyBucket(d time.Duration) int {
	for i, b := range LatencyBounds {
		if d <= b {
			return i
		}
	}
	return len(LatencyBounds)
}

func (h *LatencyHistogram) add(d *LatencyHistogram) {
	for i, n := range d {
		h[i] += n
	}
}

// UnmarshalJSON reads a stored histogram. One of another length (bounds no
// version of keyward used, or a damaged record) or with a negative count
// reads as no data, not as an error: its buckets cannot be summed with
// these, and the hour's other counts are still good. The next flush of
// that hour then writes only what this node measured since.
func (h *LatencyHistogram) UnmarshalJSON(b []byte) error {
	var counts []int64
	if err := json.Unmarshal(b, &counts); err != nil {
		return err
	}
	*h = LatencyHistogram{}
	if len(counts) != LatencyBuckets {
		return nil
	}
	for _, n := range counts {
		if n < 0 {
			return nil
		}
	}
	copy(h[:], counts)
	return nil
}

// LatencyEstimate is a latency quantile read off a histogram: at most
// Bound or, when Over, more than Bound (the overflow bucket has no upper
// bound).
type LatencyEstimate struct {
	Bound time.Duration
	Over  bool
}

// String is "≤1ms", or ">1s" past the last bound.
func (e LatencyEstimate) String() string {
	if e.Over {
		return ">" + e.Bound.String()
	}
	return "≤" + e.Bound.String()
}

// LatencyQuantile estimates the q-quantile (0 < q ≤ 1: 0.5 for the median,
// 0.99 for p99) of the latencies counted in counts, a histogram over
// bounds: len(bounds)+1 counts, the last the overflow (LatencyHistogram
// over LatencyBounds; a client passes what GetAPIKeyUsage answers). The
// estimate is the bucket the quantile falls in, the first whose cumulative
// count reaches q of the total: the quantile is at most its bound (or more
// than the last bound). ok is false when there is nothing to estimate
// from: no count, counts of another length than bounds call for, or q out
// of range. Negative counts (never written) count as none.
func LatencyQuantile(bounds []time.Duration, counts []int64, q float64) (e LatencyEstimate, ok bool) {
	if len(bounds) == 0 || len(counts) != len(bounds)+1 || !(q > 0 && q <= 1) {
		return LatencyEstimate{}, false
	}
	var total int64
	for _, n := range counts {
		total += max(n, 0)
	}
	if total <= 0 {
		return LatencyEstimate{}, false
	}
	rank := min(max(int64(math.Ceil(q*float64(total))), 1), total)
	var seen int64
	for i, n := range counts[:len(bounds)] {
		if seen += max(n, 0); seen >= rank {
			return LatencyEstimate{Bound: bounds[i]}, true
		}
	}
	return LatencyEstimate{Bound: bounds[len(bounds)-1], Over: true}, true
}
