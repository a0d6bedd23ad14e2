package dynlimits

import (
	"runtime"
	"testing"
	"time"
)

// TestHSMLatencyTightens: slow HSM operations make keywardd overloaded and
// every key's limits tighten, except those in good standing when raise is
// set; fast ones end it, and keys in good standing are raised.
func TestHSMLatencyTightens(t *testing.T) {
	anomalous := map[string]bool{"ak_bad": true}
	g := New(Config{Enabled: true, HSMLatency: 20 * time.Millisecond, Tighten: 0.5, Raise: 2, GoodStanding: 24 * time.Hour},
		func(id string, _ time.Time) bool { return !anomalous[id] })
	g.cpu = func() time.Duration { return 0 }
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	old, young := now.Add(-48*time.Hour), now.Add(-time.Hour)
	if f := g.Factor("ak_old", old, now); f != 2 {
		t.Fatalf("a key in good standing, not overloaded: %v, want 2", f)
	}
	// Slow operations that calls do not make count for nothing.
	for _, op := range []string{"health", "create key", "random", "load signing key"} {
		g.ObserveHSM(op, 5*time.Second)
	}
	if _, hsm, over := g.Sample(now.Add(-time.Second)); over || hsm != 0 {
		t.Fatalf("a slow health check or key creation: %v, overloaded %v", hsm, over)
	}
	for range 100 {
		g.ObserveHSM("encrypt", 100*time.Millisecond)
	}
	if _, hsm, over := g.Sample(now); !over || hsm < 20*time.Millisecond {
		t.Fatalf("after slow HSM operations: %v, overloaded %v", hsm, over)
	}
	for id, want := range map[string]float64{"ak_young": 0.5, "ak_bad": 0.5, "ak_old": 1} {
		created := young
		if id != "ak_young" {
			created = old
		}
		if f := g.Factor(id, created, now); f != want {
			t.Errorf("%s under load: %v, want %v", id, f, want)
		}
	}
	if g.Gauge() != 0.5 {
		t.Errorf("gauge %v", g.Gauge())
	}
	// A little faster, still above 80 % of the threshold: still overloaded.
	for range 40 {
		g.ObserveHSM("hmac", 18*time.Millisecond)
	}
	if _, _, over := g.Sample(now.Add(5 * time.Second)); !over {
		t.Fatal("overload ended above 80 % of the threshold")
	}
	for range 200 {
		g.ObserveHSM("sign", time.Millisecond)
	}
	if _, hsm, over := g.Sample(now.Add(10 * time.Second)); over {
		t.Fatalf("still overloaded at %v", hsm)
	}
	if g.Factor("ak_young", young, now) != 1 || g.Factor("ak_old", old, now) != 2 || g.Factor("ak_bad", old, now) != 1 {
		t.Error("factors after the load")
	}
}

// TestCPUTightens: keywardd using the whole machine is overloaded.
func TestCPUTightens(t *testing.T) {
	g := New(Config{Enabled: true, CPU: 0.8}, nil)
	used := time.Duration(0)
	g.cpu = func() time.Duration { return used }
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	g.Sample(now)
	used += time.Duration(runtime.NumCPU()) * 900 * time.Millisecond // 90 % of every CPU for a second
	if cpu, _, over := g.Sample(now.Add(time.Second)); !over || cpu < 0.89 || cpu > 0.91 {
		t.Fatalf("cpu %v, overloaded %v", cpu, over)
	}
	if f := g.Factor("ak", now.Add(-1000*time.Hour), now); f != 0.5 {
		t.Fatalf("factor %v, want the default 0.5 (no raise configured)", f)
	}
	used += time.Duration(runtime.NumCPU()) * 100 * time.Millisecond
	if _, _, over := g.Sample(now.Add(2 * time.Second)); over {
		t.Fatal("still overloaded at 10 %")
	}
}

func TestConfigCheck(t *testing.T) {
	for name, c := range map[string]Config{"cpu": {CPU: 2}, "tighten": {Tighten: 1.5}, "raise": {Raise: 0.5}, "negative": {HSMLatency: -1}} {
		if err := c.Check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
