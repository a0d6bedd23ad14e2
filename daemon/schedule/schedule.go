// Package schedule rotates on schedule: root keys, signing keys, API keys
// and managed credentials, each under a rotation policy — high risk (every
// 30 days, 24 h overlap), moderate (90 days, 48 h) or a custom one.
//
// A subject's next run is its last rotation plus the policy's period plus a
// jitter, so that keys made together do not all rotate in the same second.
// The jitter is drawn from a hash of the subject and its last rotation: it
// is the same after a restart, so the plan keyward shows is the plan that
// runs. The schedule is kept in the store (bucket schedule), one entry per
// subject: the rotation it was computed from, the next run, the last run and
// its outcome. After downtime an overdue subject runs once, then its next
// run counts from that run; a failed run is retried after Retry, not at
// every tick.
//
// API keys cannot be rotated by keywardd alone: the new secret would reach
// nobody. Their policies act in one of two ways: remind (an event to the
// plugins, a webhook tells the owner, again every RemindEvery until the key
// is rotated) or force (the same, and the key's current secrets stop
// working after the policy's overlap unless the owner rotates it first).
//
// Written here: a few dozen lines over the store and a clock; a cron library
// would bring its own timing and persistence, neither of which fits
// rotation periods counted from each subject's last rotation.
package schedule

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// Policy is how often a subject rotates and how long what it replaces keeps
// working.
type Policy struct {
	Name    string        `yaml:"-" json:"name"`
	Every   time.Duration `yaml:"every" json:"every"`
	Overlap time.Duration `yaml:"overlap" json:"overlap"`
}

// The built-in policies.
var (
	High     = Policy{Name: "high", Every: 30 * 24 * time.Hour, Overlap: 24 * time.Hour}
	Moderate = Policy{Name: "moderate", Every: 90 * 24 * time.Hour, Overlap: 48 * time.Hour}
)

// Kind is what a subject is.
type Kind string

const (
	Key        Kind = "key"        // a root key or a signing key: a new version
	APIKey     Kind = "api_key"    // an API key: a reminder or a deadline
	Credential Kind = "credential" // a managed credential: a rotation through its plugin
)

// Action is what a run does.
type Action string

const (
	Rotate Action = "rotate" // keys and credentials
	Remind Action = "remind" // API keys: an event, again every RemindEvery
	Force  Action = "force"  // API keys: an event and a deadline after the overlap
)

// Subject is something that rotates.
type Subject struct {
	Kind   Kind
	ID     string // a key's or a credential's name, an API key's ID
	Owner  string // an API key's owner
	Policy Policy
	Action Action
	// Last is when its current version or secret was made.
	Last time.Time
	// NotBefore holds a run back (a credential's retry time).
	NotBefore time.Time
}

// Source lists the subjects of one kind and runs them.
type Source struct {
	Kind Kind
	List func() ([]Subject, error)
	// Run does the subject's action; the string says what it did.
	Run func(ctx context.Context, s Subject) (string, error)
	// Every, if above 1, has only every Every-th Tick look at this source
	// (the first one does): listing a million API keys costs seconds, and
	// their rotations are days apart.
	Every int
}

// Entry is a subject's schedule as the store keeps it.
type Entry struct {
	Kind    Kind          `json:"kind"`
	ID      string        `json:"id"`
	Owner   string        `json:"owner,omitempty"`
	Policy  string        `json:"policy"`
	Every   time.Duration `json:"every"`
	Overlap time.Duration `json:"overlap"`
	Action  Action        `json:"action"`
	// Base is the subject's last rotation the entry was computed from; Due
	// is Base plus the period plus the jitter; Next is the next run: Due,
	// or later after a run (a retry, a repeated reminder).
	Base    time.Time `json:"base"`
	Due     time.Time `json:"due"`
	Next    time.Time `json:"next"`
	LastRun time.Time `json:"last_run,omitzero"`
	// Outcome of the last run: "ok" or the error.
	Outcome string `json:"outcome,omitempty"`
	Detail  string `json:"detail,omitempty"`
	Runs    int    `json:"runs,omitempty"`
}

