package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestTasksWaitForEveryOne: wait stops every task and returns only once
// each has returned; a task's error comes back with its name.
func TestTasksWaitForEveryOne(t *testing.T) {
	var ended atomic.Int32
	slow := func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond) // a final flush
		ended.Add(1)
		return nil
	}
	bg := startTasks([]task{{name: "a", run: slow}, {name: "b", run: slow}, {name: "c", run: func(ctx context.Context) error {
		<-ctx.Done()
		ended.Add(1)
		return errors.New("its last flush failed")
	}}})
	select {
	case <-bg.failed():
		t.Fatal("failed before any task failed")
	case <-time.After(10 * time.Millisecond):
	}
	err := bg.wait()
	if n := ended.Load(); n != 3 {
		t.Fatalf("wait returned with %d of 3 tasks ended", n)
	}
	if err == nil || !strings.HasPrefix(err.Error(), "c: its last flush failed") {
		t.Fatalf("wait: %v", err)
	}
}

// TestTaskFailureStopsServing: a task that fails closes failed (so Run
// stops serving), while the others run on until wait: the calls that
// drain meanwhile still count usage and queue events.
func TestTaskFailureStopsServing(t *testing.T) {
	var stopped atomic.Bool
	bg := startTasks([]task{
		{name: "steady", run: func(ctx context.Context) error { <-ctx.Done(); stopped.Store(true); return nil }},
		{name: "broken", run: func(context.Context) error { return errors.New("the listener is gone") }},
		{name: "broken later", run: func(ctx context.Context) error { <-ctx.Done(); return errors.New("a second failure") }},
	})
	select {
	case <-bg.failed():
	case <-time.After(5 * time.Second):
		t.Fatal("a failed task did not close failed")
	}
	time.Sleep(20 * time.Millisecond)
	if stopped.Load() {
		t.Fatal("a task was stopped before wait")
	}
	if err := bg.wait(); err == nil || err.Error() != "broken: the listener is gone" {
		t.Fatalf("wait: %v, want the first failure", err)
	}
	if !stopped.Load() {
		t.Fatal("wait returned before the steady task ended")
	}
}

// TestEvery: every calls at once, then each interval, and stops with ctx.
func TestEvery(t *testing.T) {
	var n atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- every("tick", time.Millisecond, func(context.Context) { n.Add(1) }).run(ctx) }()
	for n.Load() < 3 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := n.Load()
	time.Sleep(10 * time.Millisecond)
	if n.Load() != got {
		t.Fatal("every called fn after ctx ended")
	}
}

// stuckServer is a gRPC server whose calls never end: GracefulStop waits
// for them for ever, as grpc-go's does for a handler stuck in the HSM
// (Stop closes the connections but does not wait for handlers).
type stuckServer struct{ stopped chan struct{} }

func (s *stuckServer) Serve(net.Listener) error { <-s.stopped; return nil }
func (s *stuckServer) GracefulStop()            { select {} }
func (s *stuckServer) Stop()                    { close(s.stopped) }

// TestDrainIsBounded: a call that never ends keeps keywardd from stopping
// for DrainTimeout and stopGrace, no longer, so that its last flushes run
// before the service manager's stop timeout.
func TestDrainIsBounded(t *testing.T) {
	d := &daemonParts{gs: &stuckServer{stopped: make(chan struct{})}, log: slog.New(slog.DiscardHandler),
		o: Options{DrainTimeout: 50 * time.Millisecond}}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- d.serve(ctx, nil) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took < 50*time.Millisecond+stopGrace {
			t.Fatalf("serve returned after %v, before the drain timeout and the grace", took)
		}
	case <-time.After(50*time.Millisecond + stopGrace + 10*time.Second):
		t.Fatal("serve waited for a call that never ends")
	}
}
