package apikeys

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// Usage tracking. Verify counts each use of a known key in memory, by hour:
// by outcome, by source network (a /24 for IPv4, a /64 for IPv6), by
// latency (latency.go), by the source address's country (with a GeoIP
// database: Options.Geo) and the last use. FlushUsage merges those counts into the store in one
// transaction, so verify never waits for a disk. The store keeps a key's
// hours for UsageRetention and its last use for ever (for stale-key review).

// UsageRetention is how long hourly usage is kept.
const UsageRetention = 7 * 24 * time.Hour

const (
	maxNetworks    = 16      // per key and hour; the rest count under OtherNetworks
	maxCountries   = 32      // per key and hour; the rest count under OtherCountries
	maxPendingKeys = 100_000 // keys with unflushed use before a flush is asked for
	usageLastKey   = "last"  // ID/last: the last use
	hourKeyLen     = 10      // ID/<Unix seconds of the hour, 10 digits>
)

// OtherNetworks counts the uses from networks past the first maxNetworks of
// an hour; UnknownNetwork, the uses without a source address.
// OtherCountries and UnknownCountry are the same for countries, the
// latter also for an address the GeoIP database does not place.
const (
	OtherNetworks  = "other"
	UnknownNetwork = "unknown"
	OtherCountries = "other"
	UnknownCountry = "unknown"
)

// HourUsage is one hour of a key's use.
type HourUsage struct {
	Hour     time.Time        `json:"hour"`
	Counts   map[Code]int64   `json:"counts"`
	Networks map[string]int64 `json:"networks,omitempty"`
	// Countries counts the hour's uses by the source address's country
	// (ISO 3166-1 alpha-2, UnknownCountry, OtherCountries); empty without
	// a GeoIP database.
	Countries map[string]int64 `json:"countries,omitempty"`
	// Latency counts the hour's verifications by how long they took; zero
	// in hours recorded before keyward measured it.
	Latency LatencyHistogram `json:"latency,omitzero"`
	Last    time.Time        `json:"last"`
}

// Usage is a key's use over a window: totals, and the hours, oldest first.
type Usage struct {
	LastUsed  time.Time // zero: never used
	Counts    map[Code]int64
	Networks  map[string]int64
	Countries map[string]int64
	Latency   LatencyHistogram
	Hours     []HourUsage
}

func (h *HourUsage) add(d *HourUsage) {
	if h.Counts == nil {
		h.Counts = map[Code]int64{}
	}
	for c, n := range d.Counts {
		h.Counts[c] += n
	}
	mergeBounded(&h.Networks, d.Networks, OtherNetworks, maxNetworks)
	mergeBounded(&h.Countries, d.Countries, OtherCountries, maxCountries)
	h.Latency.add(&d.Latency)
	if d.Last.After(h.Last) {
		h.Last = d.Last
	}
}

// mergeBounded adds the counts of from into *to, which holds at most
// bound names besides other. The busiest first, so a merge keeps them;
// other last, so it never takes a name's place.
func mergeBounded(to *map[string]int64, from map[string]int64, other string, bound int) {
	names := slices.SortedFunc(maps.Keys(from), func(a, b string) int {
		if (a == other) != (b == other) {
			return cmp.Compare(boolInt(a == other), boolInt(b == other))
		}
		return cmp.Or(cmp.Compare(from[b], from[a]), strings.Compare(a, b))
	})
	for _, name := range names {
		addBounded(to, name, from[name], other, bound)
	}
}

