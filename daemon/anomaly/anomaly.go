// Package anomaly watches how each API key is used and says when that
// changes sharply: a spike in its request rate over its baseline for the
// hour of day, or a use from a network it was never used from.
//
// A key's baseline is an exponentially weighted mean of its requests per
// minute for each of the 24 hours of the day (UTC), folded in minute by
// minute, idle minutes as zero: a key busy by day and quiet by night has a
// high daytime and a low night-time baseline, and a night-time burst that
// would pass by day is a spike. The rate over the last Window, and that of
// the current minute alone (so that a sharp spike alerts within a minute),
// are compared with Factor times the baseline of the hour (or MinRate per
// minute, if higher: a key used once an hour does not alert at its eighth
// request).
// Networks are counted as the usage report counts them (a /24 or a /64).
// A key is only learned from during its first Learn, not alerted on; a
// key alerts at most once per Cooldown and kind.
//
// Only VALID verifications are observed: a rotated-out or refused secret
// must neither teach a baseline nor set off an alert that disables the
// key its owner holds now. Observe is on VerifyAPIKey's path: a map
// lookup under one of 64 shard locks and a few additions under the key's; alerts are handed to a goroutine that audits them,
// tells the plugins and, if configured, disables the key. Baselines are
// written to the store every FlushEvery and read back at start, so a
// restart keeps what was learned.
//
// Written here: the statistics are a few lines; the anomaly-detection
// libraries in Go are for time series in bulk, not a per-key check on the
// request path.
package anomaly

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/store"
)

// Kinds of alerts.
const (
	Spike      = "spike"
	NewNetwork = "new_network"
)

// Config is the configuration's anomaly section.
type Config struct {
	// Enabled turns detection on.
	Enabled bool `yaml:"enabled"`
	// Window is how far back the current rate is measured. Default 5 m.
	Window time.Duration `yaml:"window"`
	// Factor: a rate this many times the baseline is a spike. Default 8.
	Factor float64 `yaml:"factor"`
	// MinRate: requests per minute below which no rate is a spike.
	// Default 10.
	MinRate float64 `yaml:"min_rate"`
	// Learn is how long a key is only learned from, from its first use
	// keywardd saw. Default 168 h (a week: every hour of every day).
	Learn time.Duration `yaml:"learn"`
	// NewNetworks alerts on a use from a network the key was not used
	// from before (after Learn).
	NewNetworks bool `yaml:"new_networks"`
	// Disable lists the kinds of alerts that disable the key at once
	// (spike, new_network); the others only alert.
	Disable []string `yaml:"disable"`
	// Cooldown: at most one alert per key and kind this often. Default 1 h.
	Cooldown time.Duration `yaml:"cooldown"`
	// FlushEvery: how often baselines are written. Default 1 m.
	FlushEvery time.Duration `yaml:"flush_every"`
}

