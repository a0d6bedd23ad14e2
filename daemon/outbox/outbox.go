// Package outbox delivers revocations to the plugins that subscribe to them,
// at least once and in order, from the store. A revocation and its event
// are written in one transaction (store.UpdateEachEmit), so an event is
// never lost to a crash between the two; each plugin has a cursor, the last
// event it took, saved after each delivery, so a crash repeats at most the
// delivery under way (which the plugin recognizes by its operation ID:
// "evt-", the sequence number and the event's random nonce). A plugin that fails is retried with
// backoff and the events behind it wait: order is kept.
//
// Written here: it is a few dozen lines over the store, and a queue
// library would be a second store to keep consistent with the first.
package outbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/store"
)

// Kinds of events.
const (
	APIKeyRevoked     = "api_key"
	TokenRevoked      = "token"
	KeyVersionRevoked = "key_version"
	CredentialRevoked = "credential"
	// A key version that no longer encrypts or signs but still decrypts
	// (panic-rotate of an encryption key). ID name/vN.
	KeyVersionRetired = "key_version_retired"
	// Not revocations: notices for the people behind a key.
	RotationDue = "rotation_due" // ID kind/ID (api_key/ak_…), Subject its owner
	Anomaly     = "anomaly"      // ID an API key's ID, Subject its owner, Detail what was seen
	// Changes, for the watch stream (EventService.Watch) and the plugins
	// that subscribe to them: what a cache of verdicts, tokens or keys
	// must learn. API keys: ID the key's ID, Subject its owner.
	APIKeyDisabled = "api_key_disabled"
	APIKeyEnabled  = "api_key_enabled"
	APIKeyUpdated  = "api_key_updated"  // Detail: the fields changed (permissions, limits, allowed_ips, allowed_countries, expiry)
	APIKeyRotated  = "api_key_rotated"  // a new secret; Detail: until when the old ones work
	APIKeyExpiring = "api_key_expiring" // Detail: when it expires
	// A key's new version (a rotation): ID name/vN, Subject the key.
	KeyVersionCreated = "key_version_created"
	// A managed credential's new version: ID its name, Subject its plugin.
	CredentialRotated = "credential_rotated"
	// A secret of an API key was found where it should not be (a secret
	// scanner's report, keyward apikey report-leak). ID the key's ID,
	// Subject its owner, Detail who found it, where, which secret and what
	// keywardd did (the revocation itself also sends APIKeyRevoked).
	APIKeyLeaked = "api_key_leaked"
)

// Event is a revocation or a notice.
type Event struct {
	Kind    string    `json:"kind"`
	ID      string    `json:"id"`
	Subject string    `json:"subject,omitempty"`
	Time    time.Time `json:"time"`
	// Detail says more, in words: never a secret.
	Detail string `json:"detail,omitempty"`
	// Nonce makes the event's operation ID unique beyond this store: the
	// sequence numbers of two keywardds, or of a store restored from a
	// backup, repeat, and a receiver that drops IDs it has seen must not
	// drop a real revocation.
	Nonce string `json:"nonce"`
}

// Encode is the event as the outbox stores it, with a fresh nonce.
func Encode(e Event) []byte {
	n := make([]byte, 8)
	rand.Read(n)
	e.Nonce = hex.EncodeToString(n)
	b, _ := json.Marshal(e) // strings and a time: cannot fail
	return b
}

// Deliverer is what the outbox needs of the plugins.
type Deliverer interface {
	// Plugins are the configured plugins' names.
	Plugins() []string
	// Subscribed says which kinds a plugin wants; ok is false while the
	// plugin has not said (it has not started): its events then wait.
	Subscribed(plugin string) (kinds []string, ok bool)
	// Deliver hands an event to a plugin.
	Deliver(ctx context.Context, plugin, operationID string, e Event) error
}