// addBounded adds n to name's count in *to, or to other's if *to holds
// bound names besides other already.
func addBounded(to *map[string]int64, name string, n int64, other string, bound int) {
	if *to == nil {
		*to = map[string]int64{}
	}
	m := *to
	if _, ok := m[name]; !ok && name != other && len(m) >= bound {
		name = other
	}
	m[name] += n
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Network is the /24 or /64 an address is in, as usage and the anomaly
// detector count networks.
func Network(ip netip.Addr) string {
	if !ip.IsValid() {
		return UnknownNetwork
	}
	ip = ip.Unmap()
	bits := 64
	if ip.Is4() {
		bits = 24
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return UnknownNetwork
	}
	return p.String()
}

// usageLog is the use not yet in the store.
type usageLog struct {
	mu      sync.Mutex
	pending map[string]map[int64]*HourUsage // key ID -> hour -> counts
	full    chan struct{}                   // a flush is asked for
}

func newUsageLog() *usageLog {
	return &usageLog{pending: map[string]map[int64]*HourUsage{}, full: make(chan struct{}, 1)}
}

// record counts a verification of key id at now that decided code for a
// request from ip, in country ("": no GeoIP database, not counted), and
// took took.
func (u *usageLog) record(id string, code Code, ip netip.Addr, country string, now time.Time, took time.Duration) {
	hour := now.UTC().Truncate(time.Hour)
	u.mu.Lock()
	defer u.mu.Unlock()
	hours := u.pending[id]
	if hours == nil {
		hours = map[int64]*HourUsage{}
		u.pending[id] = hours
		if len(u.pending) >= maxPendingKeys {
			u.askFlush()
		}
	}
	h := hours[hour.Unix()]
	if h == nil {
		h = &HourUsage{Hour: hour, Counts: map[Code]int64{}}
		hours[hour.Unix()] = h
	}
	h.Counts[code]++
	addBounded(&h.Networks, Network(ip), 1, OtherNetworks, maxNetworks)
	if country != "" {
		addBounded(&h.Countries, country, 1, OtherCountries, maxCountries)
	}
	h.Latency[latencyBucket(took)]++
	h.Last = now.UTC()
}

// askFlush wakes RunFlusher early.
func (u *usageLog) askFlush() {
	select {
	case u.full <- struct{}{}:
	default:
	}
}

// take removes and returns everything pending.
func (u *usageLog) take() map[string]map[int64]*HourUsage {
	u.mu.Lock()
	defer u.mu.Unlock()
	p := u.pending
	u.pending = map[string]map[int64]*HourUsage{}
	return p
}

// putBack returns counts a failed flush took, so nothing is lost.
func (u *usageLog) putBack(p map[string]map[int64]*HourUsage) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for id, hours := range p {
		for t, d := range hours {
			if u.pending[id] == nil {
				u.pending[id] = map[int64]*HourUsage{}
			}
			if h := u.pending[id][t]; h != nil {
				h.add(d)
			} else {
				u.pending[id][t] = d
			}
		}
	}
}

func hourKey(id string, t int64) string { return fmt.Sprintf("%s/%0*d", id, hourKeyLen, t) }

// Flush writes to the store what Verify counted since the last flush: the
// quotas used, then the usage. A crash loses at most that much: a quota may
// then be overspent by the uses since the last flush.
func (m *Manager) Flush() error {
	return m.flush(false)
}

// flush is Flush; with all, the blocks of fleet-wide limits this node
// holds are all given back (the Manager stops), else those unused for
// blockIdle.
func (m *Manager) flush(all bool) error {
	var fleet error
	if m.fleet != nil {
		fleet = m.fleet.giveBack(blockIdle, all)
	}
	return errors.Join(m.flushQuotas(), m.flushUsage(), fleet)
}

// flushUsage writes the use counted since the last flush to the store, and
// drops hours older than UsageRetention of the keys it writes. A key's
// records go in one transaction, keys together up to store.BatchKeys
// records a transaction; on a failure the counts of the keys not written
// stay pending for the next flush (those written are not counted twice).
func (m *Manager) flushUsage() error {
	p := m.usage.take()
	if len(p) == 0 {
		return nil
	}
	cutoff := m.now().Add(-UsageRetention).UTC().Truncate(time.Hour)
	ids := slices.Sorted(maps.Keys(p))
	batch := store.BatchKeys(m.store, 1)
	for len(ids) > 0 {
		deltas := map[string]*HourUsage{}
		n := 0
		for n < len(ids) {
			one := m.usageDeltas(ids[n], p[ids[n]], cutoff)
			if n > 0 && len(deltas)+len(one) > batch {
				break
			}
			maps.Copy(deltas, one)
			n++
		}
		if err := m.writeUsage(deltas); err != nil {
			rest := make(map[string]map[int64]*HourUsage, len(ids))
			for _, id := range ids {
				rest[id] = p[id]
			}
			m.usage.putBack(rest)
			return err
		}
		ids = ids[n:]
	}
	return nil
}

