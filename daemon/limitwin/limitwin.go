// Package limitwin is API keys' rate limits raised (or cut) for a window of
// time: an operator who knows of a sale or a launch schedules, in advance,
// a factor for one key, an owner's keys, an environment's keys, or an
// owner's keys in one environment, from a start time to an end time.
//
// A window changes no key's record. Each verification asks Factor for its
// key at its own time, so a window starts and ends exactly on time by
// itself: no job has to run at the boundary, and a keywardd that was down
// across the end never serves the raise a moment past it. The job that
// does run writes the audit records of starts and ends (Due, Noticed),
// drops ended windows from memory (Tidy) and old ones from the store
// (Prune).
//
// The windows are kept in the store (bucket schedule, under limits/), one
// record per target holding that target's windows, so two windows
// overlapping on the same target are refused in the write's own
// transaction, on one host or on a fleet. In memory they are one immutable
// snapshot, swapped whole on each change (Changed, for a fleet's), indexed
// by target: a verification reads it without a lock, in four lookups.
//
// Where several windows cover a key at once, factors never multiply: a
// cut always wins (the deepest, if several), so that a raise scheduled for
// an owner cannot undo an operator's cut of the whole environment;
// otherwise the most specific raise wins: the key's own window, then its
// owner's in its environment, its owner's, its environment's. A window
// changes the key's own limits (on a fleet, its fleet-wide bucket too);
// dynamic limits (package dynlimits) scale them further, and still tighten
// an overloaded keywardd during a sale.
//
// Written here: a few hundred lines over the store; no library schedules
// changes of another system's rate limits.
package limitwin

import (
	"cmp"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/keyward/keyward/daemon/store"
)

// Bounds on what a window may be.
const (
	// MaxFactor is the largest raise: a key's limits a hundred times over
	// for a day is a different key, to be given its own limits.
	MaxFactor = 100
	// MinFactor is the deepest cut.
	MinFactor = 0.001
	// MaxLength is the longest window: a change for longer belongs in
	// the keys' own limits (keyward apikey update).
	MaxLength = 31 * 24 * time.Hour
	// MaxAhead is how far ahead a window may start.
	MaxAhead = 366 * 24 * time.Hour
	// Keep is how long an ended or cancelled window stays on record, for
	// the plan's history; then the next write of its target drops it.
	Keep = 30 * 24 * time.Hour
	// maxPerTarget bounds a target's record, history included.
	maxPerTarget = 32
	maxReason    = 256
	// Prefix starts the windows' keys in store.BucketSchedule.
	Prefix = "limits/"
)

// Errors, matched with errors.Is.
var (
	// ErrInvalid: the window is not one that may be scheduled.
	ErrInvalid = errors.New("limitwin: invalid window")
	// ErrOverlap: another window on the same target covers part of it.
	ErrOverlap = errors.New("limitwin: overlapping window")
	// ErrNotFound: no window has that ID.
	ErrNotFound = errors.New("limitwin: no such window")
	// ErrEnded: the window is over or cancelled already.
	ErrEnded = errors.New("limitwin: window already over")
)

// Target is what a window covers: a key (Key), or the keys of an owner,
// of an environment, or of an owner in an environment.
type Target struct {
	Key         string `json:"key,omitempty"`
	Owner       string `json:"owner,omitempty"`
	Environment string `json:"environment,omitempty"`
}

// String names the target for people: "key ak_…", "owner shop in prod".
func (t Target) String() string {
	switch {
	case t.Key != "":
		return "key " + t.Key
	case t.Owner != "" && t.Environment != "":
		return "owner " + t.Owner + " in " + t.Environment
	case t.Owner != "":
		return "owner " + t.Owner
	default:
		return "environment " + t.Environment
	}
}

// rank is how specific the target is: the highest covering window wins.
func (t Target) rank() int {
	switch {
	case t.Key != "":
		return 4
	case t.Owner != "" && t.Environment != "":
		return 3
	case t.Owner != "":
		return 2
	default:
		return 1
	}
}

// storeKey is the key of the target's record: the kind of target spelled
// out, so an owner and an environment of the same name stay apart.
func (t Target) storeKey() string {
	switch {
	case t.Key != "":
		return Prefix + "key/" + t.Key
	case t.Owner != "" && t.Environment != "":
		return Prefix + "owner-env/" + t.Owner + "/" + t.Environment
	case t.Owner != "":
		return Prefix + "owner/" + t.Owner
	default:
		return Prefix + "env/" + t.Environment
	}
}