// Store is what the outbox needs of the store.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	Update(bucket, key string, fn func(old []byte) ([]byte, error)) error
	UpdateEach(bucket string, keys []string, fn func(key string, old []byte) ([]byte, error)) error
	ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error
}

// Outbox delivers events.
type Outbox struct {
	store   Store
	plugins Deliverer
	log     *slog.Logger
	now     func() time.Time
	wake    chan struct{}

	mu    sync.Mutex
	state map[string]*pluginState
	keep  time.Duration // events are kept this long after they were written, for the watch stream
}

// KeepFor keeps each event for d after it was written, taken or not, for
// the watch stream's watchers to resume from (events.retention).
func (o *Outbox) KeepFor(d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.keep = d
}

type pluginState struct {
	failures  int
	retryAt   time.Time
	lastError string
	pending   int
}

// Status is a plugin's delivery state.
type Status struct {
	Pending   int // events waiting for it at the last pass
	Failures  int
	LastError string
	RetryAt   time.Time
}

// New returns an Outbox. A configured plugin seen for the first time
// starts after the events already in the outbox: it gets what happens from
// now on, not the history.
func New(s Store, d Deliverer, log *slog.Logger, now func() time.Time) (*Outbox, error) {
	if now == nil {
		now = time.Now
	}
	o := &Outbox{store: s, plugins: d, log: log, now: now, wake: make(chan struct{}, 1), state: map[string]*pluginState{}}
	last, err := o.last()
	if err != nil {
		return nil, err
	}
	for _, p := range d.Plugins() {
		if _, err := s.Get(store.BucketOutboxCursors, p); errors.Is(err, store.ErrNotFound) {
			if err := o.setCursor(p, last); err != nil {
				return nil, err
			}
		} else if err != nil {
			return nil, err
		}
	}
	return o, nil
}

// last is the sequence number of the newest event (0: none).
func (o *Outbox) last() (uint64, error) {
	var last uint64
	err := o.store.ForEachAfter(store.BucketOutbox, "", func(k string, _ []byte) error {
		last, _ = strconv.ParseUint(k, 10, 64)
		return nil
	})
	return last, err
}

func (o *Outbox) cursor(plugin string) (uint64, error) {
	b, err := o.store.Get(store.BucketOutboxCursors, plugin)
	if errors.Is(err, store.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(string(b), 10, 64)
}

func (o *Outbox) setCursor(plugin string, seq uint64) error {
	return o.store.Update(store.BucketOutboxCursors, plugin, func([]byte) ([]byte, error) {
		return []byte(strconv.FormatUint(seq, 10)), nil
	})
}

// Notify asks for a delivery pass soon (an event was just written).
func (o *Outbox) Notify() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// Run delivers until ctx ends: a pass on Notify and every interval.
func (o *Outbox) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		o.Pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-o.wake:
		}
	}
}

// Pass delivers what it can to every plugin, then drops the events every
// plugin has taken.
func (o *Outbox) Pass(ctx context.Context) {
	for _, p := range o.plugins.Plugins() {
		if err := o.deliver(ctx, p); err != nil && o.log != nil {
			o.log.Error("delivering revocations to a plugin failed; retried with backoff", "plugin", p, "error", err.Error())
		}
	}
	if err := o.collect(); err != nil && o.log != nil {
		o.log.Error("dropping delivered revocation events failed", "error", err.Error())
	}
}

// maxPass bounds the events a pass reads for a plugin.
const maxPass = 10_000

// errStop ends a scan early without an error.
var errStop = errors.New("stop")

