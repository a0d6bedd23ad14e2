package daemon

import (
	"context"
	"errors"
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
	bg := startTasks([]task{{"a", slow}, {"b", slow}, {"c", func(ctx context.Context) error {
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

// TestTaskFailureStopsTheOthers: a task that fails closes failed (so Run
// stops serving) and ends the others' context.
func TestTaskFailureStopsTheOthers(t *testing.T) {
	stopped := make(chan struct{})
	bg := startTasks([]task{
		{"steady", func(ctx context.Context) error { <-ctx.Done(); close(stopped); return nil }},
		{"broken", func(context.Context) error { return errors.New("the listener is gone") }},
	})
	select {
	case <-bg.failed():
	case <-time.After(5 * time.Second):
		t.Fatal("a failed task did not close failed")
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the other task's context did not end")
	}
	if err := bg.wait(); err == nil || err.Error() != "broken: the listener is gone" {
		t.Fatalf("wait: %v", err)
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