// Covers says whether the target covers key.
func (t Target) Covers(key Key) bool {
	if t.Key != "" {
		return t.Key == key.ID
	}
	return (t.Owner == "" || t.Owner == key.Owner) && (t.Environment == "" || t.Environment == key.Environment)
}

// Check says whether t names a key, an owner, an environment, or an owner
// and an environment, each a name keys can have.
func (t Target) Check() error {
	if t.Key != "" {
		if t.Owner != "" || t.Environment != "" {
			return fmt.Errorf("%w: a window covers one key, or an owner's or an environment's keys: not a key and an owner or environment", ErrInvalid)
		}
		return checkName("key", t.Key)
	}
	if t.Owner == "" && t.Environment == "" {
		return fmt.Errorf("%w: say what the window covers: a key, an owner, an environment, or an owner and an environment", ErrInvalid)
	}
	if t.Owner != "" {
		if err := checkName("owner", t.Owner); err != nil {
			return err
		}
	}
	if t.Environment != "" {
		return checkName("environment", t.Environment)
	}
	return nil
}

// checkName refuses what no key's ID, owner or environment can be: the
// store key is built from it.
func checkName(what, s string) error {
	if len(s) > 128 || strings.ContainsFunc(s, func(r rune) bool { return r == '/' || r == '*' || unicode.IsSpace(r) || !unicode.IsPrint(r) }) {
		return fmt.Errorf("%w: %s %q is not a name keyward gives keys (at most 128 characters, no '/', '*' or spaces)", ErrInvalid, what, s)
	}
	return nil
}

// Key is what Factor knows of a key.
type Key struct{ ID, Owner, Environment string }

// Window is one scheduled change.
type Window struct {
	ID string `json:"id"`
	Target
	// KeyOwner is the owner of a key target's key when it was scheduled:
	// who may see and cancel the window.
	KeyOwner string    `json:"key_owner,omitempty"`
	Factor   float64   `json:"factor"`
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	Reason   string    `json:"reason"`
	Created  time.Time `json:"created"`
	By       string    `json:"by"` // who scheduled it, for people
	// Cancelled is when it was cancelled; a cancelled window ends then.
	Cancelled   time.Time `json:"cancelled,omitzero"`
	CancelledBy string    `json:"cancelled_by,omitempty"`
	// Noticed is the last boundary keywardd audited: "", Started, Ended.
	Noticed string `json:"noticed,omitempty"`
}

// Boundaries a window's notices record.
const (
	Started = "started"
	Ended   = "ended"
)

// Until is when the window stops applying: its end, or its cancellation if
// earlier.
func (w *Window) Until() time.Time {
	if !w.Cancelled.IsZero() && w.Cancelled.Before(w.End) {
		return w.Cancelled
	}
	return w.End
}

// ActiveAt says whether the window applies at t: from its start, up to but
// not including its end.
func (w *Window) ActiveAt(t time.Time) bool {
	return !t.Before(w.Start) && t.Before(w.Until())
}

// State is the window's state at t: pending, active, ended or cancelled.
func (w *Window) State(t time.Time) string {
	switch {
	case !w.Cancelled.IsZero() && !t.Before(w.Cancelled):
		return "cancelled"
	case t.Before(w.Start):
		return "pending"
	case t.Before(w.End):
		return "active"
	default:
		return "ended"
	}
}

// Change is what the window does, for people: "×3 from … to …".
func (w *Window) Change() string {
	return fmt.Sprintf("rate limits ×%s from %s to %s", FormatFactor(w.Factor), w.Start.UTC().Format(time.RFC3339), w.End.UTC().Format(time.RFC3339))
}

// FormatFactor is a factor as people write it: 3, 0.5, 1.25.
func FormatFactor(f float64) string {
	return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.3f", f), "0"), ".")
}

// Store is what the windows need of the store.
type Store interface {
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	ForEach(bucket, prefix string, fn func(key string, rec []byte) error) error
}