// Check says what is wrong with the configuration.
func (c *Config) Check() error {
	var errs []error
	if c.Window < 0 || c.Learn < 0 || c.Cooldown < 0 || c.FlushEvery < 0 || c.Factor < 0 || c.MinRate < 0 {
		errs = append(errs, errors.New("anomaly: window, factor, min_rate, learn, cooldown and flush_every must not be negative"))
	}
	if c.Window != 0 && (c.Window < time.Minute || c.Window > time.Hour || c.Window%time.Minute != 0) {
		errs = append(errs, errors.New("anomaly.window: whole minutes from 1m to 1h"))
	}
	if c.Factor != 0 && c.Factor < 2 {
		errs = append(errs, errors.New("anomaly.factor: at least 2 (8 is the usual)"))
	}
	for _, d := range c.Disable {
		if d != Spike && d != NewNetwork {
			errs = append(errs, fmt.Errorf("anomaly.disable: %q: use spike or new_network", d))
		}
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.Window == 0 {
		c.Window = 5 * time.Minute
	}
	if c.Factor == 0 {
		c.Factor = 8
	}
	if c.MinRate == 0 {
		c.MinRate = 10
	}
	if c.Learn == 0 {
		c.Learn = 7 * 24 * time.Hour
	}
	if c.Cooldown == 0 {
		c.Cooldown = time.Hour
	}
	if c.FlushEvery == 0 {
		c.FlushEvery = time.Minute
	}
	return c
}

// alpha weighs each minute into its hour's mean: about the last 100
// minutes of that hour of day count, two days' worth.
const alpha = 0.01

// Bounds: networks remembered per key, keys held in memory.
const maxNetworks = 64

var maxKeys = 100_000 // a variable for the tests

// Baseline is what is learned of a key, as the store keeps it.
type Baseline struct {
	// PerMinute is the mean requests per minute by hour of day (UTC).
	PerMinute [24]float64 `json:"per_minute"`
	// Since is when keywardd first saw the key used.
	Since time.Time `json:"since"`
	// Networks are the networks it was used from, at most maxNetworks.
	Networks []string `json:"networks,omitempty"`
	// LastAlert is when the key last alerted.
	LastAlert time.Time `json:"last_alert,omitzero"`
}

// Alert is a change in a key's use.
type Alert struct {
	Kind   string
	KeyID  string
	Time   time.Time
	Detail string
	// Disable: the configuration says to disable the key.
	Disable bool
}

// key is a key's state in memory.
type key struct {
	mu       sync.Mutex
	b        Baseline
	minute   int64   // the current minute (Unix minutes)
	counts   []int64 // the window's counts per minute, a ring: minute m at m % len
	sum      int64   // over the window
	last     [2]time.Time
	dirty    bool
	lastSeen time.Time
	lastNet  netip.Prefix // the network of the last use, known: the next use from it needs no lookup
}

// Detector watches keys. Its keys are spread over shards, each with its
// lock, so that verifications of different keys seldom wait for each
// other, and the store is written outside every lock.
type Detector struct {
	cfg    Config
	st     *store.Store
	alerts chan Alert
	shards [shards]shard
	// dropped counts alerts lost because nobody took them in time.
	dropped atomic.Int64
	writeMu sync.Mutex
	pending sync.WaitGroup // letGo writes under way
}

const shards = 64

type shard struct {
	mu   sync.Mutex
	keys map[string]*key
	// writing holds keys let go of until their baselines are written, so
	// that a use meanwhile takes the key back instead of reading an older
	// baseline from the store.
	writing map[string]*letting
}

// letting is a key let go of by one eviction: the next eviction of the
// same key, taken back meanwhile, is another.
type letting struct{ k *key }

// New returns a detector whose alerts come out of Alerts.
func New(c Config, st *store.Store) *Detector {
	d := &Detector{cfg: c.withDefaults(), st: st, alerts: make(chan Alert, 1024)}
	for i := range d.shards {
		d.shards[i].keys, d.shards[i].writing = map[string]*key{}, map[string]*letting{}
	}
	return d
}

// Alerts are the alerts, in order.
func (d *Detector) Alerts() <-chan Alert { return d.alerts }

// Disables says whether alerts of a kind disable the key.
func (d *Detector) Disables(kind string) bool { return slices.Contains(d.cfg.Disable, kind) }

func (d *Detector) shard(id string) *shard {
	h := uint32(2166136261) // FNV-1a, inline: no allocation on the verify path
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return &d.shards[h%shards]
}

// held returns the key if the shard holds it, taking it back from those
// being written; sh.mu must be held.
func (sh *shard) held(id string) *key {
	if k := sh.keys[id]; k != nil {
		return k
	}
	if l := sh.writing[id]; l != nil {
		delete(sh.writing, id)
		sh.keys[id] = l.k
		return l.k
	}
	return nil
}

// get returns the key's state, read from the store the first time. A
// shard holding its share of maxKeys first lets go of the keys idle for an
// hour, or if none is, of half its keys; they are written to the store in
// the background and taken back if used meanwhile.
func (d *Detector) get(id string, now time.Time) *key {
	sh := d.shard(id)
	sh.mu.Lock()
	k := sh.held(id)
	sh.mu.Unlock()
	if k != nil {
		return k
	}
	k = &key{counts: make([]int64, d.cfg.Window/time.Minute), minute: now.Unix() / 60}
	if b, err := d.st.Get(store.BucketBaselines, id); err == nil {
		json.Unmarshal(b, &k.b)
	}
	if k.b.Since.IsZero() {
		k.b.Since, k.dirty = now.UTC(), true
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if other := sh.held(id); other != nil { // read meanwhile by another call
		return other
	}
	if len(sh.keys) >= maxKeys/shards {
		out := map[string]*key{}
		for id, k := range sh.keys {
			k.mu.Lock()
			if now.Sub(k.lastSeen) > time.Hour {
				out[id] = k
			}
			k.mu.Unlock()
		}
		if len(out) == 0 { // none idle: half of them
			for id, k := range sh.keys {
				if len(out) >= len(sh.keys)/2 {
					break
				}
				out[id] = k
			}
		}
		ls := make(map[string]*letting, len(out))
		for id, k := range out {
			delete(sh.keys, id)
			ls[id] = &letting{k}
			sh.writing[id] = ls[id]
		}
		d.pending.Add(1)
		go d.letGo(sh, out, ls)
	}
	sh.keys[id] = k
	return k
}

// letGo writes the baselines of keys let go of and forgets them, unless
// they were taken back meanwhile; if the write fails they are kept.
func (d *Detector) letGo(sh *shard, out map[string]*key, ls map[string]*letting) {
	defer d.pending.Done()
	err := d.write(out)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for id, l := range ls {
		if sh.writing[id] != l {
			continue // taken back (and perhaps let go of again, by another eviction)
		}
		delete(sh.writing, id)
		if err != nil {
			sh.keys[id] = l.k
		}
	}
}

// advance folds the minutes between k.minute and now into the baseline.
func (d *Detector) advance(k *key, now time.Time) {
	m := now.Unix() / 60
	if m <= k.minute {
		return
	}
	n := int64(len(k.counts))
	steps := min(m-k.minute, 24*60) // a day of idle minutes is as far as it matters
	for i := int64(0); i < steps; i++ {
		minute := k.minute + i
		c := k.counts[minute%n]
		h := time.Unix(minute*60, 0).UTC().Hour()
		k.b.PerMinute[h] += alpha * (float64(c) - k.b.PerMinute[h])
		// The minute leaves the window once the window has moved past it.
		next := minute + 1
		k.sum -= k.counts[next%n]
		k.counts[next%n] = 0
	}
	if m-k.minute > steps {
		clear(k.counts)
		k.sum = 0
	}
	k.minute, k.dirty = m, true
}

// Observe counts one use of a key, from ip (zero: unknown), at now. A use
// that was refused (learn false: a live secret used from outside its
// allowlist, in the wrong environment, beyond its permissions or limits)
// counts toward the rate and may alert, but its network is not learned.
func (d *Detector) Observe(id string, ip netip.Addr, now time.Time, learn bool) {
	k := d.get(id, now)
	k.mu.Lock()
	defer k.mu.Unlock()
	d.advance(k, now)
	k.counts[k.minute%int64(len(k.counts))]++
	k.sum++
	k.lastSeen = now
	learning := now.Sub(k.b.Since) < d.cfg.Learn
	if ip.IsValid() && !k.lastNet.Contains(ip.Unmap()) {
		if net := apikeys.Network(ip); slices.Contains(k.b.Networks, net) {
			k.lastNet, _ = netip.ParsePrefix(net)
		} else {
			if learn && len(k.b.Networks) < maxNetworks { // past that, every new one alerts and none is learned
				k.b.Networks, k.dirty = append(k.b.Networks, net), true
				k.lastNet, _ = netip.ParsePrefix(net)
			}
			if !learning && d.cfg.NewNetworks {
				d.alert(k, 1, Alert{Kind: NewNetwork, KeyID: id, Time: now, Detail: fmt.Sprintf("a use from %s, a network the key was not used from before", net)})
			}
		}
	}
	if learning {
		return
	}
	// The rate: over the window, or over this minute alone if higher, so
	// that a sharp spike alerts within a minute and a sustained one too.
	rate := max(float64(k.sum)/d.cfg.Window.Minutes(), float64(k.counts[k.minute%int64(len(k.counts))]))
	base := k.b.PerMinute[now.UTC().Hour()]
	if limit := max(d.cfg.Factor*base, d.cfg.MinRate); rate >= limit {
		d.alert(k, 0, Alert{Kind: Spike, KeyID: id, Time: now, Detail: fmt.Sprintf("%.1f requests a minute (this minute or over the last %v); its usual at %02d:00 UTC is %.2f, and %.1f (%.0f times that, at least %.0f) is a spike",
			rate, d.cfg.Window, now.UTC().Hour(), base, limit, d.cfg.Factor, d.cfg.MinRate)})
	}
}

// alert hands an alert on, at most once per cooldown per key and kind.
func (d *Detector) alert(k *key, slot int, a Alert) {
	if !k.last[slot].IsZero() && a.Time.Sub(k.last[slot]) < d.cfg.Cooldown {
		return
	}
	a.Disable = d.Disables(a.Kind)
	select {
	case d.alerts <- a:
		k.last[slot], k.b.LastAlert, k.dirty = a.Time, a.Time.UTC(), true
	default:
		d.dropped.Add(1) // no cooldown: the next use alerts again
	}
}

// Clean says whether a key has not alerted since a time, as far as this
// detector knows (a key not seen since keywardd started is clean until it
// is seen).
func (d *Detector) Clean(id string, since time.Time) bool {
	sh := d.shard(id)
	sh.mu.Lock()
	k := sh.keys[id]
	sh.mu.Unlock()
	if k == nil {
		return true
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return !k.b.LastAlert.After(since)
}

// Baseline returns what is learned of a key (for tests and reports).
func (d *Detector) Baseline(id string, now time.Time) Baseline {
	k := d.get(id, now)
	k.mu.Lock()
	defer k.mu.Unlock()
	d.advance(k, now)
	b := k.b
	b.Networks = slices.Clone(b.Networks)
	return b
}

// Flush writes the changed baselines, after the writes of keys let go of
// that are under way (the store may close next).
func (d *Detector) Flush() error {
	d.pending.Wait()
	all := map[string]*key{}
	for i := range d.shards {
		sh := &d.shards[i]
		sh.mu.Lock()
		for id, k := range sh.keys {
			all[id] = k
		}
		sh.mu.Unlock()
	}
	return d.write(all)
}

// write writes the changed baselines of keys in one transaction, outside
// every lock but each key's for its copy; those not written stay changed.
func (d *Detector) write(keys map[string]*key) error {
	// One write at a time, from copy to commit: a later copy of a key is
	// never overwritten by an earlier one.
	d.writeMu.Lock()
	defer d.writeMu.Unlock()
	recs := map[string][]byte{}
	for id, k := range keys {
		k.mu.Lock()
		if k.dirty {
			if b, err := json.Marshal(&k.b); err == nil {
				recs[id], k.dirty = b, false
			}
		}
		k.mu.Unlock()
	}
	if len(recs) == 0 {
		return nil
	}
	err := d.st.UpdateEach(store.BucketBaselines, slices.Sorted(maps.Keys(recs)), func(id string, _ []byte) ([]byte, error) { return recs[id], nil })
	if err != nil {
		for id := range recs {
			k := keys[id]
			k.mu.Lock()
			k.dirty = true
			k.mu.Unlock()
		}
	}
	return err
}

// Dropped is how many alerts were lost because they came faster than
// they were handled (more than 1024 waiting).
func (d *Detector) Dropped() int64 { return d.dropped.Load() }
