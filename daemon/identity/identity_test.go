package identity

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain doubles as the client the tests run as other processes: with
// KEYWARD_IDENTITY_DIAL set it connects there, says "ready", and exits when
// its stdin closes.
func TestMain(m *testing.M) {
	if sock := os.Getenv("KEYWARD_IDENTITY_SERVE"); sock != "" {
		// A server in a PID namespace of its own: its clients' PIDs are
		// not visible to it.
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			os.Stdout.WriteString("listen: " + err.Error() + "\n")
			os.Exit(3)
		}
		os.Stdout.WriteString("ready\n")
		conn, err := l.AcceptUnix()
		if err != nil {
			os.Exit(3)
		}
		c, err := NewResolver().Identify(conn, time.Now())
		if err != nil {
			os.Stdout.WriteString("identify: " + err.Error() + "\n")
			os.Exit(3)
		}
		fmt.Printf("pid=%d uid=%d exe=%q alive=%v string=%s\n", c.PID, c.UID, c.Exe, c.Alive(), c)
		os.Exit(0)
	}
	if sock := os.Getenv("KEYWARD_IDENTITY_DIAL"); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			os.Stderr.WriteString(err.Error())
			os.Exit(3)
		}
		os.Stdout.WriteString("ready\n")
		io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// listen makes a socket anyone may connect to, in a directory anyone may
// enter.
func listen(t *testing.T) (*net.UnixListener, string) {
	t.Helper()
	dir := t.TempDir()
	openUp(t, dir)
	path := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o777)
	t.Cleanup(func() { l.Close() })
	return l, path
}