// Windows are the scheduled windows.
type Windows struct {
	store Store
	now   func() time.Time

	// wmu serializes this process's writes with their taking effect in
	// memory, so that two writes of one target are applied in the order
	// they were committed (on a fleet, the change feed applies them, in
	// order, before a write returns: Fed).
	wmu sync.Mutex
	fed atomic.Bool

	mu sync.Mutex // guards byKey, bad and gen; serializes the snapshot's swaps
	// byKey are the windows by the store key of their target.
	byKey map[string][]Window
	// bad are the records that do not parse, by key, with why: skipped,
	// replaced by the next write of their target.
	bad map[string]string
	// gen counts the changes applied, so a Reload that read the store
	// before one does not swap in what it read.
	gen uint64
	cur atomic.Pointer[snapshot]
}

// snapshot is the windows at one point, never changed in place.
type snapshot struct {
	all []Window // every window, by start
	// live are the windows not over when the snapshot was made, by
	// target, by start: what Factor looks at, four lookups a key.
	live map[Target][]Window
	// next is the earliest end among live: Tidy makes a new snapshot
	// once it has passed, so ended windows leave live.
	next time.Time
}

// New loads the windows from the store; now is the clock (time.Now if nil).
// A record that does not parse is skipped (Bad says which).
func New(s Store, now func() time.Time) (*Windows, error) {
	if now == nil {
		now = time.Now
	}
	w := &Windows{store: s, now: now, byKey: map[string][]Window{}, bad: map[string]string{}}
	return w, w.Reload()
}

// Fed says that a fleet's change feed hands every write, this node's too,
// to Changed before the write returns: a write then leaves its taking
// effect to the feed, which applies the writes in the order of the store.
func (w *Windows) Fed() { w.fed.Store(true) }

// Bad returns the records skipped because they do not parse, by key, with
// why: for the log at start. The next write of a target replaces its bad
// record.
func (w *Windows) Bad() map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.bad)
}

