package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// A task is one of keywardd's background loops: it runs until ctx ends and
// then returns, nil if it stopped because ctx ended. An error is fatal: it
// stops keywardd (as SPIRE's RunTasks does), so a loop that can carry on
// after a failure logs it and carries on instead.
type task struct {
	name string
	run  func(ctx context.Context) error
	// once: in a fleet, the task runs on the elected node only (work done
	// once for the whole fleet: rotations, deletions, plugin events).
	once bool
}

// once marks t as work done once for a fleet.
func once(t task) task {
	t.once = true
	return t
}

// tasks runs a set of tasks and waits for all of them.
type tasks struct {
	wg       sync.WaitGroup
	stop     context.CancelFunc
	fail     chan struct{} // closed at the first failure
	failOnce sync.Once
	mu       sync.Mutex
	err      error // the first failure
}

// startTasks starts ts, each in its own goroutine. They run until wait
// stops them: a task that fails closes failed (so that Run stops serving
// and the calls in flight drain), but the others run on until then, since
// those calls still count usage and queue events.
func startTasks(ts []task) *tasks {
	ctx, stop := context.WithCancel(context.Background())
	t := &tasks{stop: stop, fail: make(chan struct{})}
	for _, tk := range ts {
		t.wg.Go(func() {
			if err := tk.run(ctx); err != nil {
				t.mu.Lock()
				if t.err == nil {
					t.err = fmt.Errorf("%s: %w", tk.name, err)
				}
				t.mu.Unlock()
				t.failOnce.Do(func() { close(t.fail) })
			}
		})
	}
	return t
}

// failed is closed once a task failed.
func (t *tasks) failed() <-chan struct{} { return t.fail }

// wait stops the tasks, waits for all of them, and returns the first
// error one returned.
func (t *tasks) wait() error {
	t.stop()
	t.wg.Wait()
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// every is a task that calls fn at once, then every interval, until ctx
// ends.
func every(name string, interval time.Duration, fn func(ctx context.Context)) task {
	return task{name: name, run: func(ctx context.Context) error {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			fn(ctx)
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
		}
	}}
}

// loop is a task of a loop that returns once ctx ends.
func loop(name string, fn func(ctx context.Context)) task {
	return task{name: name, run: func(ctx context.Context) error { fn(ctx); return nil }}
}

// serveHTTP is a task that serves hs on ln until ctx ends, then shuts it
// down (5 s for the requests in flight). If it stops serving by itself
// (ln failed), that is logged and keywardd serves on without it: metrics
// or the JWKS over HTTP are not worth the key service.
func serveHTTP(name string, hs *http.Server, ln net.Listener, log *slog.Logger) task {
	return task{name: name, run: func(ctx context.Context) error {
		served := make(chan error, 1)
		go func() { served <- hs.Serve(ln) }()
		select {
		case err := <-served:
			log.Error(name+" stopped serving; keywardd serves on without it", "error", err.Error())
			return nil
		case <-ctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := hs.Shutdown(sctx)
		if serr := <-served; !errors.Is(serr, http.ErrServerClosed) && err == nil {
			err = serr
		}
		return err
	}}
}
