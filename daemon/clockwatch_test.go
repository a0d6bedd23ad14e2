package daemon

import (
	"io"
	"log/slog"
	"testing"
	"time"
	"unsafe"
)

// wallJumped is t as time.Now reads it after the system clock was set by d
// (settimeofday, NTP): the wall reading moves, the monotonic one does not.
// time.Time.Add would move both, which no real jump does. It reaches into
// time.Time's representation (wall: hasMonotonic bit, 33 bits of seconds,
// 30 of nanoseconds): the only way to make such a reading in a test.
func wallJumped(t time.Time, d time.Duration) time.Time {
	type rep struct {
		wall uint64
		ext  int64
		loc  *time.Location
	}
	r := (*rep)(unsafe.Pointer(&t))
	if r.wall&(1<<63) == 0 {
		panic("time.Now has no monotonic reading: time.Time changed; fix wallJumped")
	}
	r.wall += uint64(d/time.Second) << 30
	return t
}

// TestClockWatchSeesRealJumps: a real jump of the system clock (wall reading
// moved, monotonic not), forward or back, is seen; steady looks are
// counted again from it; real time passing is no jump.
func TestClockWatchSeesRealJumps(t *testing.T) {
	if got := wallJumped(time.Now(), time.Hour).Round(0).Sub(time.Now().Round(0)); got < 59*time.Minute || got > 61*time.Minute {
		t.Fatalf("wallJumped moved the wall clock by %v", got)
	}
	var jump time.Duration
	cw := newClockWatch(func() time.Time { return wallJumped(time.Now(), jump) })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for i := range steadyLooks {
		if got := cw.steady(log, "test"); got != (i == steadyLooks-1) {
			t.Fatalf("look %d on a steady clock: steady %v", i, got)
		}
	}
	for _, d := range []time.Duration{time.Hour, -time.Hour} {
		jump += d
		if got := cw.jumped(); got < d-time.Second || got > d+time.Second {
			t.Fatalf("a jump of %v seen as %v", d, got)
		}
		jump += d
		if cw.steady(log, "test") {
			t.Fatalf("steady right after a jump of %v", d)
		}
	}
	time.Sleep(10 * time.Millisecond)
	if got := cw.jumped(); got != 0 {
		t.Fatalf("10 ms of real time seen as a jump of %v", got)
	}
}
