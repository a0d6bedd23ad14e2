// Package dynlimits (the dynamic_limits section of the configuration) says whether keywardd is overloaded, and by how much API
// keys' rate limits are scaled because of it: tightened by a factor while
// keywardd's CPU use or the HSM's latency is past its threshold, and,
// if configured, raised for keys in good standing while it is not.
//
// CPU is keywardd's own (getrusage), as a fraction of the machine's CPUs,
// sampled every SampleEvery. HSM latency is an exponentially weighted mean
// of every HSM operation's time, session wait included (hsm.SetObserver).
// Overload starts when either passes its threshold and ends when both are
// below 80 % of theirs, so the limits do not flap.
//
// Written here: a few lines over getrusage; a load-shedding library would
// drop calls, and keywardd must answer every call (refusing with
// RATE_LIMITED is an answer), only change what the limits allow.
package dynlimits

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Config is the configuration's dynamic_limits section.
type Config struct {
	Enabled bool `yaml:"enabled"`
	// CPU is the fraction of the machine's CPUs keywardd may use before it
	// counts as overloaded. Default 0.8.
	CPU float64 `yaml:"cpu"`
	// HSMLatency is the mean HSM operation time past which keywardd counts
	// as overloaded. Default 50 ms.
	HSMLatency time.Duration `yaml:"hsm_latency"`
	// Tighten scales every key's limits while overloaded. Default 0.5.
	Tighten float64 `yaml:"tighten"`
	// Raise, if above 1, scales the limits of keys in good standing while
	// keywardd is not overloaded; while it is, they keep their own.
	Raise float64 `yaml:"raise"`
	// GoodStanding is how long a key must have existed, without an
	// anomaly alert, to be in good standing. Default 720 h.
	GoodStanding time.Duration `yaml:"good_standing"`
	// SampleEvery is how often CPU use is measured. Default 5 s.
	SampleEvery time.Duration `yaml:"sample_every"`
}

// Check says what is wrong with the configuration.
func (c *Config) Check() error {
	var errs []error
	if c.CPU < 0 || c.CPU > 1 {
		errs = append(errs, errors.New("dynamic_limits.cpu is a fraction of the machine's CPUs, from 0 to 1"))
	}
	if c.Tighten != 0 && (c.Tighten < 0.01 || c.Tighten >= 1) {
		errs = append(errs, errors.New("dynamic_limits.tighten is a factor from 0.01 to less than 1 (0.5 halves every limit)"))
	}
	if c.Raise != 0 && (c.Raise <= 1 || c.Raise > 100) {
		errs = append(errs, errors.New("dynamic_limits.raise is a factor above 1, at most 100 (or 0: none)"))
	}
	if c.HSMLatency < 0 || c.GoodStanding < 0 || c.SampleEvery < 0 {
		errs = append(errs, errors.New("dynamic_limits: hsm_latency, good_standing and sample_every must not be negative"))
	}
	return errors.Join(errs...)
}

// Governor tracks the load.
type Governor struct {
	cfg        Config
	overloaded atomic.Bool
	// cpu returns the process's CPU time so far; getrusage by default.
	cpu func() time.Duration
	// clean says whether a key had no anomaly since a time; nil: all clean.
	clean func(id string, since time.Time) bool

	mu       sync.Mutex
	hsm      float64 // mean HSM operation time, in seconds
	hsmOps   int64   // operations since the last sample
	lastCPU  time.Duration
	lastWall time.Time
	cpuUse   float64
}

// New returns a governor. clean, if set, says whether a key had no anomaly
// alert since a time (the anomaly detector's Clean).
func New(c Config, clean func(id string, since time.Time) bool) *Governor {
	if c.CPU == 0 {
		c.CPU = 0.8
	}
	if c.HSMLatency == 0 {
		c.HSMLatency = 50 * time.Millisecond
	}
	if c.Tighten == 0 {
		c.Tighten = 0.5
	}
	if c.GoodStanding == 0 {
		c.GoodStanding = 30 * 24 * time.Hour
	}
	if c.SampleEvery == 0 {
		c.SampleEvery = 5 * time.Second
	}
	return &Governor{cfg: c, cpu: processCPU, clean: clean}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// callOps are the HSM operations calls make; the others (a key's
// creation, a health check, a reconnection's login) say nothing of the
// load calls meet.
var callOps = map[string]bool{"encrypt": true, "decrypt": true, "hmac": true, "sign": true}

// ObserveHSM counts one HSM operation's time, if it is one calls make.
func (g *Governor) ObserveHSM(op string, took time.Duration) {
	if !callOps[op] {
		return
	}
	g.mu.Lock()
	g.hsm += 0.05 * (took.Seconds() - g.hsm)
	g.hsmOps++
	g.mu.Unlock()
}

// Sample measures CPU use since the last sample and decides whether
// keywardd is overloaded. It returns the measures.
func (g *Governor) Sample(now time.Time) (cpu float64, hsm time.Duration, overloaded bool) {
	used := g.cpu()
	g.mu.Lock()
	if !g.lastWall.IsZero() && now.After(g.lastWall) {
		g.cpuUse = float64(used-g.lastCPU) / float64(now.Sub(g.lastWall)) / float64(runtime.NumCPU())
	}
	g.lastCPU, g.lastWall = used, now
	if g.hsmOps == 0 {
		g.hsm /= 2 // no operation: whatever was slow is not now
	}
	g.hsmOps = 0
	cpu, hsm = g.cpuUse, time.Duration(g.hsm*float64(time.Second))
	g.mu.Unlock()
	over := cpu >= g.cfg.CPU || hsm >= g.cfg.HSMLatency
	under := cpu < 0.8*g.cfg.CPU && hsm < time.Duration(0.8*float64(g.cfg.HSMLatency))
	switch {
	case over:
		g.overloaded.Store(true)
	case under:
		g.overloaded.Store(false)
	}
	return cpu, hsm, g.overloaded.Load()
}

// Overloaded says whether keywardd is overloaded now.
func (g *Governor) Overloaded() bool { return g.overloaded.Load() }

// Factor is the scale of a key's limits now: Tighten while overloaded
// (1 for a key in good standing, if Raise is set), else Raise for a key in
// good standing, else 1.
func (g *Governor) Factor(id string, created, now time.Time) float64 {
	good := g.cfg.Raise > 1 && now.Sub(created) >= g.cfg.GoodStanding && (g.clean == nil || g.clean(id, now.Add(-g.cfg.GoodStanding)))
	switch {
	case g.overloaded.Load() && good:
		return 1
	case g.overloaded.Load():
		return g.cfg.Tighten
	case good:
		return g.cfg.Raise
	}
	return 1
}

// Gauge is the factor for a key not in good standing, for the metrics:
// 1, or Tighten while overloaded.
func (g *Governor) Gauge() float64 {
	if g.overloaded.Load() {
		return g.cfg.Tighten
	}
	return 1
}

// Every is how often Sample should run.
func (g *Governor) Every() time.Duration { return g.cfg.SampleEvery }
