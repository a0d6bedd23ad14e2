package anomaly_test

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// week feeds a key a week of synthetic traffic: day (08:00-20:00 UTC) at
// dayRate requests a minute, night at nightRate, from one network. It
// returns the time after it.
func week(d *anomaly.Detector, id string, start time.Time, dayRate, nightRate int) time.Time {
	ip := netip.MustParseAddr("10.1.2.3")
	t := start
	for ; t.Before(start.Add(7 * 24 * time.Hour)); t = t.Add(time.Minute) {
		n := nightRate
		if h := t.UTC().Hour(); h >= 8 && h < 20 {
			n = dayRate
		}
		for i := range n {
			d.Observe(id, ip, "", t.Add(time.Duration(i)*time.Second), true)
		}
	}
	return t
}

func drain(d *anomaly.Detector) []anomaly.Alert {
	var out []anomaly.Alert
	for {
		select {
		case a := <-d.Alerts():
			out = append(out, a)
		default:
			return out
		}
	}
}

// TestSyntheticSpike: after a week of a daily rhythm, the baseline follows
// the hour of day; three times the daytime rate is no spike, eight times
// is; at night a rate that would be normal by day is one; nothing alerts
// while learning; one alert per cooldown; a new network alerts once.
func TestSyntheticSpike(t *testing.T) {
	st := openStore(t)
	d := anomaly.New(anomaly.Config{Enabled: true, Window: 5 * time.Minute, Factor: 8, MinRate: 5, Learn: 7 * 24 * time.Hour,
		NewNetworks: true, Disable: []string{anomaly.Spike}}, st)
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	now := week(d, "ak_1", start, 20, 2)
	if a := drain(d); len(a) != 0 {
		t.Fatalf("alerts while learning: %+v", a)
	}
	b := d.Baseline("ak_1", now)
	if b.PerMinute[12] < 18 || b.PerMinute[12] > 21 || b.PerMinute[3] < 1.8 || b.PerMinute[3] > 2.2 {
		t.Fatalf("baseline: noon %.2f, 3am %.2f; want about 20 and 2", b.PerMinute[12], b.PerMinute[3])
	}
	ip := netip.MustParseAddr("10.1.2.3")
	burst := func(at time.Time, perMinute, minutes int) {
		for m := range minutes {
			for i := range perMinute {
				d.Observe("ak_1", ip, "", at.Add(time.Duration(m)*time.Minute+time.Duration(i)*time.Millisecond), true)
			}
		}
	}
	// Monday 12:00: 60 a minute is 3 times the usual: no alert.
	noon := now.Add(12 * time.Hour)
	burst(noon, 60, 5)
	if a := drain(d); len(a) != 0 {
		t.Fatalf("3x the daytime rate alerted: %+v", a)
	}
	// 12:30: 200 a minute, 10 times: a spike within the window's first minutes.
	burst(noon.Add(30*time.Minute), 200, 5)
	a := drain(d)
	if len(a) != 1 || a[0].Kind != anomaly.Spike || a[0].KeyID != "ak_1" || a[0].Action != anomaly.ActionDisable || !strings.Contains(a[0].Detail, "12:00 UTC") {
		t.Fatalf("the spike: %+v", a)
	}
	if took := a[0].Time.Sub(noon.Add(30 * time.Minute)); took > 2*time.Minute {
		t.Errorf("the spike alerted %v after it began", took)
	}
	d.Settle("ak_1") // keywardd disabled the key (and, say, its owner enabled it again)
	// The same spike again within the cooldown: no second alert.
	burst(noon.Add(40*time.Minute), 200, 2)
	if a := drain(d); len(a) != 0 {
		t.Fatalf("a second alert within the cooldown: %+v", a)
	}
	// 03:00 next night: 30 a minute, usual by day, 15 times the night's.
	burst(now.Add(27*time.Hour), 30, 5)
	if a := drain(d); len(a) != 1 || a[0].Kind != anomaly.Spike || !strings.Contains(a[0].Detail, "03:00 UTC") {
		t.Fatalf("the night spike: %+v", a)
	}
	d.Settle("ak_1")
	// A new network: one alert, and it is known from then on.
	other := netip.MustParseAddr("203.0.113.9")
	at := now.Add(30 * time.Hour)
	d.Observe("ak_1", other, "", at, true)
	d.Observe("ak_1", other, "", at.Add(time.Second), true)
	if a := drain(d); len(a) != 1 || a[0].Kind != anomaly.NewNetwork || a[0].Action != anomaly.ActionAlert || !strings.Contains(a[0].Detail, "203.0.113.0/24") {
		t.Fatalf("the new network: %+v", a)
	}

	// What was learned survives a restart.
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	d2 := anomaly.New(anomaly.Config{Enabled: true, NewNetworks: true}, st)
	b2 := d2.Baseline("ak_1", at)
	if b2.PerMinute[12] < 15 || !b2.Since.Equal(start) || len(b2.Networks) != 2 || b2.Alerted[0].IsZero() || b2.Alerted[1].IsZero() {
		t.Fatalf("after a restart: %+v", b2)
	}
}

