package daemon

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
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

// TestMarkerRefused: a marker file is taken only if root's and writable by
// no one else, and never by a keywardd running as root (whose plugins could
// make one).
func TestMarkerRefused(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, mode os.FileMode, uid int) os.FileInfo {
		p := filepath.Join(dir, name)
		os.WriteFile(p, nil, mode)
		os.Chmod(p, mode)
		os.Chown(p, uid, uid)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi
	}
	os.Symlink("/etc/passwd", filepath.Join(dir, "link"))
	link, _ := os.Lstat(filepath.Join(dir, "link"))
	for _, tc := range []struct {
		name string
		fi   os.FileInfo
		euid int
		ok   bool
	}{
		{"root's 0644, keywardd as keyward", mk("a", 0o644, 0), 999, true},
		{"root's 0600", mk("b", 0o600, 0), 999, true},
		{"keywardd's own", mk("c", 0o644, 999), 999, false},
		{"root's, group-writable", mk("d", 0o664, 0), 999, false},
		{"a symlink", link, 999, false},
		{"keywardd as root", mk("e", 0o644, 0), 0, false},
	} {
		if got := markerRefused(tc.fi, tc.euid, AcceptRollbackFile) == ""; got != tc.ok {
			t.Errorf("%s: taken %v, want %v", tc.name, got, tc.ok)
		}
	}
}