// openUp makes dir and its parents up to the temp root traversable by all.
func openUp(t *testing.T, dir string) {
	for d := dir; strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func accept(t *testing.T, l *net.UnixListener) (*net.UnixConn, time.Time) {
	t.Helper()
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, time.Now()
}

func fileSHA256(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// selfConn is the server side of a connection from this process.
func selfConn(t *testing.T) (*net.UnixConn, time.Time) {
	t.Helper()
	l, path := listen(t)
	client, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return accept(t, l)
}

func TestIdentifySelf(t *testing.T) {
	conn, at := selfConn(t)
	r := NewResolver()
	c, err := r.Identify(conn, at)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	exe, _ := os.Executable()
	exe, _ = filepath.EvalSymlinks(exe)
	if c.UID != uint32(os.Getuid()) || c.GID != uint32(os.Getgid()) || c.PID != os.Getpid() || c.Exe != exe {
		t.Fatalf("caller %+v; want uid %d gid %d pid %d exe %s", c, os.Getuid(), os.Getgid(), os.Getpid(), exe)
	}
	if c.ExeSHA256 != fileSHA256(t, exe) {
		t.Fatal("ExeSHA256 is not the SHA-256 of the binary")
	}
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if want, err := ParseCgroup(own); err != nil || c.Cgroup != want || c.Cgroup.Path == "" {
		t.Fatalf("Cgroup %+v; want %+v (%v) from /proc/self/cgroup:\n%s", c.Cgroup, want, err, own)
	}
	if err := c.Alive(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Close()
		if err := c.Alive(); !errors.Is(err, ErrGone) {
			t.Errorf("Alive after Close: %v, want ErrGone", err)
		}
	}()
	if s := c.String(); !strings.Contains(s, "pid=") || !strings.Contains(s, exe) {
		t.Fatalf("String() = %q", s)
	}
	// A second caller running the same binary is served from the cache.
	c2, err := r.Identify(conn, at)
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if len(r.hashes) != 1 || c2.ExeSHA256 != c.ExeSHA256 {
		t.Fatalf("%d hashes cached after two lookups of one binary", len(r.hashes))
	}
}

// TestHashingHook: Hashing is asked, with the caller's uid and its
// binary's size, before a binary not in the cache is hashed, and only
// then; its error stops the identification.
func TestHashingHook(t *testing.T) {
	conn, at := selfConn(t)
	exe, _ := os.Executable()
	st, err := os.Stat(exe)
	if err != nil {
		t.Fatal(err)
	}
	r := NewResolver()
	var asked []int64
	r.Hashing = func(uid uint32, size int64) error {
		if uid != uint32(os.Getuid()) {
			t.Errorf("Hashing asked for uid %d", uid)
		}
		asked = append(asked, size)
		return nil
	}
	for range 2 {
		c, err := r.Identify(conn, at)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if len(asked) != 1 || asked[0] != st.Size() {
		t.Fatalf("Hashing asked %v; want once, with the binary's size %d", asked, st.Size())
	}
	over := errors.New("over budget")
	r2 := NewResolver()
	r2.Hashing = func(uint32, int64) error { return over }
	if c, err := r2.Identify(conn, at); !errors.Is(err, over) {
		t.Fatalf("Identify over the hashing budget: %v, %v", c, err)
	}
}

// TestIdentifyOtherUserAndExit runs a client as another user (nobody) from
// a copy of this test binary, then lets it exit: the caller is identified by
// the kernel, and once gone, Alive says so.
func TestIdentifyOtherUserAndExit(t *testing.T) {
	softhsmtest.RequireRoot(t, "runs a client as another user")
	l, path := listen(t)
	bin := filepath.Join(filepath.Dir(path), "client")
	self, _ := os.Executable()
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"KEYWARD_IDENTITY_DIAL=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{4242, 4343}}}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		t.Fatalf("client: %q, %v; stderr: %s", line, err, stderr.String())
	}
	conn, at := accept(t, l)
	if uid, err := PeerUID(conn); err != nil || uid != 65534 {
		t.Fatalf("PeerUID = %d, %v; want 65534", uid, err)
	}
	c, err := NewResolver().Identify(conn, at)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.UID != 65534 || c.GID != 65534 || c.PID != cmd.Process.Pid || c.Exe != bin || c.ExeSHA256 != fileSHA256(t, bin) {
		t.Fatalf("caller %+v; want uid/gid 65534, pid %d, exe %s", c, cmd.Process.Pid, bin)
	}
	if len(c.Groups) != 2 || c.Groups[0] != 4242 || c.Groups[1] != 4343 {
		t.Fatalf("supplementary groups %v, want [4242 4343]", c.Groups)
	}
	stdin.Close()
	cmd.Wait()
	if err := c.Alive(); !errors.Is(err, ErrGone) {
		t.Fatalf("after the client exited: Alive() = %v, want ErrGone", err)
	}
}

// TestPIDReuseByStartTime: without SO_PEERPIDFD (kernels before 6.5) a
// process that started after the connection was accepted is not its peer.
func TestPIDReuseByStartTime(t *testing.T) {
	r := NewResolver()
	c := &Caller{PID: os.Getpid(), pidfd: -1}
	if err := r.inspect(c, time.Now(), true); err != nil {
		t.Fatalf("this process, started before now: %v", err)
	}
	c = &Caller{PID: os.Getpid(), pidfd: -1}
	if err := r.inspect(c, time.Now().Add(-24*time.Hour*365*10), true); !errors.Is(err, ErrGone) || !strings.Contains(err.Error(), "reused") {
		t.Fatalf("a connection older than the process: %v, want ErrGone (PID reused)", err)
	}
}

func TestStartTimeParsesOddNames(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "42"), 0o755)
	stat := "42 (a) b) c (d) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21\n"
	os.WriteFile(filepath.Join(dir, "42", "stat"), []byte(stat), 0o644)
	r := &Resolver{proc: dir, hashes: map[fileKey]string{}}
	got, err := r.startTime(42)
	if err != nil || got != 987654 {
		t.Fatalf("startTime = %d, %v; want 987654", got, err)
	}
}

// TestOtherPIDNamespace: a caller whose PID the daemon cannot see (the
// daemon in a PID namespace of its own) is identified by uid and gid only,
// with PID 0, and that is not an error.
func TestOtherPIDNamespace(t *testing.T) {
	softhsmtest.RequireRoot(t, "makes a PID namespace")
	sock := filepath.Join(t.TempDir(), "s")
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = []string{"KEYWARD_IDENTITY_SERVE=" + sock}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	r := bufio.NewReader(stdout)
	if line, _ := r.ReadString('\n'); line != "ready\n" {
		t.Fatalf("server: %q", line)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line, _ := r.ReadString('\n')
	want := `pid=0 uid=0 exe="" alive=<nil> string=uid=0 gid=0 pid=? (other PID namespace)`
	if strings.TrimSpace(line) != want {
		t.Fatalf("seen from another PID namespace:\n got %s\nwant %s", line, want)
	}
}
