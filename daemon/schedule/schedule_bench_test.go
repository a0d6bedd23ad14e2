package schedule_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/schedule"
)

// BenchmarkTickAPIKeys: the scheduler's check with every API key under a
// rule (KEYWARD_BENCH_KEYS keys, default 10 000) and none due: what
// keywardd spends each rotation.check_every. The first Tick, which writes
// every entry, is reported as first-ms.
func BenchmarkTickAPIKeys(b *testing.B) {
	n := 10_000
	if env := os.Getenv("KEYWARD_BENCH_KEYS"); env != "" {
		var err error
		if n, err = strconv.Atoi(env); err != nil || n < 1 {
			b.Fatalf("KEYWARD_BENCH_KEYS: %q", env)
		}
	}
	f := newFixture(b)
	ctx := context.Background()
	for done := 0; done < n; {
		specs := make([]apikeys.Spec, min(1000, n-done))
		for i := range specs {
			specs[i] = apikeys.Spec{Owner: "o", Name: fmt.Sprint(done + i), Environment: "prod", Permissions: []string{"orders:read"}}
		}
		if _, _, err := f.akm.CreateMany(ctx, specs); err != nil {
			b.Fatal(err)
		}
		done += len(specs)
	}
	rules := &schedule.Rules{APIKeys: []schedule.APIKeyRule{{Environment: "prod", Policy: "high"}}}
	s := f.scheduler(rules, schedule.Config{})
	t0 := time.Now()
	if r, err := s.Tick(ctx); err != nil || len(r) != 0 {
		b.Fatal(r, err)
	}
	first := time.Since(t0)
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Tick(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(first.Milliseconds()), "first-ms")
	b.ReportMetric(float64(n), "keys")
}
