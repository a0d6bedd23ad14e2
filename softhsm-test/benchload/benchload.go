// Package benchload runs a benchmark's operation from several concurrent
// callers and reports what keyward's numbers are compared by: throughput
// (ops/s) and the latency of single calls at the median and the 99th
// percentile. testing.B reports only the mean time per operation, which hides
// the tail that callers of a shared HSM feel.
package benchload

import (
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Callers are the concurrency levels every keyward benchmark runs at.
var Callers = []int{1, 2, 4, 8}

// Result is what one Run measured.
type Result struct {
	OpsPerSec float64
	P50, P99  time.Duration
	// CPU is the process's CPU time (user and system, every thread: the
	// callers' and, in process, the server's) per operation.
	CPU time.Duration
}

// Run calls op b.N times in all, from callers goroutines at once, and
// reports ops/s, p50-µs, p99-µs and cpu-µs/op. An error from op fails the
// benchmark.
func Run(b *testing.B, callers int, op func() error) Result {
	b.Helper()
	return RunAtLeast(b, callers, 0, op)
}

// RunAtLeast is Run calling op at least calls times, whatever b.N is: for
// a benchmark run once (-benchtime 1x) whose percentiles must still be of
// a distribution.
func RunAtLeast(b *testing.B, callers, calls int, op func() error) Result {
	b.Helper()
	total := int64(max(b.N, calls))
	lat := make([][]time.Duration, callers)
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for c := range callers {
		wg.Go(func() {
			for next.Add(1) <= total {
				t0 := time.Now()
				if err := op(); err != nil {
					b.Error(err)
					return
				}
				lat[c] = append(lat[c], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	all := slices.Concat(lat...)
	if len(all) == 0 {
		return Result{}
	}
	slices.Sort(all)
	r := Result{OpsPerSec: float64(len(all)) / elapsed.Seconds(), P50: percentile(all, 0.50), P99: percentile(all, 0.99), CPU: cpu / time.Duration(len(all))}
	b.ReportMetric(r.OpsPerSec, "ops/s")
	b.ReportMetric(micros(r.P50), "p50-µs")
	b.ReportMetric(micros(r.P99), "p99-µs")
	b.ReportMetric(micros(r.CPU), "cpu-µs/op")
	if total > int64(b.N) { // the framework's ns/op divides by b.N
		b.ReportMetric(float64(elapsed.Nanoseconds())/float64(len(all)), "ns/op")
	}
	return r
}

// percentile picks the value at fraction q of sorted (nearest rank).
func percentile(sorted []time.Duration, q float64) time.Duration {
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