// TestQuietKeyNeedsMinRate: a key used a few times a day never counts
// eight requests as a spike: the rate must also reach MinRate.
func TestQuietKeyNeedsMinRate(t *testing.T) {
	d := anomaly.New(anomaly.Config{Enabled: true, Learn: time.Hour, MinRate: 10}, openStore(t))
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	d.Observe("ak_q", netip.Addr{}, "", start, true)
	at := start.Add(48 * time.Hour)
	for i := range 20 { // 4 a minute for 5 minutes
		d.Observe("ak_q", netip.Addr{}, "", at.Add(time.Duration(i)*15*time.Second), true)
	}
	if a := drain(d); len(a) != 0 {
		t.Fatalf("20 requests in 5 minutes alerted a quiet key: %+v", a)
	}
	for i := range 12 {
		d.Observe("ak_q", netip.Addr{}, "", at.Add(10*time.Minute+time.Duration(i)*time.Second), true)
	}
	if a := drain(d); len(a) != 1 {
		t.Fatalf("12 requests in a minute did not alert: %+v", a)
	}
}

func TestConfigCheck(t *testing.T) {
	for name, c := range map[string]anomaly.Config{
		"window":   {Window: 30 * time.Second},
		"factor":   {Factor: 1.5},
		"disable":  {Disable: []string{"everything"}},
		"negative": {Learn: -time.Hour},
		"revoke":   {Revoke: []string{"everything"}},
		"both":     {Disable: []string{"spike"}, Revoke: []string{"spike"}},
	} {
		if err := c.Check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := (&anomaly.Config{Window: 10 * time.Minute, Factor: 8, Disable: []string{"spike", "new_network"}}).Check(); err != nil {
		t.Error(err)
	}
}

// TestMemoryBounded: past maxKeys keys the detector lets go of some,
// writing what it learned of them first.
func TestMemoryBounded(t *testing.T) {
	defer anomaly.SetMaxKeys(640)()
	st := openStore(t)
	d := anomaly.New(anomaly.Config{Enabled: true}, st)
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	for i := range 5000 {
		d.Observe(fmt.Sprintf("ak_%024x", i), netip.MustParseAddr("10.0.0.1"), "", start.Add(time.Duration(i)*time.Second), true)
	}
	if n := d.Held(); n > 640+64 {
		t.Fatalf("%d keys held, the bound is 640", n)
	}
	// The first key was let go of long ago; what was learned of it is in
	// the store.
	if b := anomaly.New(anomaly.Config{Enabled: true}, st).Baseline(fmt.Sprintf("ak_%024x", 0), start.Add(2*time.Hour)); !b.Since.Equal(start) || len(b.Networks) != 1 {
		t.Fatalf("an evicted key's baseline: %+v", b)
	}
}

// TestConcurrentEviction: many callers on more keys than the detector
// holds: no race, and no key alerts twice for one new network (a key let
// go of and used again keeps what it learned).
func TestConcurrentEviction(t *testing.T) {
	defer anomaly.SetMaxKeys(128)()
	d := anomaly.New(anomaly.Config{Enabled: true, Learn: time.Nanosecond, NewNetworks: true, MinRate: 1e9}, openStore(t))
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	var clock atomic.Int64
	nets := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.1.1")}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 3000 {
				n := (g*3000 + i) % 300
				d.Observe(fmt.Sprintf("ak_%024x", n), nets[(i/300)%2], "", start.Add(time.Duration(clock.Add(1))*time.Millisecond), true)
				if i%500 == 0 {
					d.Flush()
				}
			}
		}()
	}
	wg.Wait()
	alerts := map[string]int{}
	for _, a := range drain(d) {
		alerts[a.KeyID]++
	}
	for id, n := range alerts {
		if n > 1 {
			t.Errorf("%s alerted %d times for one new network", id, n)
		}
	}
	// Keys in use while a write runs stay; new keys, one after the other,
	// bring the number back to the bound.
	for i := range 1000 {
		d.Observe(fmt.Sprintf("ak_%024x", 1000+i), nets[0], "", start.Add(time.Duration(clock.Add(1))*time.Millisecond), true)
	}
	if d.Held() > 128+64 {
		t.Errorf("%d keys held, the bound is 128", d.Held())
	}
}