func (o *Outbox) deliver(ctx context.Context, plugin string) error {
	o.mu.Lock()
	st := o.state[plugin]
	if st == nil {
		st = &pluginState{}
		o.state[plugin] = st
	}
	wait := o.now().Before(st.retryAt)
	o.mu.Unlock()
	if wait {
		return nil
	}
	cur, err := o.cursor(plugin)
	if err != nil {
		return err
	}
	kinds, known := o.plugins.Subscribed(plugin)
	if !known {
		return nil // not started yet: its events wait, unread
	}
	// The events after the cursor, read first: the store's read
	// transaction must be over before a cursor is written.
	type queued struct {
		key string
		seq uint64
		e   Event
	}
	var queue []queued
	err = o.store.ForEachAfter(store.BucketOutbox, store.OutboxKey(cur), func(k string, b []byte) error {
		seq, err := strconv.ParseUint(k, 10, 64)
		if err != nil || seq <= cur {
			return nil
		}
		var e Event
		if err := json.Unmarshal(b, &e); err != nil {
			return fmt.Errorf("outbox: event %d does not parse: %w", seq, err)
		}
		queue = append(queue, queued{k, seq, e})
		if len(queue) == maxPass {
			return errStop
		}
		return nil
	})
	if errors.Is(err, errStop) {
		err = nil
	}
	pending := len(queue)
	var failure error
	saved := cur
	for _, q := range queue {
		if err != nil {
			break
		}
		if slices.Contains(kinds, q.e.Kind) {
			if failure = o.plugins.Deliver(ctx, plugin, "evt-"+q.key+"-"+q.e.Nonce, q.e); failure != nil {
				break
			}
			// Saved after each delivery: a crash repeats at most one.
			if err = o.setCursor(plugin, q.seq); err == nil {
				saved = q.seq
			}
		}
		cur = q.seq
		pending--
	}
	// Events it does not want are passed over with one write for the lot.
	if err == nil && cur > saved {
		err = o.setCursor(plugin, cur)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	st.pending = pending
	if failure != nil {
		st.failures++
		st.lastError = failure.Error()
		st.retryAt = o.now().Add(backoff(st.failures))
		return failure
	}
	if err == nil {
		st.failures, st.lastError, st.retryAt = 0, "", time.Time{}
	}
	return err
}

// backoff after n failures: 1 s, doubling, at most 5 minutes.
func backoff(n int) time.Duration {
	d := time.Second
	for i := 1; i < n && d < 5*time.Minute; i++ {
		d *= 2
	}
	return min(d, 5*time.Minute)
}

// collect drops the events every configured plugin has taken and older
// than KeepFor: a prefix of the outbox, oldest first.
func (o *Outbox) collect() error {
	o.mu.Lock()
	cutoff := o.now().Add(-o.keep)
	o.mu.Unlock()
	var low uint64
	for i, p := range o.plugins.Plugins() {
		c, err := o.cursor(p)
		if err != nil {
			return err
		}
		if i == 0 || c < low {
			low = c
		}
	}
	if len(o.plugins.Plugins()) == 0 {
		if low, _ = o.last(); low == 0 {
			return nil
		}
	}
	var done []string
	err := o.store.ForEachAfter(store.BucketOutbox, "", func(k string, b []byte) error {
		seq, _ := strconv.ParseUint(k, 10, 64)
		if seq > low {
			return errStop
		}
		var e Event
		if json.Unmarshal(b, &e) == nil && e.Time.After(cutoff) {
			return errStop // kept for the watchers, and every one after it
		}
		done = append(done, k)
		return nil
	})
	if err != nil && !errors.Is(err, errStop) {
		return err
	}
	if len(done) == 0 {
		return nil
	}
	for batch := range slices.Chunk(done, store.BatchKeys(o.store, 1)) {
		if err := o.store.UpdateEach(store.BucketOutbox, batch, func(string, []byte) ([]byte, error) { return nil, nil }); err != nil {
			return err
		}
	}
	return nil
}

// Status is each plugin's delivery state.
func (o *Outbox) Status() map[string]Status {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := map[string]Status{}
	for p, st := range o.state {
		out[p] = Status{Pending: st.pending, Failures: st.failures, LastError: st.lastError, RetryAt: st.retryAt}
	}
	return out
}
