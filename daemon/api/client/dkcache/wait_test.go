package dkcache_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/dkcache"
)

// held is keywardd's client with its first GenerateDataKey held until
// release is closed; it counts the calls and tells when each starts.
type held struct {
	kw      *client.Client
	entered chan struct{} // a value as each GenerateDataKey starts
	release chan struct{} // closed to let the first one go on

	mu    sync.Mutex
	calls int
}

func newHeld(kw *client.Client) *held {
	return &held{kw: kw, entered: make(chan struct{}, 64), release: make(chan struct{})}
}

func (h *held) GenerateDataKey(ctx context.Context, name string, ec map[string]string) (*client.DataKey, error) {
	h.mu.Lock()
	h.calls++
	first := h.calls == 1
	h.mu.Unlock()
	h.entered <- struct{}{}
	if first {
		<-h.release
	}
	return h.kw.GenerateDataKey(ctx, name, ec)
}

func (h *held) Decrypt(ctx context.Context, ct []byte, ec map[string]string) ([]byte, error) {
	return h.kw.Decrypt(ctx, ct, ec)
}

func (h *held) Calls() int { h.mu.Lock(); defer h.mu.Unlock(); return h.calls }

// waits tells, on the channel it returns, of each caller that starts
// waiting for another's call to keywardd (the first 256), until stop is
// called or the test ends.
func waits(t *testing.T) (ch chan struct{}, stop func()) {
	t.Helper()
	ch = make(chan struct{}, 256)
	dkcache.SetWaiting(func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	})
	stop = func() { dkcache.SetWaiting(nil) }
	t.Cleanup(stop)
	return ch, stop
}

// TestFetcherCancelled: callers waiting for a data key whose fetcher's
// context is cancelled mid-call (the real client then returns keywardd's
// status Canceled, not context.Canceled) go on with their own live
// contexts: one of them fetches, the others share its key. A waiter that
// gives up is no longer counted against the key.
func TestFetcherCancelled(t *testing.T) {
	kw := start(t)
	h := newHeld(kw)
	c := newCache(t, h, dkcache.Options{})
	waited, _ := waits(t)

	lctx, cancel := context.WithCancel(context.Background())
	var lerr error
	done := make(chan struct{})
	go func() { _, lerr = c.Seal(lctx, "orders", []byte("x"), tenant42); close(done) }()
	<-h.entered
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() { _, errs[i] = c.Seal(context.Background(), "orders", []byte("y"), tenant42) })
	}
	for range errs {
		<-waited
	}

	// One more waiter gives up: it is no longer counted.
	gctx, giveUp := context.WithCancel(context.Background())
	gerr := make(chan error)
	go func() { _, err := c.Seal(gctx, "orders", []byte("zz"), tenant42); gerr <- err }()
	<-waited
	if n, b, _ := c.SealWaiters("orders", tenant42); n != 5 || b != 1+4+2 {
		t.Fatalf("before giving up: %d waiters for %d bytes; want 5 for 7", n, b)
	}
	giveUp()
	if err := <-gerr; !errors.Is(err, context.Canceled) {
		t.Errorf("the waiter that gave up: %v, want context.Canceled", err)
	}
	if n, b, _ := c.SealWaiters("orders", tenant42); n != 4 || b != 1+4 {
		t.Errorf("after one gave up: %d waiters for %d bytes; want 4 for 5", n, b)
	}

	cancel()
	close(h.release)
	<-done
	wg.Wait()
	if !errors.Is(lerr, client.ErrOther) {
		t.Errorf("the cancelled fetcher: %v, want keywardd's Canceled (client.ErrOther)", lerr)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("waiter %d, its own context live, failed: %v", i, err)
		}
	}
	if n := h.Calls(); n != 2 {
		t.Errorf("%d GenerateDataKey calls; want 2 (the cancelled one, and one for the 4 waiters)", n)
	}
}

// TestWaitOnlyIfServed: a caller waits for another's call to keywardd only
// if the key it brings can serve its record too (MaxBytes with the
// fetcher's record); otherwise it calls keywardd itself, at once.
func TestWaitOnlyIfServed(t *testing.T) {
	kw := start(t)
	for _, tc := range []struct {
		name          string
		first, second int
		wait          bool
	}{
		{"first uses the key up", 1024, 0, false},
		{"both over MaxBytes together", 600, 600, false},
		{"both fit", 400, 624, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHeld(kw)
			c := newCache(t, h, dkcache.Options{Limits: dkcache.Limits{MaxBytes: 1024}})
			waited, _ := waits(t)
			var wg sync.WaitGroup
			seal := func(size int) {
				wg.Go(func() {
					if _, err := c.Seal(context.Background(), "orders", make([]byte, size), tenant42); err != nil {
						t.Error(err)
					}
				})
			}
			seal(tc.first)
			<-h.entered
			seal(tc.second)
			select {
			case <-waited:
				if !tc.wait {
					t.Errorf("records of %d and %d bytes, MaxBytes 1024: the second waited for the first's key", tc.first, tc.second)
				}
			case <-h.entered:
				if tc.wait {
					t.Errorf("records of %d and %d bytes, MaxBytes 1024: the second called keywardd instead of waiting", tc.first, tc.second)
				}
			}
			close(h.release)
			wg.Wait()
			if s := c.Stats(); tc.wait && (s.Misses != 1 || s.Hits != 1) {
				t.Errorf("stats %+v; want 1 miss, 1 hit", s)
			}
		})
	}
}