// Reload reads the windows from the store again.
func (w *Windows) Reload() error {
	for {
		w.mu.Lock()
		gen := w.gen
		w.mu.Unlock()
		byKey, bad := map[string][]Window{}, map[string]string{}
		err := w.store.ForEach(store.BucketSchedule, Prefix, func(key string, rec []byte) error {
			if ws, err := decode(key, rec); err != nil {
				bad[key] = err.Error()
			} else {
				byKey[key] = ws
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("limitwin: reading the windows: %w", err)
		}
		w.mu.Lock()
		if w.gen == gen {
			w.byKey, w.bad = byKey, bad
			w.swap()
			w.mu.Unlock()
			return nil
		}
		w.mu.Unlock() // a change came meanwhile: read again
	}
}

// Changed takes records of store.BucketSchedule as they are now (nil: a
// deleted one), as a fleet's local copy takes a change; keys outside
// Prefix are ignored. It never calls the store. A record that does not
// parse drops the target's windows, and says why.
func (w *Windows) Changed(key string, rec []byte) error {
	if !strings.HasPrefix(key, Prefix) {
		return nil
	}
	var ws []Window
	var err error
	if rec != nil {
		ws, err = decode(key, rec)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.bad, key)
	delete(w.byKey, key)
	switch {
	case err != nil:
		w.bad[key] = err.Error()
	case len(ws) > 0:
		w.byKey[key] = ws
	}
	w.gen++
	w.swap()
	return err
}

// swap makes the snapshot of byKey. Under mu.
func (w *Windows) swap() {
	now := w.now()
	snap := &snapshot{live: map[Target][]Window{}}
	for _, ws := range w.byKey {
		snap.all = append(snap.all, ws...)
	}
	slices.SortFunc(snap.all, func(a, b Window) int { return cmp.Or(a.Start.Compare(b.Start), strings.Compare(a.ID, b.ID)) })
	for _, win := range snap.all {
		if until := win.Until(); until.After(now) {
			snap.live[win.Target] = append(snap.live[win.Target], win)
			if snap.next.IsZero() || until.Before(snap.next) {
				snap.next = until
			}
		}
	}
	w.cur.Store(snap)
}

// Tidy makes a new snapshot if a window in it has ended since it was
// made: ended windows leave what each verification looks at.
func (w *Windows) Tidy() {
	if snap := w.snap(); !snap.next.IsZero() && !w.now().Before(snap.next) {
		w.mu.Lock()
		w.swap()
		w.mu.Unlock()
	}
}

func decode(key string, rec []byte) ([]Window, error) {
	var ws []Window
	if err := json.Unmarshal(rec, &ws); err != nil {
		return nil, fmt.Errorf("limitwin: the record %s does not parse: %w", key, err)
	}
	return ws, nil
}

func (w *Windows) snap() *snapshot {
	if p := w.cur.Load(); p != nil {
		return p
	}
	return &snapshot{}
}

// all is every window, by start; never changed in place.
func (w *Windows) all() []Window { return w.snap().all }

// Factor is by how much key's rate limits are scaled at t (Active), or 1.
func (w *Windows) Factor(key Key, t time.Time) float64 {
	if win := w.Active(key, t); win != nil {
		return win.Factor
	}
	return 1
}

// targets are the four targets that may cover key, the most specific
// first.
func targets(key Key) [4]Target {
	return [4]Target{{Key: key.ID}, {Owner: key.Owner, Environment: key.Environment}, {Owner: key.Owner}, {Environment: key.Environment}}
}

// Active is the window that applies to key at t, or nil. A cut always
// wins: where cuts cover the key, the deepest applies, whatever raises
// also do, so an operator's cut cannot be undone by a narrower raise.
// Otherwise the most specific raise applies.
func (w *Windows) Active(key Key, t time.Time) *Window {
	snap := w.snap()
	if len(snap.live) == 0 {
		return nil
	}
	var cut, raise *Window
	for _, tg := range targets(key) {
		ws := snap.live[tg]
		for i := range ws {
			switch win := &ws[i]; {
			case !win.ActiveAt(t):
			case win.Factor < 1:
				if cut == nil || win.Factor < cut.Factor {
					cut = win
				}
			case raise == nil:
				raise = win
			}
		}
	}
	if cut != nil {
		return cut
	}
	return raise
}

// wins says whether o wins over win where both cover a key at once
// (Active's rule).
func wins(o, win *Window) bool {
	switch {
	case o.Factor < 1:
		return win.Factor >= 1 || o.Factor < win.Factor
	case win.Factor < 1:
		return false
	}
	return o.rank() > win.rank()
}

// Overriding is a window that wins over win (Active's rule) on key for
// part of win's time; nil if none.
func (w *Windows) Overriding(win Window, key Key) *Window {
	snap := w.snap()
	for _, tg := range targets(key) {
		ws := snap.live[tg]
		for i := range ws {
			if o := &ws[i]; o.ID != win.ID && o.Start.Before(win.Until()) && win.Start.Before(o.Until()) && wins(o, &win) {
				return o
			}
		}
	}
	return nil
}

// Filter selects windows for List.
type Filter struct {
	// Key, if set: the windows covering this key (of any target).
	Key *Key
	// Target, if set: the windows of exactly this target.
	Target *Target
	// Ended includes windows over or cancelled (kept for Keep).
	Ended bool
	// Visible, if set, says whether the caller may see a window.
	Visible func(*Window) bool
}

// List returns the windows f selects, by start time.
func (w *Windows) List(f Filter) []Window {
	now := w.now()
	var out []Window
	for _, win := range w.all() {
		switch {
		case !f.Ended && !now.Before(win.Until()),
			f.Key != nil && !win.Covers(*f.Key),
			f.Target != nil && win.Target != *f.Target,
			f.Visible != nil && !f.Visible(&win):
			continue
		}
		out = append(out, win)
	}
	slices.SortStableFunc(out, func(a, b Window) int { return a.Start.Compare(b.Start) })
	return out
}

// Count is how many windows are pending and how many active now.
func (w *Windows) Count() map[string]int {
	now, out := w.now(), map[string]int{}
	for _, ws := range w.snap().live {
		for i := range ws {
			if st := ws[i].State(now); st == "pending" || st == "active" {
				out[st]++
			}
		}
	}
	return out
}

// Get returns the window with this ID.
func (w *Windows) Get(id string) (Window, error) {
	for _, win := range w.all() {
		if win.ID == id {
			return win, nil
		}
	}
	return Window{}, fmt.Errorf("%w: %q (keyward apikey limit-plan -all lists them)", ErrNotFound, id)
}

// Prepare is win as Schedule would write it, checked: a start in the
// past is now, the times are whole seconds; its target, factor, times and
// reason are checked, and its overlaps with the windows known here (the
// store's transaction checks them again). A dry run's answer.
func (w *Windows) Prepare(win Window) (Window, error) {
	now := w.now()
	if win.Start.Before(now) {
		win.Start = now
	}
	win.Start, win.End = win.Start.UTC().Truncate(time.Second), win.End.UTC().Truncate(time.Second)
	if win.Target.Key == "" {
		win.KeyOwner = ""
	}
	if err := check(win, now); err != nil {
		return Window{}, err
	}
	snap := w.snap()
	if err := overlaps(win, snap.live[win.Target], now); err != nil {
		return Window{}, err
	}
	n := 0
	for _, ws := range snap.live {
		n += len(ws)
	}
	if n >= MaxLive {
		return Window{}, fmt.Errorf("%w: %d windows are pending or active, the most keywardd keeps; cancel some first", ErrInvalid, n)
	}
	return win, nil
}

// MaxLive is how many windows may be pending or active at once, on every
// target together.
const MaxLive = 1000

// check checks win's target, factor, times and reason.
func check(win Window, now time.Time) error {
	if err := win.Target.Check(); err != nil {
		return err
	}
	switch f := win.Factor; {
	case math.IsNaN(f) || f < MinFactor || f > MaxFactor:
		return fmt.Errorf("%w: the factor is from %v (a cut) to %v (a raise), not %v", ErrInvalid, MinFactor, MaxFactor, f)
	case f == 1:
		return fmt.Errorf("%w: a factor of 1 changes nothing: over 1 raises the limits, under 1 cuts them", ErrInvalid)
	case math.Abs(f*1000-math.Round(f*1000)) > 1e-6:
		return fmt.Errorf("%w: a factor has at most 3 decimals (%v)", ErrInvalid, f)
	}
	switch {
	case win.Start.IsZero() || win.End.IsZero():
		return fmt.Errorf("%w: a window needs its start and end times", ErrInvalid)
	case !win.End.After(now):
		return fmt.Errorf("%w: its end (%s) is past already", ErrInvalid, win.End.UTC().Format(time.RFC3339))
	case !win.End.After(win.Start):
		return fmt.Errorf("%w: it ends (%s) before it starts (%s)", ErrInvalid, win.End.UTC().Format(time.RFC3339), win.Start.UTC().Format(time.RFC3339))
	case win.End.Sub(win.Start) > MaxLength:
		return fmt.Errorf("%w: a window lasts at most %v (%v asked); for longer, change the keys' own limits (keyward apikey update -limit)", ErrInvalid, MaxLength, win.End.Sub(win.Start))
	case win.Start.Sub(now) > MaxAhead:
		return fmt.Errorf("%w: a window starts at most %v ahead", ErrInvalid, MaxAhead)
	}
	if strings.TrimSpace(win.Reason) == "" {
		return fmt.Errorf("%w: say why (a sale, a launch): the reason goes to the audit log and the plan", ErrInvalid)
	}
	// Spaces of any kind, but no line breaks or other control
	// characters: the reason is one line of the plan and the audit record.
	if utf8.RuneCountInString(win.Reason) > maxReason || !utf8.ValidString(win.Reason) ||
		strings.ContainsFunc(win.Reason, func(r rune) bool {
			return !unicode.IsPrint(r) && (!unicode.IsSpace(r) || r == '\n' || r == '\r' || r == '\v' || r == '\f' || r == 0x85 || r == 0x2028 || r == 0x2029)
		}) {
		return fmt.Errorf("%w: the reason is one line of at most %d characters", ErrInvalid, maxReason)
	}
	return nil
}

// overlaps refuses win if one of ws, its target's windows, not over at
// now, covers part of its time.
func overlaps(win Window, ws []Window, now time.Time) error {
	for _, o := range ws {
		if o.ID != win.ID && win.Start.Before(o.Until()) && o.Start.Before(win.End) && o.Until().After(now) {
			return fmt.Errorf("%w: %s (%s, %s) covers part of it; cancel it first (keyward apikey cancel-limits -window %s) or choose other times",
				ErrOverlap, o.ID, o.Target, o.Change(), o.ID)
		}
	}
	return nil
}

// Schedule writes win as Prepare makes it, with its ID and creation time,
// and returns it as written.
func (w *Windows) Schedule(win Window) (Window, error) {
	win, err := w.Prepare(win)
	if err != nil {
		return Window{}, err
	}
	now := w.now()
	win.ID, win.Created, win.Cancelled, win.CancelledBy, win.Noticed = newID(), now.UTC(), time.Time{}, "", ""
	err = w.update(win.Target, func(ws []Window) ([]Window, error) {
		if err := overlaps(win, ws, now); err != nil {
			return nil, err
		}
		return append(ws, win), nil
	})
	if err != nil {
		return Window{}, err
	}
	return win, nil
}

// Cancel ends a pending or active window now (a pending one never
// starts).
func (w *Windows) Cancel(id, by string) (Window, error) {
	win, err := w.Get(id)
	if err != nil {
		return Window{}, err
	}
	now := w.now().UTC()
	var out Window
	err = w.update(win.Target, func(ws []Window) ([]Window, error) {
		i := slices.IndexFunc(ws, func(o Window) bool { return o.ID == id })
		if i < 0 {
			return nil, fmt.Errorf("%w: %q", ErrNotFound, id)
		}
		if !now.Before(ws[i].Until()) {
			return nil, fmt.Errorf("%w: %s is %s since %s", ErrEnded, id, ws[i].State(now), ws[i].Until().UTC().Format(time.RFC3339))
		}
		ws[i].Cancelled, ws[i].CancelledBy = now, by
		out = ws[i]
		return ws, nil
	})
	return out, err
}

// Due returns the windows whose start or end keywardd has not audited yet,
// with the boundary each passed: a window that started and ended unseen
// (keywardd down throughout) is due once, as Ended.
func (w *Windows) Due() []Notice {
	now := w.now()
	var out []Notice
	for _, win := range w.all() {
		switch {
		case win.Noticed != Ended && !now.Before(win.Until()):
			out = append(out, Notice{Window: win, Boundary: Ended})
		case win.Noticed == "" && win.ActiveAt(now):
			out = append(out, Notice{Window: win, Boundary: Started})
		}
	}
	return out
}

// Notice is a boundary of a window to audit.
type Notice struct {
	Window   Window
	Boundary string // Started or Ended
}

// Noticed records that n was audited, so a restart does not audit it again.
func (w *Windows) Noticed(n Notice) error {
	return w.update(n.Window.Target, func(ws []Window) ([]Window, error) {
		if i := slices.IndexFunc(ws, func(o Window) bool { return o.ID == n.Window.ID }); i >= 0 {
			ws[i].Noticed = n.Boundary
		}
		return ws, nil
	})
}

// Prune drops from the store the windows over and audited longer than
// Keep ago (every write of a target does too): run by the job that
// audits the windows.
func (w *Windows) Prune() error {
	now := w.now()
	done := map[Target]bool{}
	for _, win := range w.all() {
		if win.Noticed == Ended && now.Sub(win.Until()) > Keep && !done[win.Target] {
			done[win.Target] = true
			if err := w.update(win.Target, func(ws []Window) ([]Window, error) { return ws, nil }); err != nil {
				return err
			}
		}
	}
	return nil
}

// update changes a target's windows in one store transaction, dropping
// those over and audited longer than Keep ago, and makes the change take
// effect here (on a fleet, the feed does: Fed). A record of the target
// that does not parse is replaced.
func (w *Windows) update(t Target, fn func([]Window) ([]Window, error)) error {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	now := w.now()
	key := t.storeKey()
	var rec []byte
	err := w.store.Update(store.BucketSchedule, key, func(old []byte) ([]byte, error) {
		rec = nil
		ws, err := decode(key, old)
		if old == nil || err != nil {
			ws = nil // nothing yet, or a record no one can use: replaced
		}
		ws = slices.DeleteFunc(ws, func(o Window) bool { return o.Noticed == Ended && now.Sub(o.Until()) > Keep })
		if ws, err = fn(ws); err != nil {
			return nil, err
		}
		if len(ws) > maxPerTarget {
			return nil, fmt.Errorf("%w: %s has %d windows on record, the most kept; cancel some, or wait for old ones to age out (%v after their end)", ErrInvalid, t, maxPerTarget, Keep)
		}
		if len(ws) == 0 {
			return nil, nil
		}
		rec, err = json.Marshal(ws)
		return rec, err
	})
	if err != nil || w.fed.Load() {
		return err
	}
	return w.Changed(key, rec)
}

// newID is a window's ID: lw_ and 16 hex digits.
func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return "lw_" + hex.EncodeToString(b[:])
}