// usageDeltas are the records one key's use since the last flush changes:
// its hours, its last use, and its hours past the cutoff, deleted.
func (m *Manager) usageDeltas(id string, hours map[int64]*HourUsage, cutoff time.Time) map[string]*HourUsage {
	deltas := map[string]*HourUsage{}
	var last time.Time
	for t, d := range hours {
		deltas[hourKey(id, t)] = d
		if d.Last.After(last) {
			last = d.Last
		}
	}
	deltas[id+"/"+usageLastKey] = &HourUsage{Last: last}
	// Expired hours of the key; a key unused keeps at most a retention's
	// worth until its next use.
	_ = m.store.ForEach(store.BucketAPIKeyUsage, id+"/", func(k string, _ []byte) error {
		if t, ok := parseHourKey(id, k); ok && t.Before(cutoff) {
			if _, dup := deltas[k]; !dup {
				deltas[k] = nil
			}
		}
		return nil
	})
	return deltas
}

// writeUsage adds deltas to their records in one transaction (nil: delete).
func (m *Manager) writeUsage(deltas map[string]*HourUsage) error {
	return m.store.UpdateEach(store.BucketAPIKeyUsage, slices.Sorted(maps.Keys(deltas)), func(k string, old []byte) ([]byte, error) {
		d := deltas[k]
		if d == nil {
			return nil, nil // expired: delete
		}
		var h HourUsage
		if old != nil && json.Unmarshal(old, &h) != nil {
			h = HourUsage{} // unreadable: replaced, so one bad record cannot stop every flush
		}
		if strings.HasSuffix(k, "/"+usageLastKey) {
			if d.Last.After(h.Last) {
				h.Last = d.Last
			}
			return json.Marshal(HourUsage{Last: h.Last})
		}
		if h.Hour.IsZero() {
			h.Hour = d.Hour
		}
		h.add(d)
		return json.Marshal(h)
	})
}

func parseHourKey(id, k string) (time.Time, bool) {
	rest, ok := strings.CutPrefix(k, id+"/")
	if !ok || len(rest) != hourKeyLen {
		return time.Time{}, false
	}
	t, err := strconv.ParseInt(rest, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(t, 0).UTC(), true
}

// RunFlusher calls Flush every interval, and early when much is pending,
// until ctx ends; then it flushes once more. Errors go to onErr.
func (m *Manager) RunFlusher(ctx context.Context, every time.Duration, onErr func(error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := m.flush(true); err != nil {
				onErr(err)
			}
			return
		case <-t.C:
		case <-m.usage.full:
		}
		if err := m.Flush(); err != nil {
			onErr(err)
		}
	}
}

// GetUsage returns a key's use over the last window (at most
// UsageRetention), flushed and pending.
func (m *Manager) GetUsage(id string, window time.Duration) (*Usage, error) {
	if window <= 0 || window > UsageRetention {
		return nil, fmt.Errorf("%w: a usage window is more than 0 and at most %v", ErrInvalid, UsageRetention)
	}
	if _, err := m.load(id); err != nil {
		return nil, err
	}
	from := m.now().Add(-window).UTC().Truncate(time.Hour)
	hours := map[int64]*HourUsage{}
	u := &Usage{Counts: map[Code]int64{}, Networks: map[string]int64{}, Countries: map[string]int64{}}
	err := m.store.ForEach(store.BucketAPIKeyUsage, id+"/", func(k string, b []byte) error {
		var h HourUsage
		if err := json.Unmarshal(b, &h); err != nil {
			return fmt.Errorf("apikeys: usage record %q does not parse: %w", k, err)
		}
		if k == id+"/"+usageLastKey {
			u.LastUsed = h.Last
		} else if !h.Hour.Before(from) {
			hours[h.Hour.Unix()] = &h
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	m.usage.mu.Lock()
	for t, d := range m.usage.pending[id] {
		if d.Hour.Before(from) {
			continue
		}
		if hours[t] == nil {
			hours[t] = &HourUsage{Hour: d.Hour}
		}
		hours[t].add(d)
	}
	m.usage.mu.Unlock()
	for _, t := range slices.Sorted(maps.Keys(hours)) {
		h := hours[t]
		u.Hours = append(u.Hours, *h)
		for c, n := range h.Counts {
			u.Counts[c] += n
		}
		for net, n := range h.Networks {
			u.Networks[net] += n
		}
		for c, n := range h.Countries {
			u.Countries[c] += n
		}
		u.Latency.add(&h.Latency)
		if h.Last.After(u.LastUsed) {
			u.LastUsed = h.Last
		}
	}
	return u, nil
}
