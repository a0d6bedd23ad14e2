package apikeys

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/ratelimit"
)

// The verify path against its parts, measured in one run: BenchmarkHSMHMAC
// is the raw HSM call a first verify of a key makes; BenchmarkVerifyCold
// pays it on every verify; BenchmarkVerifyCached is the steady state (digest
// cache, a store read, the checks, no HSM call). Compare ratios, not
// absolute numbers.

// benchSpec is a key without rate limits: the clock of a benchmark's
// fixture stands still, and a limit would refuse all but its burst.
func benchSpec() Spec {
	s := spec()
	s.Limits = []ratelimit.Layer{}
	return s
}

// BenchmarkVerifyStranger: a well-formed key nobody issued, refused by its
// missing hint before any HSM call.
func BenchmarkVerifyStranger(b *testing.B) {
	f := newFixture(b)
	f.create(b, benchSpec())
	key, err := Generate("kwtest", rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != NotFound {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

func BenchmarkHSMHMAC(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, benchSpec())
	ctx := context.Background()
	for b.Loop() {
		if _, err := f.h.HMACSHA256(ctx, pepper, []byte(key)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyCold(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, benchSpec())
	ctx := context.Background()
	for b.Loop() {
		f.m.mu.Lock()
		clear(f.m.digests)
		f.m.mu.Unlock()
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

func BenchmarkVerifyCached(b *testing.B) {
	f := newFixture(b)
	key, _ := f.create(b, benchSpec())
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

// BenchmarkVerifyCachedQuota: a key with a usage quota; its use is saved by
// Flush, not by Verify (a write per verify measured 40 times slower).
func BenchmarkVerifyCachedQuota(b *testing.B) {
	f := newFixture(b)
	s := benchSpec()
	s.Quota = &Quota{Remaining: 1 << 40}
	key, _ := f.create(b, s)
	ctx := context.Background()
	for b.Loop() {
		if res := f.m.Verify(ctx, key, prod); res.Code != Valid {
			b.Fatal(res.Code, res.Detail)
		}
	}
}

// BenchmarkVerifyScale verifies keys in stores of 1 000 and 1 000 000 keys
// (named 1000keys, not keys=1000: SoftHSM2 cannot read a configuration
// whose token directory has an "=" in its path, and the name is in it)
// (KEYWARD_BENCH_KEYS overrides the list, e.g. "1000,100000"): the p99 of a
// cached verify, the process's RSS after loading, and how long opening the
// store and verifying a first key takes (what a restart costs).
func BenchmarkVerifyScale(b *testing.B) {
	sizes := []int{1_000, 1_000_000}
	if env := os.Getenv("KEYWARD_BENCH_KEYS"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("KEYWARD_BENCH_KEYS: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("%dkeys", n), func(b *testing.B) {
			f := newFixture(b)
			sample := load(b, f, n)
			f.store.Close()
			start := time.Now()
			f.reopen(b)
			if res := f.m.Verify(context.Background(), sample[0], prod); res.Code != Valid {
				b.Fatal(res.Code, res.Detail)
			}
			open := time.Since(start)
			for _, k := range sample {
				f.m.Verify(context.Background(), k, prod) // known from here on
			}
			runtime.GC()
			var took []time.Duration
			i := 0
			for b.Loop() {
				t0 := time.Now()
				res := f.m.Verify(context.Background(), sample[i%len(sample)], prod)
				took = append(took, time.Since(t0))
				if res.Code != Valid {
					b.Fatal(res.Code, res.Detail)
				}
				i++
			}
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)*99/100].Nanoseconds())/1e3, "p99-µs")
			b.ReportMetric(float64(rss())/(1<<20), "rss-MiB")
			b.ReportMetric(float64(open.Milliseconds()), "open+first-ms")
		})
	}
}

// load issues n keys in batches from two goroutines and returns up to
// 10 000 of their secrets, spread over the whole set.
func load(b *testing.B, f *fixture, n int) []string {
	b.Helper()
	var (
		mu     sync.Mutex
		sample []string
		wg     sync.WaitGroup
		errs   = make(chan error, 2)
		next   atomic.Int64
		every  = max(n/10_000, 1)
		issued atomic.Int64
	)
	for range 2 {
		wg.Go(func() {
			for {
				lo := int(next.Add(MaxCreateBatch)) - MaxCreateBatch
				if lo >= n {
					return
				}
				specs := make([]Spec, min(MaxCreateBatch, n-lo))
				for i := range specs {
					specs[i] = benchSpec()
				}
				secrets, _, err := f.m.CreateMany(context.Background(), specs)
				if err != nil {
					errs <- err
					return
				}
				issued.Add(int64(len(secrets)))
				mu.Lock()
				for i, s := range secrets {
					if (lo+i)%every == 0 {
						sample = append(sample, s)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	if issued.Load() != int64(n) {
		b.Fatalf("issued %d keys, want %d", issued.Load(), n)
	}
	return sample
}

// rss is the process's resident set size in bytes (Linux).
func rss() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return -1
}