// Overdue says whether the subject is past its due time: it should have
// been rotated by now and was not (a run failing, an API key's owner not
// rotating, keywardd down).
func (e Entry) Overdue(now time.Time) bool { return now.After(e.Due) }

// Store is what the scheduler needs of the store.
type Store interface {
	UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
}

// Config tunes a Scheduler.
type Config struct {
	Store   Store
	Sources []Source
	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// Jitter is the most added to a due time; at most a tenth of the
	// period is used. 0: none.
	Jitter time.Duration
	// RemindEvery repeats reminders (and forced rotations' events) until
	// the subject is rotated. Default 24 h.
	RemindEvery time.Duration
	// Retry is how long after a failed run the next attempt is. Default
	// 10 minutes.
	Retry time.Duration
	// Grace is how far past its due time a subject must be to count as
	// overdue (Overdue). Default 0.
	Grace time.Duration
	// Before is called before a run; a run whose Before fails waits (an
	// intent that cannot be audited is not acted on).
	Before func(ctx context.Context, s Subject, e Entry) error
	// After is called with each run's outcome.
	After func(ctx context.Context, s Subject, e Entry, detail string, err error)
}

// Scheduler runs what is due.
type Scheduler struct {
	cfg   Config
	mu    sync.Mutex // one Tick at a time
	ticks int

	overdueMu sync.Mutex
	overdue   map[Kind]int // by the last Tick that looked at each kind
}

// New returns a scheduler.
func New(c Config) *Scheduler {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.RemindEvery <= 0 {
		c.RemindEvery = 24 * time.Hour
	}
	if c.Retry <= 0 {
		c.Retry = 10 * time.Minute
	}
	return &Scheduler{cfg: c, overdue: map[Kind]int{}}
}

// Now is the scheduler's clock.
func (s *Scheduler) Now() time.Time { return s.cfg.Now() }

func entryKey(k Kind, id string) string { return string(k) + "/" + id }

// jitter is the subject's jitter for its rotation at last: a tenth of the
// period at most, drawn from a hash so that it does not change with a
// restart.
func (s *Scheduler) jitter(sub Subject) time.Duration {
	max := min(s.cfg.Jitter, sub.Policy.Every/10)
	if max <= 0 {
		return 0
	}
	h := sha256.Sum256([]byte(entryKey(sub.Kind, sub.ID) + "\x00" + sub.Last.UTC().Format(time.RFC3339Nano)))
	return time.Duration(binary.BigEndian.Uint64(h[:8]) % uint64(max))
}

// fresh is the entry for a subject whose last rotation or policy changed.
func (s *Scheduler) fresh(sub Subject, old *Entry) Entry {
	e := Entry{Kind: sub.Kind, ID: sub.ID, Owner: sub.Owner, Policy: sub.Policy.Name, Every: sub.Policy.Every, Overlap: sub.Policy.Overlap,
		Action: sub.Action, Base: sub.Last.UTC(), Due: sub.Last.UTC().Add(sub.Policy.Every + s.jitter(sub))}
	e.Next = e.Due
	if old != nil {
		e.LastRun, e.Outcome, e.Detail, e.Runs = old.LastRun, old.Outcome, old.Detail, old.Runs
	}
	return e
}

// entries reads the saved entries of a kind, by entry key: one scan.
func (s *Scheduler) entries(k Kind) (map[string]Entry, error) {
	out := map[string]Entry{}
	err := s.cfg.Store.ForEach(store.BucketSchedule, string(k)+"/", func(key string, b []byte) error {
		var e Entry
		if err := json.Unmarshal(b, &e); err != nil {
			return fmt.Errorf("schedule: entry %q: %w", key, err)
		}
		out[key] = e
		return nil
	})
	return out, err
}