// TestUnreadableBaselineKept: a baseline that does not parse is not
// replaced by a fresh one (which would overwrite it and start the key's
// learning time again); the key goes unwatched and that is counted.
func TestUnreadableBaselineKept(t *testing.T) {
	st := openStore(t)
	id := "ak_00000000000000000000bad0"
	if err := st.Update(store.BucketBaselines, id, func([]byte) ([]byte, error) { return []byte("{not json"), nil }); err != nil {
		t.Fatal(err)
	}
	d := anomaly.New(anomaly.Config{Enabled: true}, st)
	d.Observe(id, netip.MustParseAddr("10.0.0.1"), "", time.Now(), true)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if b, _ := st.Get(store.BucketBaselines, id); string(b) != "{not json" || d.ReadErrors() != 1 {
		t.Fatalf("the record is now %q, read errors %d", b, d.ReadErrors())
	}
}

// TestCommitInBatches: a flush of more baselines than one transaction of
// the store's contract holds (a shard grows past its share while its
// evictions fail) writes them all, on a backend that refuses a larger
// transaction, as etcd's may.
func TestCommitInBatches(t *testing.T) {
	st := openStore(t)
	n := store.MaxTxKeys + 11
	if err := anomaly.Commit(anomaly.New(anomaly.Config{Enabled: true}, storetest.Strict(st)), n); err != nil {
		t.Fatalf("a commit of %d baselines: %v", n, err)
	}
	written := 0
	st.ForEach(store.BucketBaselines, "", func(string, []byte) error { written++; return nil })
	if written != n {
		t.Fatalf("%d baselines written, want %d", written, n)
	}
}

// TestStopped: a use that sets off an alert whose action disables or
// revokes the key is answered as stopping it, and so is every use after
// it, until keywardd settles it; an alert-only kind stops nothing.
func TestStopped(t *testing.T) {
	st := openStore(t)
	d := anomaly.New(anomaly.Config{Enabled: true, Window: 5 * time.Minute, Factor: 8, MinRate: 5, Learn: time.Hour,
		NewNetworks: true, Revoke: []string{anomaly.NewNetwork}}, st)
	start := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	home, away := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("203.0.113.9")
	if _, stop := d.Observe("ak_1", home, "", start, true); stop {
		t.Fatal("a first use stopped the key")
	}
	later := start.Add(2 * time.Hour)
	if _, stop := d.Observe("ak_1", home, "", later, true); stop {
		t.Fatal("a use from the known network stopped the key")
	}
	a, stop := d.Observe("ak_1", away, "", later.Add(time.Second), true)
	if !stop || a.Action != anomaly.ActionRevoke || a.Kind != anomaly.NewNetwork || a.KeyID != "ak_1" {
		t.Fatalf("the use from a new network: %+v, %v; want it to stop the key (revoke)", a, stop)
	}
	if got := drain(d); len(got) != 1 || got[0].Action != anomaly.ActionRevoke {
		t.Fatalf("alerts: %+v", got)
	}
	if _, stop := d.Observe("ak_1", home, "", later.Add(2*time.Second), true); !stop {
		t.Error("a use after the stopping alert, before it was settled, was not stopped")
	}
	if _, stop := d.Observe("ak_2", home, "", later, true); stop {
		t.Error("another key was stopped")
	}
	d.Settle("ak_1")
	if _, stop := d.Observe("ak_1", home, "", later.Add(3*time.Second), true); stop {
		t.Error("a use after the alert was settled was stopped")
	}
	// The network whose use stopped the key was not learned: past the
	// cooldown, a use from it stops the key again.
	drain(d)
	if _, stop := d.Observe("ak_1", away, "", later.Add(2*time.Hour), true); !stop {
		t.Error("the network whose use stopped the key was learned from that use")
	}
}

