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
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// IntentPrefix is where bulk revocations under way are recorded, in
// store.BucketSchedule.
const IntentPrefix = "intent/apikeys.revoke/"

// revokeIntent is a bulk revocation's record.
type revokeIntent struct {
	Owner       string          `json:"owner,omitempty"`
	Tag         string          `json:"tag,omitempty"`
	Environment string          `json:"environment,omitempty"`
	State       State           `json:"state,omitempty"`
	All         bool            `json:"all,omitempty"`
	Reach       json.RawMessage `json:"reach,omitempty"`
	Started     time.Time       `json:"started"`
}

// recordIntent writes f's intent and returns its key.
func (m *Manager) recordIntent(f Filter) (string, error) {
	var id [8]byte
	rand.Read(id[:])
	key := IntentPrefix + m.now().UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(id[:])
	b, err := json.Marshal(revokeIntent{Owner: f.Owner, Tag: f.Tag, Environment: f.Environment, State: f.State, All: f.All,
		Reach: f.Reach, Started: m.now().UTC()})
	if err != nil {
		return "", err
	}
	err = m.store.Update(store.BucketSchedule, key, func([]byte) ([]byte, error) { return b, nil })
	if err != nil {
		return "", fmt.Errorf("recording the revocation's intent (nothing is revoked): %w", err)
	}
	return key, nil
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
}

// ResumeRevocations finishes the bulk revocations recorded before
// olderThan ago and not done: each with its filter, within the reach its
// caller had (reach turns the recorded Filter.Reach back into Owners; an
// error leaves the record, to be tried again). It returns what it did,
// one entry per record.
func (m *Manager) ResumeRevocations(olderThan time.Duration, reach func(json.RawMessage) (func(owner string) bool, error)) ([]Resumed, error) {
	cutoff := m.now().Add(-olderThan)
	var due []Resumed
	err := m.store.ForEach(store.BucketSchedule, IntentPrefix, func(k string, b []byte) error {
		var in revokeIntent
		if err := json.Unmarshal(b, &in); err != nil {
			due = append(due, Resumed{Intent: k, Err: fmt.Errorf("the record does not parse: %w", err)})
			return nil
		}
		if in.Started.After(cutoff) {
			return nil // under way, most likely
		}
		due = append(due, Resumed{Intent: k, Started: in.Started,
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
		if r.Revoked, r.Err = m.revokeWhere(f); r.Err == nil {
			r.Err = m.dropIntent(r.Intent)
		}
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
	return fmt.Sprintf("a bulk revocation (%s) started %s and cut short, finished from its record %s",
		strings.Join(parts, ", "), r.Started.UTC().Format(time.RFC3339), r.Intent)
}
