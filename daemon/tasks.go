package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"
)

// A task is one of keywardd's background loops: it runs until ctx ends and
// then returns, nil if it stopped because ctx ended. An error is fatal: it
// stops keywardd (as SPIRE's RunTasks does), so a loop that can carry on
// after a failure logs it and carries on instead.
type task struct {
	name string
	run  func(ctx context.Context) error
}

// tasks runs a set of tasks and waits for all of them.
type tasks struct {
	g    *errgroup.Group
	ctx  context.Context // ends when stop is called or a task fails
	stop context.CancelFunc
}

// startTasks starts ts, each in its own goroutine. They run until stop
// ends them, or one of them fails; wait waits for every one.
func startTasks(ts []task) *tasks {
	ctx, stop := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	for _, t := range ts {
		g.Go(func() error {
			if err := t.run(gctx); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			return nil
		})
	}
	return &tasks{g: g, ctx: gctx, stop: stop}
}

// failed is closed once a task failed (or the tasks were stopped).
func (t *tasks) failed() <-chan struct{} { return t.ctx.Done() }

// wait stops the tasks, waits for all of them, and returns the first
// error one returned.
func (t *tasks) wait() error {
	t.stop()
	return t.g.Wait()
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