// TestNewCountry: after the learning time, a use from a country the key
// was not used from alerts once (naming the country) and is learned; an
// unknown country neither alerts nor teaches; a country whose use
// disables the key is not learned; anomaly.disable accepts new_country.
func TestNewCountry(t *testing.T) {
	st := openStore(t)
	cfg := anomaly.Config{Enabled: true, Learn: time.Hour, NewCountries: true, MinRate: 1e9}
	d := anomaly.New(cfg, st)
	start := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	ip := netip.MustParseAddr("10.1.2.3") // one network throughout: only countries change
	d.Observe("ak_1", ip, "DE", start, true)
	d.Observe("ak_1", ip, "FR", start.Add(time.Minute), true) // learning: taught, no alert
	later := start.Add(2 * time.Hour)
	for _, c := range []string{"DE", "FR", "", apikeys.UnknownCountry} {
		d.Observe("ak_1", ip, c, later, true)
	}
	if a := drain(d); len(a) != 0 {
		t.Fatalf("known or unknown countries alerted: %+v", a)
	}
	d.Observe("ak_1", ip, "JP", later.Add(time.Second), true)
	d.Observe("ak_1", ip, "JP", later.Add(2*time.Second), true)
	a := drain(d)
	if len(a) != 1 || a[0].Kind != anomaly.NewCountry || a[0].Action != anomaly.ActionAlert || !strings.Contains(a[0].Detail, "a use from JP, a country") {
		t.Fatalf("the new country: %+v", a)
	}
	if b := d.Baseline("ak_1", later); fmt.Sprint(b.Countries) != "[DE FR JP]" || b.Alerted[2].IsZero() || !b.Alerted[1].IsZero() {
		t.Errorf("baseline countries %v, alerted %v; want [DE FR JP] and a new-country alert only", b.Countries, b.Alerted)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if d.Clean("ak_1", start) {
		t.Error("Clean after a new-country alert")
	}

	cfg.Disable = []string{anomaly.NewCountry}
	if err := cfg.Check(); err != nil {
		t.Fatalf("disable: [new_country]: %v", err)
	}
	d2 := anomaly.New(cfg, st) // from the stored baseline
	if _, stop := d2.Observe("ak_1", ip, "JP", later.Add(time.Minute), true); stop {
		t.Error("a use from a country learned before the restart stopped the key")
	}
	a2, stop := d2.Observe("ak_1", ip, "US", later.Add(2*time.Hour), true)
	if !stop || a2.Kind != anomaly.NewCountry || a2.Action != anomaly.ActionDisable {
		t.Fatalf("the use from US: %+v, %v; want it to disable the key", a2, stop)
	}
	drain(d2)
	d2.Settle("ak_1")
	if b := d2.Baseline("ak_1", later.Add(2*time.Hour)); slices.Contains(b.Countries, "US") {
		t.Errorf("the country whose use disabled the key was learned: %v", b.Countries)
	}
	bad := anomaly.Config{Revoke: []string{"new_continent"}}
	if err := bad.Check(); err == nil || !strings.Contains(err.Error(), "new_country") {
		t.Errorf("revoke: [new_continent]: %v, want an error naming new_country", err)
	}
}

// TestNewCountryAfterUpgrade: a key learned long before there was a GeoIP
// database (no countries in its baseline) does not alert, disable or
// revoke on its usual country once one is configured: countries are
// learned for Learn from the key's first use placed in a country.
func TestNewCountryAfterUpgrade(t *testing.T) {
	st := openStore(t)
	start := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	ip := netip.MustParseAddr("10.1.2.3")
	old := anomaly.New(anomaly.Config{Enabled: true, Learn: time.Hour, MinRate: 1e9}, st)
	old.Observe("ak_1", ip, "", start, true) // no database: no country
	if err := old.Flush(); err != nil {
		t.Fatal(err)
	}
	cfg := anomaly.Config{Enabled: true, Learn: time.Hour, NewCountries: true, MinRate: 1e9, Revoke: []string{anomaly.NewCountry}}
	d := anomaly.New(cfg, st)
	later := start.Add(30 * 24 * time.Hour) // the key is long past its learning time
	if a, stop := d.Observe("ak_1", ip, "DE", later, true); stop || a.Kind != "" {
		t.Fatalf("the key's first use placed in a country (its usual one): %+v, stop %v", a, stop)
	}
	if a := drain(d); len(a) != 0 {
		t.Fatalf("alerts: %+v", a)
	}
	if a, stop := d.Observe("ak_1", ip, "FR", later.Add(30*time.Minute), true); stop || a.Kind != "" {
		t.Fatalf("a second country within the countries' learning time: %+v, stop %v", a, stop)
	}
	a, stop := d.Observe("ak_1", ip, "JP", later.Add(2*time.Hour), true)
	if !stop || a.Kind != anomaly.NewCountry {
		t.Fatalf("a new country after the countries' learning time: %+v, stop %v; want it to revoke", a, stop)
	}
	if b := d.Baseline("ak_1", later.Add(2*time.Hour)); !b.CountriesSince.Equal(later) {
		t.Errorf("countries_since %v, want %v", b.CountriesSince, later)
	}
}
