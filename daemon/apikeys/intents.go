package apikeys

// Intents. A bulk revocation writes many transactions (a store takes
// store.BatchKeys keys in one), so a crash between two would leave it half
// done, with the caller told nothing. RevokeWhere therefore records its
// intent first, in one transaction: the filter, the caller's reach
// (Filter.Reach) and when it started; it drops the record when every
// matching key is revoked. ResumeRevocations, run by keywardd at start and
// then every minute (on the elected node of a fleet), finishes what a
// record names and drops it. Revoking is idempotent (a key revoked already
// is passed over, its event not sent again), so a revocation finished
// twice (its node was slow, not dead) revokes nothing twice.
//
// The records live in store.BucketSchedule, under intent/apikeys.revoke/:
// work keywardd owes, as the bucket's other records are (docs/formats.md).

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// IntentPrefix is where bulk revocations under way are recorded, in
// store.BucketSchedule.
const IntentPrefix = "intent/apikeys.revoke/"

// maxIntentOwners is the most owners an intent names; a revocation of keys
// of more owners records none, and its resumption reaches what the caller
// reaches then.
const maxIntentOwners = 1000

// touchEvery is how often (in batches) a revocation under way touches its
// intent: one untouched for a minute is taken for one cut short.
const touchEvery = 20

// revokeIntent is a bulk revocation's record.
type revokeIntent struct {
	Owner       string          `json:"owner,omitempty"`
	Tag         string          `json:"tag,omitempty"`
	Environment string          `json:"environment,omitempty"`
	State       State           `json:"state,omitempty"`
	All         bool            `json:"all,omitempty"`
	Reach       json.RawMessage `json:"reach,omitempty"`
	// Owners are the owners of the keys the filter picked when the
	// caller asked, within its reach (absent: more than maxIntentOwners).
	Owners  []string  `json:"owners,omitempty"`
	Started time.Time `json:"started"`
	// Touched is when the revocation was last known under way; a
	// resumption revokes no key issued after it.
	Touched time.Time `json:"touched"`
}

// intent is a revocation's record as this process keeps it.
type intent struct {
	key     string
	rec     revokeIntent
	batches int
}

// recordIntent writes f's intent.
func (m *Manager) recordIntent(f Filter, owners map[string]bool) (*intent, error) {
	var id [8]byte
	rand.Read(id[:])
	now := m.now().UTC()
	in := &intent{key: IntentPrefix + now.Format("20060102T150405Z") + "-" + hex.EncodeToString(id[:]),
		rec: revokeIntent{Owner: f.Owner, Tag: f.Tag, Environment: f.Environment, State: f.State, All: f.All, Reach: f.Reach, Started: now, Touched: now}}
	if len(owners) <= maxIntentOwners {
		in.rec.Owners = slices.Sorted(maps.Keys(owners))
	}
	m.intentsMu.Lock()
	m.running[in.key] = true
	m.intentsMu.Unlock()
	if err := m.putIntent(in); err != nil {
		m.doneIntent(in)
		return nil, fmt.Errorf("recording the revocation's intent (nothing is revoked): %w", err)
	}
	return in, nil
}

func (m *Manager) putIntent(in *intent) error {
	b, err := json.Marshal(in.rec)
	if err != nil {
		return err
	}
	return m.store.Update(store.BucketSchedule, in.key, func([]byte) ([]byte, error) { return b, nil })
}

// touchIntent notes, every touchEvery batches, that in is under way (a
// failure is no matter: at worst it is resumed while it runs, and
// revoking is idempotent).
func (m *Manager) touchIntent(in *intent) {
	if in == nil {
		return
	}
	if in.batches++; in.batches%touchEvery == 0 {
		in.rec.Touched = m.now().UTC()
		m.putIntent(in)
	}
}

// doneIntent forgets in as under way in this process.
func (m *Manager) doneIntent(in *intent) {
	m.intentsMu.Lock()
	delete(m.running, in.key)
	m.intentsMu.Unlock()
}

// dropIntent deletes an intent done with. A failure leaves it to be
// finished again: a revocation finished twice revokes nothing twice.
func (m *Manager) dropIntent(key string) error {
	return m.store.Update(store.BucketSchedule, key, func([]byte) ([]byte, error) { return nil, nil })
}

// Resumed is a bulk revocation finished from its intent.
type Resumed struct {
	Intent  string // its record's key
	Filter  Filter // without Owners
	Started time.Time
	Revoked int   // keys revoked now
	Err     error // nil: finished, its record dropped

	rec revokeIntent
}

// ResumeRevocations finishes the bulk revocations whose intent was last
// touched before cutoff and that no call of this process runs: each with
// its filter, for keys issued before it was last touched, of the owners
// the caller reached when it asked, within the reach it has now (reach
// turns the recorded Filter.Reach back into Owners; an error leaves the
// record, to be tried again). It returns what it did, one entry per
// record.
func (m *Manager) ResumeRevocations(cutoff time.Time, reach func(json.RawMessage) (func(owner string) bool, error)) ([]Resumed, error) {
	var due []Resumed
	err := m.store.ForEach(store.BucketSchedule, IntentPrefix, func(k string, b []byte) error {
		m.intentsMu.Lock()
		mine := m.running[k]
		m.intentsMu.Unlock()
		if mine {
			return nil
		}
		var in revokeIntent
		if err := json.Unmarshal(b, &in); err != nil {
			due = append(due, Resumed{Intent: k, Err: fmt.Errorf("the record does not parse: %w", err)})
			return nil
		}
		if in.Touched.After(cutoff) {
			return nil // under way on another node, most likely
		}
		due = append(due, Resumed{Intent: k, Started: in.Started, rec: in,
			Filter: Filter{Owner: in.Owner, Tag: in.Tag, Environment: in.Environment, State: in.State, All: in.All, Reach: in.Reach}})
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i := range due {
		r := &due[i]
		if r.Err != nil {
			continue
		}
		f := r.Filter
		if f.Owners, r.Err = reach(f.Reach); r.Err != nil {
			continue
		}
		if empty := f.Owner == "" && f.Tag == "" && f.Environment == ""; empty != f.All {
			r.Err = fmt.Errorf("%w: the recorded filter names nothing", ErrInvalid)
			continue
		}
		f.issued = r.rec.Touched
		if r.rec.Owners != nil {
			f.owners = map[string]bool{}
			for _, o := range r.rec.Owners {
				f.owners[o] = true
			}
		}
		// While it runs, this process's own: touched, and not resumed
		// again by a second pass of the job.
		in := &intent{key: r.Intent, rec: r.rec}
		m.intentsMu.Lock()
		m.running[in.key] = true
		m.intentsMu.Unlock()
		if r.Revoked, r.Err = m.revokeWhere(f, nil, in); r.Err == nil {
			r.Err = m.dropIntent(r.Intent)
		}
		m.doneIntent(in)
	}
	return due, nil
}

// String is what an audit record says of a resumed revocation.
func (r Resumed) String() string {
	var parts []string
	for _, p := range [][2]string{{"owner", r.Filter.Owner}, {"tag", r.Filter.Tag}, {"environment", r.Filter.Environment}} {
		if p[1] != "" {
			parts = append(parts, fmt.Sprintf("%s %q", p[0], p[1]))
		}
	}
	if r.Filter.All {
		parts = append(parts, "all keys")
	}
	return fmt.Sprintf("a bulk revocation (%s) asked by %s, started %s and cut short, finished from its record %s",
		strings.Join(parts, ", "), r.Filter.Reach, r.Started.UTC().Format(time.RFC3339), r.Intent)
}
