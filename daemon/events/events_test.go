package events_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/events"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/storetest"
)

// open is a real store for a hub.
func open(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(filepath.Join(t.TempDir(), "keyward.db"), storetest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// emit writes n events in one transaction, as a domain write does.
func emit(t *testing.T, s *store.Store, n int, id string) {
	t.Helper()
	err := s.UpdateEachEmit(store.BucketAPIKeys, []string{"ak_000000000000000000000001"}, func(string, []byte) ([]byte, [][]byte, error) {
		var evs [][]byte
		for i := range n {
			evs = append(evs, outbox.Encode(outbox.Event{Kind: outbox.APIKeyRevoked, ID: fmt.Sprintf("%s-%d", id, i), Subject: "shop", Time: time.Now()}))
		}
		return []byte("{}"), evs, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// drop deletes the outbox's first n events, as the outbox's collection
// does once they are past retention.
func drop(t *testing.T, s *store.Store, n int) {
	t.Helper()
	var keys []string
	for i := 1; i <= n; i++ {
		keys = append(keys, store.OutboxKey(uint64(i)))
	}
	if err := s.UpdateEach(store.BucketOutbox, keys, func(string, []byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
}

// collect runs a watch until it has got want items or 5 s passed.
func collect(t *testing.T, h *events.Hub, from string, start events.Start, want int) []events.Item {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var got []events.Item
	errEnough := errors.New("enough")
	err := h.Watch(ctx, from, start, func(outbox.Event) bool { return true }, func(it events.Item) error {
		got = append(got, it)
		if len(got) == want {
			return errEnough
		}
		return nil
	})
	if !errors.Is(err, errEnough) {
		t.Fatalf("watch from %q: %v after %d items: %v", from, err, len(got), got)
	}
	return got
}

func TestCursors(t *testing.T) {
	s := open(t)
	h := events.New(s, events.Config{})
	s.OnEvents(h.Wake)
	// No event yet: the start is cursor 0.
	start := collect(t, h, "", events.FromNow, 1)[0]
	if start.Cursor != "0.0" || start.Resync {
		t.Fatalf("start on an empty outbox: %+v", start)
	}
	emit(t, s, 3, "a")
	got := collect(t, h, "0.0", events.FromNow, 4)
	if got[0].Cursor != "0.0" || got[1].Event.ID != "a-0" || got[3].Event.ID != "a-2" {
		t.Fatalf("from cursor 0 with events 1-3 kept: %+v", got)
	}
	second := got[2].Cursor
	// Events 1 and 2 dropped: resuming after event 1 is a gap, after
	// event 2 is not.
	drop(t, s, 2)
	if got := collect(t, h, got[1].Cursor, events.FromNow, 1); !got[0].Resync || !strings.Contains(got[0].Reason, "no longer kept") {
		t.Errorf("from a dropped event: %+v; want a resync", got)
	}
	if got := collect(t, h, "0.0", events.FromNow, 1); !got[0].Resync {
		t.Errorf("from cursor 0 with event 1 dropped: %+v; want a resync", got)
	}
	// The nonce tells another store's event of the same number.
	seq, _, _ := events.ParseCursor(second)
	if got := collect(t, h, fmt.Sprintf("%d.%s", seq+1, "ffffffffffffffff"), events.FromNow, 1); !got[0].Resync {
		t.Errorf("a cursor with another nonce: %+v; want a resync", got)
	}
	// From the oldest kept: event 3 on, no resync.
	if got := collect(t, h, "", events.FromOldest, 2); got[0].Resync || got[1].Event.ID != "a-2" {
		t.Errorf("from the oldest: %+v", got)
	}
	// Every dropped, the outbox empty: cursor 0 may have missed events.
	drop(t, s, 3)
	if got := collect(t, h, "0.0", events.FromNow, 1); !got[0].Resync {
		t.Errorf("from cursor 0 on an emptied outbox: %+v; want a resync", got)
	}
	for _, c := range []string{"x", "1", "1.", "0.abc", "-1.aa", "1.0"} {
		if err := h.Watch(context.Background(), c, events.FromNow, nil, nil); !errors.Is(err, events.ErrCursor) {
			t.Errorf("cursor %q: %v", c, err)
		}
	}
}

// TestMaxLag: a watcher more than max_lag behind is moved to the newest
// with a resync marker.
func TestMaxLag(t *testing.T) {
	s := open(t)
	h := events.New(s, events.Config{MaxLag: 100})
	s.OnEvents(h.Wake)
	emit(t, s, 1, "first")
	from := collect(t, h, "", events.FromOldest, 2)[1].Cursor
	emit(t, s, 600, "b")
	got := collect(t, h, from, events.FromNow, 2)
	if !got[1].Resync || !strings.Contains(got[1].Reason, "events.max_lag (100)") || got[1].Cursor != collect(t, h, "", events.FromNow, 1)[0].Cursor {
		t.Fatalf("600 events behind, max_lag 100: %+v; want a resync to the newest", got)
	}
	emit(t, s, 1, "after")
	if got := collect(t, h, got[1].Cursor, events.FromNow, 2); got[1].Event.ID != "after-0" {
		t.Errorf("after the resync: %+v", got)
	}
}

// TestBehindRetention: events dropped while a watcher is connected and
// behind come as a resync, not a gap.
func TestBehindRetention(t *testing.T) {
	s := open(t)
	h := events.New(s, events.Config{})
	s.OnEvents(h.Wake)
	emit(t, s, 1, "a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	items := make(chan events.Item, 10)
	block := make(chan struct{})
	go h.Watch(ctx, "", events.FromOldest, func(outbox.Event) bool { return true }, func(it events.Item) error {
		items <- it
		if it.Event.ID == "a-0" {
			<-block // the watcher stops reading here
		}
		return nil
	})
	<-items // start
	<-items // a-0
	emit(t, s, 3, "b")
	drop(t, s, 3) // a-0, b-0, b-1 dropped while it was not reading
	close(block)
	h.Wake()
	it := <-items
	if !it.Resync || !strings.Contains(it.Reason, "events.retention") {
		t.Fatalf("after events were dropped behind the watcher: %+v; want a resync", it)
	}
}

// TestInvalidate: every watcher gets a resync at its place, and goes on.
func TestInvalidate(t *testing.T) {
	s := open(t)
	h := events.New(s, events.Config{})
	s.OnEvents(h.Wake)
	emit(t, s, 1, "a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	items := make(chan events.Item, 10)
	go h.Watch(ctx, "", events.FromOldest, func(outbox.Event) bool { return true }, func(it events.Item) error { items <- it; return nil })
	<-items
	a0 := <-items
	h.Invalidate("the policy changed")
	if it := <-items; !it.Resync || it.Reason != "the policy changed" || it.Cursor != a0.Cursor {
		t.Fatalf("%+v; want a resync at %s", it, a0.Cursor)
	}
	emit(t, s, 1, "b")
	if it := <-items; it.Event.ID != "b-0" {
		t.Fatalf("after the resync: %+v", it)
	}
}

// TestProgress: a watcher that may see none of the events going by is told
// how far it got, so that its cursor stays within the retention.
func TestProgress(t *testing.T) {
	was := events.ProgressEvery
	events.ProgressEvery = 20 * time.Millisecond
	defer func() { events.ProgressEvery = was }()
	s := open(t)
	h := events.New(s, events.Config{})
	s.OnEvents(h.Wake)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	items := make(chan events.Item, 10)
	go h.Watch(ctx, "", events.FromNow, func(outbox.Event) bool { return false }, func(it events.Item) error { items <- it; return nil })
	<-items // start
	emit(t, s, 3, "a")
	time.Sleep(30 * time.Millisecond) // past ProgressEvery: the next look says how far
	emit(t, s, 1, "b")
	it := <-items
	if !it.Progress || it.Cursor == "" {
		t.Fatalf("%+v; want a progress item", it)
	}
	if seq, _, _ := events.ParseCursor(it.Cursor); seq < 3 {
		t.Errorf("progress at %s; want at least event 3", it.Cursor)
	}
}
