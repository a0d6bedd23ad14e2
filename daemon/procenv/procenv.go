// Package procenv removes a variable from the process's environment as the
// kernel shows it: /proc/PID/environ.
//
// os.Unsetenv removes a variable from Go's copy of the environment and from
// libc's, but /proc/PID/environ is neither: the kernel shows the block of
// memory that execve(2) filled, from env_start to env_end (fields 50 and 51
// of /proc/PID/stat), and nothing in Go or libc ever writes there. So a
// secret handed over in a variable stays readable in /proc/PID/environ for
// the life of the process, to whoever may read that file (root, or anyone
// allowed to ptrace the process). Scrub overwrites the variable's entries in
// that block with NUL bytes and reads /proc/self/environ back to check that
// they are gone.
//
// Written here because no library does this for Go (setproctitle does the
// same to argv in C). The block is written through /proc/self/mem at the
// addresses the kernel gives, not through unsafe pointers: a process may
// always write its own memory there (even a non-dumpable one), and a wrong
// address is an error rather than a crash. Nothing Go reads points into the
// block: the runtime copies the environment into its own strings at start.
// libc's environ array does, and os.Unsetenv (which Scrub calls first) takes
// the variable out of it.
//
// What stays visible: the entry's length, as a run of NUL bytes in
// /proc/PID/environ; the variable wherever else it was set (the parent's
// environment, a unit file, a shell history); and, in the process's memory,
// the Go runtime's own copy of the initial environment (runtime.envs, made
// at start), which os.Unsetenv does not touch and which nothing may clear:
// it is the string os.Getenv returned, and Go strings are immutable. That
// copy is readable only by whoever may read the process's memory
// (/proc/PID/mem, ptrace: for a non-dumpable process, CAP_SYS_PTRACE).
package procenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Scrub removes every NAME=... entry from the environment: from Go's and
// libc's copies with os.Unsetenv, and from the kernel's view by overwriting
// them in place. It returns an error if /proc/self/environ still shows one
// afterwards. A variable that is not there is not an error.
func Scrub(name string) error {
	if name == "" || strings.ContainsAny(name, "=\x00") {
		return fmt.Errorf("procenv: %q is not a variable name", name)
	}
	if err := os.Unsetenv(name); err != nil {
		return fmt.Errorf("procenv: unsetting %s: %w", name, err)
	}
	prefix := []byte(name + "=")
	start, end, err := bounds()
	if err != nil {
		return err
	}
	mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("procenv: %w", err)
	}
	defer mem.Close()
	block := make([]byte, end-start)
	defer clear(block)
	if _, err := mem.ReadAt(block, int64(start)); err != nil {
		return fmt.Errorf("procenv: reading the environment block: %w", err)
	}
	for off := 0; off < len(block); {
		n := bytes.IndexByte(block[off:], 0)
		if n < 0 {
			n = len(block) - off
		}
		if bytes.HasPrefix(block[off:off+n], prefix) {
			if _, err := mem.WriteAt(make([]byte, n), int64(start)+int64(off)); err != nil {
				return fmt.Errorf("procenv: overwriting %s in the environment block: %w", name, err)
			}
		}
		off += n + 1
	}
	return check(prefix)
}

// bounds reads env_start and env_end from /proc/self/stat.
func bounds() (start, end uint64, err error) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("procenv: %w", err)
	}
	// Field 2, the command name, is in parentheses and may hold spaces and
	// parentheses itself; the fields after the last ')' start at field 3.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("procenv: /proc/self/stat does not parse")
	}
	f := strings.Fields(string(b[i+1:]))
	const envStart, envEnd = 50 - 3, 51 - 3
	if len(f) <= envEnd {
		return 0, 0, fmt.Errorf("procenv: /proc/self/stat has %d fields, not the 51 of Linux 3.5 and later", len(f)+2)
	}
	start, err1 := strconv.ParseUint(f[envStart], 10, 64)
	end, err2 := strconv.ParseUint(f[envEnd], 10, 64)
	if err1 != nil || err2 != nil || end < start || end-start > 1<<30 {
		return 0, 0, fmt.Errorf("procenv: /proc/self/stat gives no usable environment block (%s to %s)", f[envStart], f[envEnd])
	}
	return start, end, nil
}

// check reads /proc/self/environ, as another process would, for an entry
// starting with prefix.
func check(prefix []byte) error {
	env, err := os.ReadFile("/proc/self/environ")
	defer clear(env)
	if err != nil {
		return fmt.Errorf("procenv: checking: %w", err)
	}
	for kv := range bytes.SplitSeq(env, []byte{0}) {
		if bytes.HasPrefix(kv, prefix) {
			return fmt.Errorf("procenv: /proc/self/environ still shows %s after it was overwritten", prefix[:len(prefix)-1])
		}
	}
	return nil
}