// saveAll writes entries in one transaction, and deletes those under gone.
func (s *Scheduler) saveAll(es map[string]Entry, gone []string) error {
	if len(es) == 0 && len(gone) == 0 {
		return nil
	}
	recs := make(map[string][]byte, len(es)+len(gone))
	for k, e := range es {
		b, err := json.Marshal(e)
		if err != nil {
			return err
		}
		recs[k] = b
	}
	for _, k := range gone {
		recs[k] = nil
	}
	// In transactions of at most store.BatchKeys: each entry stands alone,
	// and one written again is written the same.
	for batch := range slices.Chunk(slices.Sorted(maps.Keys(recs)), store.BatchKeys(s.cfg.Store, 1)) {
		if err := s.cfg.Store.UpdateEach(store.BucketSchedule, batch, func(k string, _ []byte) ([]byte, error) { return recs[k], nil }); err != nil {
			return err
		}
	}
	return nil
}

// entry is the subject's entry brought up to date with its last rotation
// and policy; changed says it differs from the saved one.
func (s *Scheduler) entry(sub Subject, saved map[string]Entry) (e Entry, changed bool) {
	old, ok := saved[entryKey(sub.Kind, sub.ID)]
	if ok && old.Base.Equal(sub.Last.UTC()) && old.Every == sub.Policy.Every && old.Overlap == sub.Policy.Overlap &&
		old.Action == sub.Action && old.Policy == sub.Policy.Name {
		return old, false
	}
	if ok {
		return s.fresh(sub, &old), true
	}
	return s.fresh(sub, nil), true
}

// Result is one run of a Tick.
type Result struct {
	Subject Subject
	Detail  string
	Err     error
}

// Tick runs every subject that is due, once, and forgets the entries of
// subjects that are gone. It returns the runs. It reads each kind's
// entries in one scan and writes the changed ones in one transaction (a
// run's entry is written as soon as it ran).
func (s *Scheduler) Tick(ctx context.Context) ([]Result, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Result
	var errs []error
	s.ticks++
	for _, src := range s.cfg.Sources {
		if src.Every > 1 && (s.ticks-1)%src.Every != 0 {
			continue
		}
		subs, err := src.List()
		if err != nil {
			errs = append(errs, fmt.Errorf("schedule: listing %ss: %w", src.Kind, err))
			continue
		}
		saved, err := s.entries(src.Kind)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		changed := map[string]Entry{}
		seen := map[string]bool{}
		overdue := 0
		for _, sub := range subs {
			key := entryKey(sub.Kind, sub.ID)
			seen[key] = true
			e, ch := s.entry(sub, saved)
			if ch {
				changed[key] = e
			}
			now := s.cfg.Now().UTC()
			if now.Before(e.Next) || now.Before(sub.NotBefore) || ctx.Err() != nil {
				if e.Overdue(now.Add(-s.cfg.Grace)) {
					overdue++
				}
				continue
			}
			if s.cfg.Before != nil {
				if err := s.cfg.Before(ctx, sub, e); err != nil {
					errs = append(errs, err)
					if e.Overdue(now.Add(-s.cfg.Grace)) {
						overdue++ // not run: as overdue as before
					}
					continue
				}
			}
			detail, err := src.Run(ctx, sub)
			now = s.cfg.Now().UTC()
			e.LastRun, e.Detail, e.Runs = now, detail, e.Runs+1
			switch {
			case err != nil:
				e.Outcome, e.Next = err.Error(), now.Add(s.cfg.Retry)
			case sub.Action == Rotate:
				// The subject's last rotation is now; the next Tick
				// recomputes from it. Until then, a period from now.
				e.Outcome, e.Next, e.Due = "ok", now.Add(sub.Policy.Every), now.Add(sub.Policy.Every)
			default:
				e.Outcome, e.Next = "ok", now.Add(s.cfg.RemindEvery)
			}
			if e.Overdue(now.Add(-s.cfg.Grace)) {
				overdue++
			}
			delete(changed, key)
			if serr := s.saveAll(map[string]Entry{key: e}, nil); serr != nil {
				errs = append(errs, serr)
			}
			if s.cfg.After != nil {
				s.cfg.After(ctx, sub, e, detail, err)
			}
			out = append(out, Result{Subject: sub, Detail: detail, Err: err})
		}
		var gone []string
		for k := range saved {
			if !seen[k] {
				gone = append(gone, k)
			}
		}
		if err := s.saveAll(changed, gone); err != nil {
			errs = append(errs, err)
		}
		s.overdueMu.Lock()
		s.overdue[src.Kind] = overdue
		s.overdueMu.Unlock()
	}
	return out, errors.Join(errs...)
}

