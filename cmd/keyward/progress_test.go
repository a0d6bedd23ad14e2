package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestProgressPlain: off a terminal, progress is a plain line at most once
// a second, never a carriage return.
func TestProgressPlain(t *testing.T) {
	var buf bytes.Buffer
	e := &env{stderr: &buf}
	p := e.progress("rewrap dir:/x", 200)
	p.set(10, "") // within the first second: nothing
	p.last = time.Now().Add(-2 * time.Second)
	p.set(50, "3 moved")
	p.set(60, "") // within a second of the last line
	p.finish()
	if got := buf.String(); got != "rewrap dir:/x: 50 of 200 (25%), 3 moved\n" {
		t.Errorf("plain progress %q", got)
	}
	buf.Reset()
	p = e.progress("revoking", -1)
	p.spin()()
	p.last = time.Now().Add(-2 * time.Second)
	p.set(7, "")
	if got := buf.String(); got != "revoking: 7\n" {
		t.Errorf("plain progress of unknown length %q", got)
	}
}

// TestProgressTerminal: on a terminal (a pseudo-terminal here), progress
// is a bar, drawn over itself, and taken off at the end.
func TestProgressTerminal(t *testing.T) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	tty, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	e := &env{stderr: tty}
	p := e.progress("rewrap dir:/x", 200)
	if p.bar == nil {
		t.Fatal("no bar on a terminal")
	}
	p.set(100, "3 moved")
	time.Sleep(150 * time.Millisecond) // past the bar's throttle
	p.set(150, "4 moved")
	p.finish()
	tty.Close()
	// Everything written, read until the terminal's other end has no more
	// (one read may return only the first redraw).
	var buf []byte
	master.SetReadDeadline(time.Now().Add(5 * time.Second))
	for chunk := make([]byte, 1<<16); !strings.Contains(string(buf), "4 moved"); {
		m, err := master.Read(chunk)
		buf = append(buf, chunk[:m]...)
		if err != nil {
			break
		}
	}
	got := string(buf)
	if !strings.Contains(got, "\r") || !strings.Contains(got, "rewrap dir:/x 4 moved") || !strings.Contains(got, "%") {
		t.Errorf("terminal output %q", got)
	}
}
