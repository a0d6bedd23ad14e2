// Package events is the watch stream (EventService.Watch): the changes an
// application caching verdicts, tokens or keys must learn of, delivered in
// order from keywardd's outbox, the same events the plugins get, written
// in the same transaction as the change they announce. So an event is never
// lost to a crash, and on a fleet the outbox is the fleet's: a change on
// any node reaches the watchers of every node.
//
// A watcher reads the outbox itself, from its cursor: there is no queue
// per watcher to fill, and one that reads slowly only falls behind. The
// outbox keeps events for Config.Retention (and until every plugin has
// taken them); a watcher whose cursor names an event no longer kept, or
// one of another store (a backup restored, another fleet), or that falls
// further behind than Config.MaxLag, is sent a Resync marker with the
// cursor to go on from, never a silent gap: it must drop what it cached
// and read it again.
//
// A cursor is the event's sequence number and its random nonce: a number
// reused by a restored store names another event, which the nonce tells.
//
// Written here, not taken from a library: it is a loop over the store's
// outbox, which is the single source of truth; a message broker would be
// a second one to keep consistent with it.
package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
)

// Config tunes the watch stream (events: in keywardd's configuration).
type Config struct {
	// Retention is how long events are kept for watchers to resume from,
	// after every plugin has taken them. Default 24h.
	Retention time.Duration `yaml:"retention"`
	// MaxLag is how many events a watcher may fall behind before it is
	// sent a Resync and moved to the newest. Default 10 000.
	MaxLag int `yaml:"max_lag"`
	// ExpiringWithin is how long before an API key's expiry its
	// api_key_expiring event is written. Default 168h (7 days).
	ExpiringWithin time.Duration `yaml:"expiring_within"`
	// MaxWatchers is how many watch streams one caller (uid) may hold
	// open at once. Default 8.
	MaxWatchers int `yaml:"max_watchers"`
}

// Defaults.
const (
	DefaultRetention      = 24 * time.Hour
	DefaultMaxLag         = 10_000
	DefaultExpiringWithin = 7 * 24 * time.Hour
	DefaultMaxWatchers    = 8
)

// Check says what is wrong with c, if anything.
func (c *Config) Check() error {
	if c.Retention < 0 || c.MaxLag < 0 || c.ExpiringWithin < 0 || c.MaxWatchers < 0 {
		return errors.New("events: retention, max_lag, expiring_within and max_watchers must not be negative")
	}
	if c.Retention != 0 && c.Retention < time.Minute {
		return fmt.Errorf("events.retention %v: at least a minute, or watchers reconnecting after a blip must resync", c.Retention)
	}
	return nil
}

// WithDefaults is c with its zero values replaced by the defaults.
func (c Config) WithDefaults() Config {
	if c.Retention == 0 {
		c.Retention = DefaultRetention
	}
	if c.MaxLag == 0 {
		c.MaxLag = DefaultMaxLag
	}
	if c.ExpiringWithin == 0 {
		c.ExpiringWithin = DefaultExpiringWithin
	}
	if c.MaxWatchers == 0 {
		c.MaxWatchers = DefaultMaxWatchers
	}
	return c
}

// Store is what the hub needs of the store.
type Store interface {
	Get(bucket, key string) ([]byte, error)
	ForEachAfter(bucket, after string, fn func(key string, rec []byte) error) error
}

// Item is what a watcher is sent: an event, a resync marker, or (neither)
// where it starts, first on every stream, or how far it has gone without
// an event it may see (Progress).
type Item struct {
	// Cursor is where the watcher is once it has this item: give it back
	// to resume after it.
	Cursor string
	// Event, unless Resync.
	Event outbox.Event
	// Resync: events may have been missed before this point (Reason says
	// why); drop what was cached from them and read it again.
	Resync bool
	Reason string
	// Progress: no event the watcher may see up to Cursor (sent at most
	// every ProgressEvery while others go by).
	Progress bool
}

// ProgressEvery is how often a watcher whose cursor moved past events it
// may not see is told so: its cursor then stays within the retention. A
// variable for tests.
var ProgressEvery = time.Minute

// Hub serves the watchers of one keywardd.
type Hub struct {
	store Store
	cfg   Config

	mu       sync.Mutex
	signal   chan struct{} // closed, and replaced, when events may have been written
	head     uint64        // the newest event's sequence number, as last read
	headKey  string
	watchers map[uint32]int // open streams by caller uid
	epoch    uint64         // counts Invalidate
	why      string         // the last Invalidate's reason
}