// Run ticks every interval until ctx ends, reporting each Tick's error.
func (s *Scheduler) Run(ctx context.Context, every time.Duration, report func(error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := s.Tick(ctx); err != nil && report != nil {
			report(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Plan is every subject's entry, soonest first, as it stands now (brought
// up to date with the subjects; nothing is written). Sources with Every
// are not listed: their entries are as the last Tick left them.
func (s *Scheduler) Plan() ([]Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Entry
	for _, src := range s.cfg.Sources {
		if src.Every > 1 {
			// Too costly to list on demand (API keys): as the last Tick
			// that looked at them left them.
			saved, err := s.entries(src.Kind)
			if err != nil {
				return nil, err
			}
			out = slices.AppendSeq(out, maps.Values(saved))
			continue
		}
		subs, err := src.List()
		if err != nil {
			return nil, fmt.Errorf("schedule: listing %ss: %w", src.Kind, err)
		}
		saved, err := s.entries(src.Kind)
		if err != nil {
			return nil, err
		}
		for _, sub := range subs {
			e, _ := s.entry(sub, saved)
			if sub.NotBefore.After(e.Next) {
				e.Next = sub.NotBefore.UTC()
			}
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b Entry) int {
		if c := a.Next.Compare(b.Next); c != 0 {
			return c
		}
		return strings.Compare(entryKey(a.Kind, a.ID), entryKey(b.Kind, b.ID))
	})
	return out, nil
}

// Overdue counts, by kind, the subjects more than Config.Grace past their
// due time, as the last Tick that looked at each kind found them: the
// metric reads this at every scrape, and recounting a million entries
// each time would cost seconds.
func (s *Scheduler) Overdue() map[Kind]int {
	s.overdueMu.Lock()
	defer s.overdueMu.Unlock()
	out := map[Kind]int{}
	for _, src := range s.cfg.Sources {
		out[src.Kind] = s.overdue[src.Kind]
	}
	return out
}

// Rules say which policy applies to which subject: the configuration's
// rotation section.
type Rules struct {
	// CheckEvery is how often keywardd looks for what is due. Default 1 m.
	CheckEvery time.Duration `yaml:"check_every"`
	// Jitter: see Config. Default 1 h (at most a tenth of a period).
	Jitter *time.Duration `yaml:"jitter"`
	// RemindEvery: see Config. Default 24 h.
	RemindEvery time.Duration `yaml:"remind_every"`
	// Policies are custom policies by name, besides high and moderate.
	Policies map[string]Policy `yaml:"policies"`
	// Keys give root and signing keys a policy by name glob; the first
	// that matches wins. A key none matches rotates by its own
	// rotation_period, if it has one.
	Keys []KeyRule `yaml:"keys"`
	// APIKeys give API keys a policy and an action; the first that
	// matches wins. A key none matches is not scheduled.
	APIKeys []APIKeyRule `yaml:"api_keys"`
}

// KeyRule gives keys whose name matches a policy.
type KeyRule struct {
	Match  string `yaml:"match"` // a glob (path.Match) of key names
	Policy string `yaml:"policy"`
}

// APIKeyRule gives API keys a policy: those of an owner (a glob), an
// environment, with a tag; empty fields match all.
type APIKeyRule struct {
	Owner       string `yaml:"owner"`
	Environment string `yaml:"environment"`
	Tag         string `yaml:"tag"`
	Policy      string `yaml:"policy"`
	Action      Action `yaml:"action"` // remind (default) or force
}

// Policy returns the named policy: high, moderate or a custom one.
func (r *Rules) Policy(name string) (Policy, bool) {
	switch name {
	case High.Name:
		return High, true
	case Moderate.Name:
		return Moderate, true
	}
	p, ok := r.Policies[name]
	p.Name = name
	return p, ok
}

// Check says what is wrong with the rules.
func (r *Rules) Check() error {
	var errs []error
	if r.CheckEvery < 0 || r.RemindEvery < 0 || (r.Jitter != nil && *r.Jitter < 0) {
		errs = append(errs, errors.New("rotation: check_every, jitter and remind_every must not be negative"))
	}
	for name, p := range r.Policies {
		switch {
		case name == High.Name || name == Moderate.Name:
			errs = append(errs, fmt.Errorf("rotation.policies.%s: high and moderate are built in (%v/%v, %v/%v); give yours another name",
				name, High.Every, High.Overlap, Moderate.Every, Moderate.Overlap))
		case p.Every < time.Hour:
			errs = append(errs, fmt.Errorf("rotation.policies.%s: every must be at least 1h", name))
		case p.Overlap < 0 || p.Overlap >= p.Every:
			errs = append(errs, fmt.Errorf("rotation.policies.%s: overlap must be from 0 to less than every", name))
		}
	}
	policy := func(where, name string) {
		if _, ok := r.Policy(name); !ok {
			errs = append(errs, fmt.Errorf("%s: no policy %q: use high, moderate or one under rotation.policies", where, name))
		}
	}
	for i, k := range r.Keys {
		if _, err := path.Match(k.Match, ""); err != nil || k.Match == "" {
			errs = append(errs, fmt.Errorf("rotation.keys[%d]: match %q is not a glob of key names", i, k.Match))
		}
		policy(fmt.Sprintf("rotation.keys[%d]", i), k.Policy)
	}
	for i, k := range r.APIKeys {
		if _, err := path.Match(k.Owner, ""); err != nil {
			errs = append(errs, fmt.Errorf("rotation.api_keys[%d]: owner %q is not a glob", i, k.Owner))
		}
		if k.Action != "" && k.Action != Remind && k.Action != Force {
			errs = append(errs, fmt.Errorf("rotation.api_keys[%d]: action %q: use remind or force", i, k.Action))
		}
		policy(fmt.Sprintf("rotation.api_keys[%d]", i), k.Policy)
	}
	return errors.Join(errs...)
}

// ForKey is the policy of the named key: the first rule that matches, else
// its own period (a custom policy), else none (ok false).
func (r *Rules) ForKey(name string, own time.Duration) (Policy, bool) {
	for _, k := range r.Keys {
		if ok, _ := path.Match(k.Match, name); ok {
			return r.Policy(k.Policy)
		}
	}
	if own > 0 {
		return Policy{Name: "custom", Every: own}, true
	}
	return Policy{}, false
}

// ForAPIKey is the policy and action of an API key, from the first rule
// that matches.
func (r *Rules) ForAPIKey(owner, env string, tags []string) (Policy, Action, bool) {
	for _, k := range r.APIKeys {
		ownerOK := k.Owner == ""
		if !ownerOK {
			ownerOK, _ = path.Match(k.Owner, owner)
		}
		if ownerOK && (k.Environment == "" || k.Environment == env) && (k.Tag == "" || slices.Contains(tags, k.Tag)) {
			p, ok := r.Policy(k.Policy)
			a := k.Action
			if a == "" {
				a = Remind
			}
			return p, a, ok
		}
	}
	return Policy{}, "", false
}
