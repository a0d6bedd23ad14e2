// Package anomaly watches how each API key is used and says when that
// changes sharply: a spike in its request rate over its baseline for the
// hour of day, a use from a network it was never used from, or (with a
// GeoIP database) from a country it was never used from.
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
// Networks are counted as the usage report counts them (a /24 or a /64);
// countries as the API keys' GeoIP database names them, a use whose
// country is unknown neither teaching one nor alerting.
// A key is only learned from during its first Learn, not alerted on; a
// key alerts at most once per Cooldown and kind.
//
// Observe is told of the uses of a key's live secret: VALID ones, which
// count toward the rate and teach the baseline and the networks, and those
// refused for where or how the secret was used (network, environment,
// permission), which may raise a new-network alert but teach nothing. A
// rotated-out, revoked or disabled key's uses, and those the key's own
// limits refused, are not observed: an old secret must not set off an
// alert that disables the key its owner holds now, and a client retrying
// into its rate limit is not an anomaly.
//
// Observe is on VerifyAPIKey's path: a map lookup under one of 64 shard
// locks and a few additions under the key's, no allocation. Alerts are
// handed to a goroutine that audits them, tells the plugins and, if
// configured, disables the key. Baselines, cooldowns included, are written
// to the store shard by shard every FlushEvery and read back when a key is
// next used, so a restart keeps what was learned. A shard past its share of
// maxKeys writes and lets go of its idle keys (or, if too few are idle, its
// least recently used quarter) in one transaction: the verify of a new key
// that finds its shard full does that write; no other verify waits for a
// disk.
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
	NewCountry = "new_country"
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
	// NewCountries alerts on a use from a country the key was not used
	// from before (after Learn); it needs a GeoIP database (geoip).
	NewCountries bool `yaml:"new_countries"`
	// Disable lists the kinds of alerts that disable the key at once
	// (spike, new_network, new_country), and Revoke those that revoke it; the others
	// only alert. A use that sets off an alert that disables or revokes the
	// key is refused, as is every use of it until the key is changed.
	Disable []string `yaml:"disable"`
	Revoke  []string `yaml:"revoke"`
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
	kind := func(k string) bool { return k == Spike || k == NewNetwork || k == NewCountry }
	for _, d := range c.Disable {
		if !kind(d) {
			errs = append(errs, fmt.Errorf("anomaly.disable: %q: use spike, new_network or new_country", d))
		}
	}
	for _, d := range c.Revoke {
		if !kind(d) {
			errs = append(errs, fmt.Errorf("anomaly.revoke: %q: use spike, new_network or new_country", d))
		}
		if slices.Contains(c.Disable, d) {
			errs = append(errs, fmt.Errorf("anomaly: %q is under both disable and revoke: name it once", d))
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

// Bounds: networks and countries remembered per key, keys held in memory.
const (
	maxNetworks  = 64
	maxCountries = 64
)

var maxKeys = 100_000 // a variable for the tests

// Baseline is what is learned of a key, as the store keeps it.
type Baseline struct {
	// PerMinute is the mean requests per minute by hour of day (UTC).
	PerMinute [24]float64 `json:"per_minute"`
	// Since is when keywardd first saw the key used.
	Since time.Time `json:"since"`
	// Networks are the networks it was used from, at most maxNetworks.
	Networks []string `json:"networks,omitempty"`
	// Countries are the countries it was used from, at most maxCountries.
	Countries []string `json:"countries,omitempty"`
	// CountriesSince is its first use placed in a country: countries are
	// learned for Learn from then, not from Since, so that a key learned
	// before there was a GeoIP database (or by an older keywardd) does not
	// alert on its usual country.
	CountriesSince time.Time `json:"countries_since,omitzero"`
	// Alerted is when the key last alerted, by kind (spike, new network,
	// new country): the cooldowns survive a restart.
	Alerted [3]time.Time `json:"alerted"`
}

// Alert is a change in a key's use.
type Alert struct {
	Kind   string
	KeyID  string
	Time   time.Time
	Detail string
	// Action is what the configuration says to do: ActionAlert,
	// ActionDisable or ActionRevoke.
	Action string
}

// What an alert does to its key.
const (
	ActionAlert   = "alert"
	ActionDisable = "disable"
	ActionRevoke  = "revoke"
)

// Stops says whether an alert's action stops the key (disable, revoke).
func (a Alert) Stops() bool { return a.Action == ActionDisable || a.Action == ActionRevoke }

// key is a key's state in memory.
type key struct {
	mu       sync.Mutex
	b        Baseline
	minute   int64   // the current minute (Unix minutes)
	counts   []int64 // the window's counts per minute, a ring: minute m at m % len
	sum      int64   // over the window
	ver      uint64  // counts the changes; saved is the last one written
	saved    uint64
	gone     bool // let go of by its shard: whoever holds it gets it again
	lastSeen time.Time
	lastNet  netip.Prefix // the network of the last use, known: the next use from it needs no lookup
}

// Detector watches keys. Its keys are spread over shards, each with its
// lock, so that verifications of different keys seldom wait for each
// other; a shard's writes to the store are ordered by its write lock and
// made outside its lock.
type Detector struct {
	cfg    Config
	st     Store
	alerts chan Alert
	shards [shards]shard
	// dropped counts alerts lost because nobody took them in time;
	// readErrs, uses not watched because their baseline could not be read.
	dropped  atomic.Int64
	readErrs atomic.Int64
	// stopped: key ID -> the Alert that disables or revokes it, until
	// settled.
	stopped sync.Map
}

const shards = 64

type shard struct {
	// writeMu orders the shard's writes to the store, from copy to
	// commit; it is taken before mu, and no store write happens under mu,
	// so a verify never waits for a disk.
	writeMu sync.Mutex
	mu      sync.Mutex
	keys    map[string]*key
	// evicting: a caller is letting keys go; others do not pile on.
	// failedAt: the last failed eviction write; the next waits a while.
	evicting bool
	failedAt time.Time
}

// Store is what the detector needs of the store: its baselines.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error
}

// New returns a detector whose alerts come out of Alerts.
func New(c Config, st Store) *Detector {
	d := &Detector{cfg: c.withDefaults(), st: st, alerts: make(chan Alert, 1024)}
	for i := range d.shards {
		d.shards[i].keys = map[string]*key{}
	}
	return d
}

// Alerts are the alerts, in order.
func (d *Detector) Alerts() <-chan Alert { return d.alerts }

// Action is what alerts of a kind do to their key: ActionAlert,
// ActionDisable or ActionRevoke.
func (d *Detector) Action(kind string) string {
	switch {
	case slices.Contains(d.cfg.Revoke, kind):
		return ActionRevoke
	case slices.Contains(d.cfg.Disable, kind):
		return ActionDisable
	}
	return ActionAlert
}

// Stopped is the alert that stopped a key, if one did and keywardd has not
// yet acted on it (Settle): every use of the key is refused meanwhile.
func (d *Detector) Stopped(id string) (Alert, bool) {
	a, ok := d.stopped.Load(id)
	if !ok {
		return Alert{}, false
	}
	return a.(Alert), true
}

// Settle forgets a key's stopping alert once keywardd disabled or revoked
// the key in the store (which refuses it from then on): a key enabled
// again later is not refused for it. One that could not be acted on stays
// refused here (fail closed) until keywardd restarts.
func (d *Detector) Settle(id string) { d.stopped.Delete(id) }

func (d *Detector) shard(id string) *shard {
	h := uint32(2166136261) // FNV-1a, inline: no allocation on the verify path
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return &d.shards[h%shards]
}

// load reads a key's baseline from the store (a new key: learned from
// now). A record that cannot be read is an error: starting afresh would
// overwrite what was learned and put the key back into its learning time.
func (d *Detector) load(id string, now time.Time) (*key, error) {
	k := &key{counts: make([]int64, d.cfg.Window/time.Minute), minute: now.Unix() / 60}
	b, err := d.st.Get(store.BucketBaselines, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		k.b.Since = now.UTC()
		k.ver++
	case err != nil:
		return nil, err
	default:
		if err := json.Unmarshal(b, &k.b); err != nil || k.b.Since.IsZero() {
			return nil, fmt.Errorf("anomaly: the baseline of %s does not parse: %v", id, err)
		}
	}
	return k, nil
}

// get returns the key's state, locked, read from the store the first
// time; nil if it cannot be read. A shard at its share of maxKeys first
// lets go of some keys.
func (d *Detector) get(id string, now time.Time) *key {
	sh := d.shard(id)
	for {
		sh.mu.Lock()
		k := sh.keys[id]
		if k == nil {
			full := len(sh.keys) >= max(maxKeys/shards, 1)
			if full && !sh.evicting && time.Since(sh.failedAt) > 10*time.Second {
				sh.evicting = true
				sh.mu.Unlock()
				d.evict(sh, now)
				continue
			}
			var err error
			if k, err = d.load(id, now); err != nil { // a store read, not a write: it never waits for one
				sh.mu.Unlock()
				d.readErrs.Add(1)
				return nil
			}
			sh.keys[id] = k
		}
		sh.mu.Unlock()
		k.mu.Lock()
		if !k.gone {
			return k
		}
		k.mu.Unlock() // let go of between the two locks: again
	}
}

// evict writes and lets go of a shard's idle keys (unused for an hour),
// topped up with the least recently used until a quarter of the shard is
// free. The keys stay in the shard while they are written, so a use
// meanwhile finds them; only those unchanged by the time the write is
// done go. If the write fails, only those with nothing to write go, and
// evictions pause for a while. Only evict deletes keys, under writeMu, so
// the victims can be copied outside the shard lock.
func (d *Detector) evict(sh *shard, now time.Time) {
	sh.writeMu.Lock()
	defer sh.writeMu.Unlock()
	defer func() {
		sh.mu.Lock()
		sh.evicting = false
		sh.mu.Unlock()
	}()
	type aged struct {
		id   string
		seen time.Time
	}
	sh.mu.Lock()
	all := make([]aged, 0, len(sh.keys))
	for id, k := range sh.keys {
		k.mu.Lock()
		all = append(all, aged{id, k.lastSeen})
		k.mu.Unlock()
	}
	slices.SortFunc(all, func(a, b aged) int { return a.seen.Compare(b.seen) })
	n := max(len(all)/4, 1)
	for n < len(all) && now.Sub(all[n].seen) > time.Hour {
		n++
	}
	out := make(map[string]*key, n)
	for _, a := range all[:min(n, len(all))] {
		out[a.id] = sh.keys[a.id]
	}
	sh.mu.Unlock()

	snap := d.copyChanged(out)
	err := d.commit(snap)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if err != nil {
		sh.failedAt = time.Now()
	}
	for id, k := range out {
		k.mu.Lock()
		if err == nil {
			d.settle(k, snap[id])
		}
		if k.ver == k.saved { // nothing unwritten: it may go
			k.gone = true
			delete(sh.keys, id)
		}
		k.mu.Unlock()
	}
}

// copied is a key's baseline as copied for a write, and its change count.
type copied struct {
	ver uint64
	b   []byte // nil: nothing to write
}

// copyChanged copies the keys' baselines that changed since written.
func (d *Detector) copyChanged(keys map[string]*key) map[string]copied {
	out := make(map[string]copied, len(keys))
	for id, k := range keys {
		k.mu.Lock()
		c := copied{ver: k.ver}
		if k.ver != k.saved {
			c.b, _ = json.Marshal(&k.b)
		}
		out[id] = c
		k.mu.Unlock()
	}
	return out
}

// commit writes the copies, in transactions of at most store.BatchKeys (a
// baseline written again after a failure is written whole: nothing is
// counted twice).
func (d *Detector) commit(snap map[string]copied) error {
	var ids []string
	for id, c := range snap {
		if c.b != nil {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	slices.Sort(ids)
	for batch := range slices.Chunk(ids, store.BatchKeys(d.st, 1)) {
		if err := d.st.UpdateEach(store.BucketBaselines, batch, func(id string, _ []byte) ([]byte, error) { return snap[id].b, nil }); err != nil {
			return err
		}
	}
	return nil
}

// settle records that a copy was written; k.mu is held.
func (d *Detector) settle(k *key, c copied) {
	if c.b != nil && c.ver > k.saved {
		k.saved = c.ver
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
	k.minute = m
	k.ver++
}

// Observe counts one use of a key, from ip (zero: unknown) in country
// ("" or apikeys.UnknownCountry: unknown), at now. A use that was refused
// (learn false: a live secret used from outside its allowlist or
// countries, in the wrong environment, beyond its permissions) may raise a
// new-network or new-country alert but counts toward nothing and teaches
// nothing. It returns the alert that stops the key (this use's, or one
// before it not yet settled): the use is to be refused.
func (d *Detector) Observe(id string, ip netip.Addr, country string, now time.Time, learn bool) (stop Alert, stopped bool) {
	defer func() { stop, stopped = d.Stopped(id) }()
	k := d.get(id, now)
	if k == nil {
		return // its baseline cannot be read: not watched (ReadErrors counts it)
	}
	defer k.mu.Unlock()
	if _, ok := d.Stopped(id); ok {
		learn = false // a use refused as the key is stopped teaches nothing
	}
	d.advance(k, now)
	if learn {
		k.counts[k.minute%int64(len(k.counts))]++
		k.sum++
	}
	k.lastSeen = now
	learning := now.Sub(k.b.Since) < d.cfg.Learn
	if ip.IsValid() && !k.lastNet.Contains(ip.Unmap()) {
		net := apikeys.Network(ip)
		if d.place(k, newPlace{&k.b.Networks, maxNetworks, NewNetwork, 1, d.cfg.NewNetworks, "network"}, net, id, now, learning, learn) {
			k.lastNet, _ = netip.ParsePrefix(net)
		}
	}
	if country != "" && country != apikeys.UnknownCountry {
		if k.b.CountriesSince.IsZero() && learn {
			k.b.CountriesSince = now.UTC()
			k.ver++
		}
		learningCountries := k.b.CountriesSince.IsZero() || now.Sub(k.b.CountriesSince) < d.cfg.Learn
		d.place(k, newPlace{&k.b.Countries, maxCountries, NewCountry, 2, d.cfg.NewCountries, "country"}, country, id, now, learningCountries, learn)
	}
	if learning || !learn {
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
	return
}

// newPlace is a kind of place a key is used from (a network, a country):
// those it was used from, how many are remembered, its alert's kind and
// slot in Baseline.Alerted, whether the alert is on, and its name.
type newPlace struct {
	known *[]string
	max   int
	kind  string
	slot  int
	on    bool
	what  string
}

// place learns or alerts on a use from name, a place of kind p; k.mu is
// held. It says whether name is known now.
func (d *Detector) place(k *key, p newPlace, name, id string, now time.Time, learning, learn bool) bool {
	if slices.Contains(*p.known, name) {
		return true
	}
	// A place whose use stops the key is not learned: the attacker's
	// network or country never becomes a known one.
	stops := !learning && p.on && d.Action(p.kind) != ActionAlert
	known := false
	if learn && !stops && len(*p.known) < p.max { // past that, every new one alerts and none is learned
		*p.known = append(*p.known, name)
		k.ver++
		known = true
	}
	if !learning && p.on {
		d.alert(k, p.slot, Alert{Kind: p.kind, KeyID: id, Time: now, Detail: fmt.Sprintf("a use from %s, a %s the key was not used from before", name, p.what)})
	}
	return known
}

// alert hands an alert on, at most once per cooldown per key and kind.
func (d *Detector) alert(k *key, slot int, a Alert) {
	if last := k.b.Alerted[slot]; !last.IsZero() && a.Time.Sub(last) < d.cfg.Cooldown && !a.Time.Before(last) {
		return
	}
	a.Action = d.Action(a.Kind)
	if a.Stops() {
		// Marked before it is handed on: whoever acts on it settles it,
		// maybe before this goroutine runs again.
		d.stopped.Store(a.KeyID, a)
	}
	select {
	case d.alerts <- a:
		k.b.Alerted[slot] = a.Time.UTC()
		k.ver++
	default:
		d.dropped.Add(1) // no cooldown: the next use alerts again
		if a.Stops() {
			d.stopped.CompareAndDelete(a.KeyID, a) // nobody will act on it
		}
	}
}

// Clean says whether a key has not alerted since a time, from what is in
// memory or else in the store.
func (d *Detector) Clean(id string, since time.Time) bool {
	sh := d.shard(id)
	sh.mu.Lock()
	k := sh.keys[id]
	sh.mu.Unlock()
	var b Baseline
	if k != nil {
		k.mu.Lock()
		b = k.b
		k.mu.Unlock()
	} else if raw, err := d.st.Get(store.BucketBaselines, id); err == nil {
		json.Unmarshal(raw, &b)
	}
	return !slices.ContainsFunc(b.Alerted[:], func(t time.Time) bool { return t.After(since) })
}

// Baseline returns what is learned of a key (for tests and reports).
func (d *Detector) Baseline(id string, now time.Time) Baseline {
	k := d.get(id, now)
	if k == nil {
		return Baseline{}
	}
	defer k.mu.Unlock()
	d.advance(k, now)
	b := k.b
	b.Networks, b.Countries = slices.Clone(b.Networks), slices.Clone(b.Countries)
	return b
}

// Flush writes the changed baselines, one transaction per shard, outside
// the shard's lock (no verify waits for it).
func (d *Detector) Flush() error {
	var errs []error
	for i := range d.shards {
		sh := &d.shards[i]
		sh.writeMu.Lock()
		sh.mu.Lock()
		keys := maps.Clone(sh.keys)
		sh.mu.Unlock()
		snap := d.copyChanged(keys) // outside the shard lock: only evict, under writeMu, deletes
		if err := d.commit(snap); err != nil {
			errs = append(errs, err)
		} else {
			for id, k := range keys {
				k.mu.Lock()
				d.settle(k, snap[id])
				k.mu.Unlock()
			}
		}
		sh.writeMu.Unlock()
	}
	return errors.Join(errs...)
}

// ReadErrors is how many uses went unwatched because the key's baseline
// could not be read from the store.
func (d *Detector) ReadErrors() int64 { return d.readErrs.Load() }

// Dropped is how many alerts were lost because they came faster than
// they were handled (more than 1024 waiting).
func (d *Detector) Dropped() int64 { return d.dropped.Load() }