// Invalidate sends every watcher a resync marker at its place (no event is
// skipped): what they cached may have been right by rules that changed (a
// policy reload, which may take events away from them).
func (h *Hub) Invalidate(reason string) {
	h.mu.Lock()
	h.epoch++
	h.why = reason
	close(h.signal)
	h.signal = make(chan struct{})
	h.mu.Unlock()
}

// invalidated is the epoch and its reason.
func (h *Hub) invalidated() (uint64, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.epoch, h.why
}

// New returns a hub over the store's outbox.
func New(s Store, cfg Config) *Hub {
	return &Hub{store: s, cfg: cfg.WithDefaults(), signal: make(chan struct{}), watchers: map[uint32]int{}}
}

// Wake tells the watchers that events may have been written. It never
// waits, and may be called from the store's write path.
func (h *Hub) Wake() {
	h.mu.Lock()
	close(h.signal)
	h.signal = make(chan struct{})
	h.mu.Unlock()
}

func (h *Hub) waiter() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.signal
}

// ErrTooMany: the caller holds as many watch streams as it may.
var ErrTooMany = errors.New("events: too many watch streams")

// ErrCursor: a cursor that does not parse.
var ErrCursor = errors.New("events: not a cursor")

// Join counts a stream of caller uid, and returns the func that ends it.
func (h *Hub) Join(uid uint32) (leave func(), err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.watchers[uid] >= h.cfg.MaxWatchers {
		return nil, fmt.Errorf("%w: uid %d has %d open, the most events.max_watchers allows; close one (one stream serves every kind of event)", ErrTooMany, uid, h.watchers[uid])
	}
	h.watchers[uid]++
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			if h.watchers[uid]--; h.watchers[uid] <= 0 {
				delete(h.watchers, uid)
			}
		})
	}, nil
}

// Start is where a stream without a cursor begins.
type Start int

const (
	FromNow    Start = iota // the events written from now on
	FromOldest              // every event still kept
)

// cursor is an event's place: its sequence number and nonce.
func cursor(seq uint64, nonce string) string { return strconv.FormatUint(seq, 10) + "." + nonce }

// ParseCursor reads a cursor.
func ParseCursor(c string) (seq uint64, nonce string, err error) {
	n, nonce, ok := strings.Cut(c, ".")
	if ok {
		seq, err = strconv.ParseUint(n, 10, 64)
	}
	if !ok || err != nil || (seq == 0) != (nonce == "0") || len(nonce) == 0 || len(nonce) > 64 {
		return 0, "", fmt.Errorf("%w: %q; give back the cursor of the last event or resync marker received, as it was", ErrCursor, c)
	}
	return seq, nonce, nil
}

// batch bounds the events read at a time.
const batch = 256

// poll is how often a watcher looks without being woken: the store's hook
// (one host) or the fleet's change feed wakes it at every event; this is
// a floor, should a wake be missed.
const poll = 10 * time.Second

