package procenv

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
)

const (
	childVar = "PROCENV_TEST_CHILD" // set: the test binary is the child below
	secret   = "PROCENV_TEST_SECRET"
)

// TestMain doubles as the child process of TestScrub: with
// PROCENV_TEST_CHILD set it says "ready", waits for a line on stdin,
// scrubs PROCENV_TEST_SECRET, says what Scrub and Getenv returned, and
// waits for stdin to close.
func TestMain(m *testing.M) {
	if os.Getenv(childVar) == "" {
		os.Exit(m.Run())
	}
	in := bufio.NewReader(os.Stdin)
	fmt.Println("ready")
	in.ReadString('\n')
	err := Scrub(secret)
	v, ok := os.LookupEnv(secret)
	fmt.Printf("scrubbed err=%v lookup=%q,%v\n", err, v, ok)
	io.Copy(io.Discard, in)
	os.Exit(0)
}

// TestScrub starts a process with a secret in its environment (twice, as
// execve allows), reads its /proc/PID/environ as any process of the same
// user may, has it scrub the secret, and reads it again: the secret is gone,
// the other variables are as they were, and Go no longer sees the variable.
func TestScrub(t *testing.T) {
	// Made here, so that the child's binary does not hold them.
	pin, dup := "procenv-pin-"+rand.Text(), "procenv-pin-second-"+rand.Text()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	stdinR, stdinW, _ := os.Pipe()
	stdoutR, stdoutW, _ := os.Pipe()
	// os.StartProcess, not os/exec, which would drop the duplicate.
	env := []string{childVar + "=1", "BEFORE=one", secret + "=" + pin, "PROCENV_TEST_SECRETLY=kept", secret + "=" + dup, "AFTER=two"}
	p, err := os.StartProcess(exe, []string{exe}, &os.ProcAttr{Env: env, Files: []*os.File{stdinR, stdoutW, os.Stderr}})
	if err != nil {
		t.Fatal(err)
	}
	stdinR.Close()
	stdoutW.Close()
	defer func() { stdinW.Close(); p.Wait() }()
	out := bufio.NewReader(stdoutR)
	line := func() string {
		t.Helper()
		s, err := out.ReadString('\n')
		if err != nil {
			t.Fatalf("the child said %q: %v", s, err)
		}
		return strings.TrimSpace(s)
	}
	environ := func() []byte {
		t.Helper()
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid) + "/environ")
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if s := line(); s != "ready" {
		t.Fatalf("child: %q", s)
	}
	before := environ()
	if !bytes.Contains(before, []byte(secret+"="+pin+"\x00")) || !bytes.Contains(before, []byte(secret+"="+dup+"\x00")) {
		t.Fatalf("the test cannot see the secret in /proc/PID/environ before the scrub: %q", before)
	}
	fmt.Fprintln(stdinW, "go")
	if s := line(); s != `scrubbed err=<nil> lookup="",false` {
		t.Fatalf("child: %q", s)
	}
	after := environ()
	if bytes.Contains(after, []byte(pin)) || bytes.Contains(after, []byte(dup)) || bytes.Contains(after, []byte(secret+"=")) {
		t.Fatalf("/proc/PID/environ after the scrub: %q", after)
	}
	var kept []string
	for kv := range strings.SplitSeq(string(after), "\x00") {
		if kv != "" {
			kept = append(kept, kv)
		}
	}
	if want := []string{childVar + "=1", "BEFORE=one", "PROCENV_TEST_SECRETLY=kept", "AFTER=two"}; strings.Join(kept, " ") != strings.Join(want, " ") {
		t.Fatalf("the other variables after the scrub: %q, want %q", kept, want)
	}
	if len(after) != len(before) {
		t.Fatalf("the block changed length: %d, was %d", len(after), len(before))
	}
	// What stays, as the package doc says: the Go runtime's own copy of
	// the initial environment, one of each value, in the Go heap and not in
	// the block (which the kernel shows); only a process that may read
	// this one's memory (/proc/PID/mem, ptrace) sees it.
	// (The race detector's runtime, in a -race build, reads the
	// environment into a buffer of its own at start: one more.)
	want := 1
	if raceEnabled {
		want++
	}
	for _, v := range []string{pin, dup} {
		if n := copiesInMemory(t, p.Pid, []byte(v)); n != want {
			t.Errorf("%d copies of %q in the process's memory after the scrub, want %d (the Go runtime's)", n, v, want)
		}
	}
}

// copiesInMemory counts the occurrences of secret in the readable memory
// of process pid, read as a debugger would.
func copiesInMemory(t *testing.T, pid int, secret []byte) int {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	n := 0
	for l := range strings.Lines(string(maps)) {
		var lo, hi uint64
		var perm string
		if _, err := fmt.Sscanf(l, "%x-%x %s", &lo, &hi, &perm); err == nil && perm[0] == 'r' && !strings.Contains(l, "[vvar") {
			buf := make([]byte, hi-lo)
			got, _ := mem.ReadAt(buf, int64(lo))
			n += bytes.Count(buf[:got], secret)
		}
	}
	return n
}

func TestScrubRefusesBadNames(t *testing.T) {
	for _, name := range []string{"", "A=B", "A\x00B"} {
		if err := Scrub(name); err == nil || !strings.Contains(err.Error(), "is not a variable name") {
			t.Errorf("Scrub(%q): %v", name, err)
		}
	}
	if err := Scrub("PROCENV_TEST_NOT_SET"); err != nil {
		t.Errorf("a variable that is not set: %v", err)
	}
}