// Watch sends through send, in order, the events after from (a cursor;
// empty: as start says) that allow admits, and a Resync marker where
// events may be missing, until ctx ends or send fails.
func (h *Hub) Watch(ctx context.Context, from string, start Start, allow func(outbox.Event) bool, send func(Item) error) error {
	var cur uint64 // the watcher's place: the last event gone over
	pos := ""      // and its cursor
	resync := func(reason string) error {
		head, headKey, err := h.newest()
		if err != nil {
			return err
		}
		cur, pos = head, cursor(head, headKey)
		return send(Item{Cursor: pos, Resync: true, Reason: reason})
	}
	epoch, _ := h.invalidated()
	switch {
	case from != "":
		seq, nonce, err := ParseCursor(from)
		if err != nil {
			return err
		}
		ok, err := h.holds(seq, nonce)
		if err != nil {
			return err
		}
		if !ok {
			if err := resync("the event your cursor names is no longer kept (older than events.retention) or was never this keywardd's: read what you cache again"); err != nil {
				return err
			}
			break
		}
		// The stream is open, from where the watcher was.
		cur, pos = seq, from
		if err := send(Item{Cursor: pos}); err != nil {
			return err
		}
	case start == FromOldest:
		first, err := h.after(0, 1)
		if err != nil {
			return err
		}
		if len(first) > 0 {
			cur = first[0].seq - 1
		}
		pos = cursor(0, "0")
		if err := send(Item{Cursor: pos}); err != nil {
			return err
		}
	default: // FromNow
		head, headKey, err := h.newest()
		if err != nil {
			return err
		}
		cur, pos = head, cursor(head, headKey)
		// Where it starts, so that a watcher that sees no event for a
		// while still has a cursor to resume from.
		if err := send(Item{Cursor: pos}); err != nil {
			return err
		}
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	sentPos, sentAt := pos, time.Now()
	for {
		if pos != sentPos && time.Since(sentAt) >= ProgressEvery {
			if err := send(Item{Cursor: pos, Progress: true}); err != nil {
				return err
			}
			sentPos, sentAt = pos, time.Now()
		}
		wake := h.waiter() // before the read: a write after it wakes the next wait
		if e, why := h.invalidated(); e != epoch {
			epoch = e
			if err := send(Item{Cursor: pos, Resync: true, Reason: why}); err != nil {
				return err
			}
		}
		evs, err := h.after(cur, batch)
		if err != nil {
			return err
		}
		if len(evs) > 0 && evs[0].seq != cur+1 {
			// The first event after the place should follow it: a gap is
			// events dropped while this watcher was behind (or numbers a
			// store skipped: then its place is still held).
			if ok, err := h.holds(cur, ""); err != nil {
				return err
			} else if !ok {
				last := evs[len(evs)-1]
				cur, pos = last.seq, cursor(last.seq, last.e.Nonce)
				if err := send(Item{Cursor: pos, Resync: true,
					Reason: "you fell behind events.retention: events were dropped before you read them"}); err != nil {
					return err
				}
				continue
			}
		}
		if len(evs) == batch {
			if head, _, err := h.newest(); err == nil && head-cur > uint64(h.cfg.MaxLag) {
				if err := resync(fmt.Sprintf("you fell more than events.max_lag (%d) events behind", h.cfg.MaxLag)); err != nil {
					return err
				}
				continue
			}
		}
		for _, ev := range evs {
			cur, pos = ev.seq, cursor(ev.seq, ev.e.Nonce)
			if allow(ev.e) {
				if err := send(Item{Cursor: pos, Event: ev.e}); err != nil {
					return err
				}
				sentPos, sentAt = pos, time.Now()
			}
		}
		if len(evs) == batch {
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-wake:
		case <-t.C:
		}
	}
}

type stored struct {
	seq uint64
	e   outbox.Event
}

// after reads up to n events after seq.
func (h *Hub) after(seq uint64, n int) ([]stored, error) {
	var out []stored
	err := h.store.ForEachAfter(store.BucketOutbox, store.OutboxKey(seq), func(k string, b []byte) error {
		k2, err := strconv.ParseUint(k, 10, 64)
		if err != nil || k2 <= seq {
			return nil
		}
		var e outbox.Event
		if err := json.Unmarshal(b, &e); err != nil {
			return fmt.Errorf("events: event %d does not parse: %w", k2, err)
		}
		out = append(out, stored{k2, e})
		if len(out) == n {
			return errStop
		}
		return nil
	})
	if errors.Is(err, errStop) {
		err = nil
	}
	return out, err
}

var errStop = errors.New("stop")

// holds says whether the outbox still holds event seq, with nonce if one
// is given. Cursor 0 (given when there was no event yet) holds while the
// outbox starts at event 1: an empty one may have dropped every event
// since (the store's sequence is not at hand), so it does not.
func (h *Hub) holds(seq uint64, nonce string) (bool, error) {
	if seq == 0 {
		first, err := h.after(0, 1)
		return err == nil && len(first) == 1 && first[0].seq == 1, err
	}
	b, err := h.store.Get(store.BucketOutbox, store.OutboxKey(seq))
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if nonce == "" {
		return true, nil
	}
	var e outbox.Event
	if err := json.Unmarshal(b, &e); err != nil {
		return false, fmt.Errorf("events: event %d does not parse: %w", seq, err)
	}
	return e.Nonce == nonce, nil
}

// newest is the newest event's sequence number and nonce (0 and "0": none
// yet), reading on from the last one found.
func (h *Hub) newest() (uint64, string, error) {
	h.mu.Lock()
	head, headKey := h.head, h.headKey
	h.mu.Unlock()
	if head > 0 {
		if ok, err := h.holds(head, ""); err != nil || !ok {
			head = 0 // dropped (a store restored?): read from the start
		}
	}
	for {
		evs, err := h.after(head, batch)
		if err != nil {
			return 0, "", err
		}
		if len(evs) == 0 {
			break
		}
		last := evs[len(evs)-1]
		head, headKey = last.seq, last.e.Nonce
	}
	if head == 0 {
		headKey = "0"
	}
	h.mu.Lock()
	h.head, h.headKey = head, headKey
	h.mu.Unlock()
	return head, headKey, nil
}
