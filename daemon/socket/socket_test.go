package socket

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

func TestListenCreatesSafely(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	path := filepath.Join(dir, "keyward.sock")
	l, err := Listen(Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	di, _ := os.Stat(dir)
	if di.Mode().Perm() != 0o750 {
		t.Fatalf("directory mode %04o, want 0750", di.Mode().Perm())
	}
	fi, _ := os.Lstat(path)
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want a socket with 0660", fi.Mode())
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".bind-") {
			t.Fatalf("bind directory %s left behind", e.Name())
		}
	}
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil || string(buf) != "hi" {
		t.Fatalf("read %q, %v", buf, err)
	}
	c.Close()

	// A second daemon on the same path is refused while the first runs.
	if _, err := Listen(Options{Path: path}); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "another keywardd is serving "+path) {
		t.Fatalf("second Listen: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket still there after Close: %v", err)
	}
	// ...and after it stopped, the path is free again.
	l2, err := Listen(Options{Path: path, Mode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if fi, _ := os.Lstat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %04o, want 0600", fi.Mode().Perm())
	}
}

func TestListenRefuses(t *testing.T) {
	base := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		d := filepath.Join(base, name)
		os.Mkdir(d, mode)
		os.Chmod(d, mode)
		return d
	}
	open := mk("open", 0o755)
	groupWritable := mk("gw", 0o770)
	good := mk("good", 0o700)
	os.Symlink(good, filepath.Join(base, "link"))
	os.WriteFile(filepath.Join(good, "file.sock"), []byte("x"), 0o600)
	os.Symlink("/etc/passwd", filepath.Join(good, "symlink.sock"))
	other, _ := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(good, "live.sock"), Net: "unix"})
	defer other.Close()

	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"relative", Options{Path: "run/k.sock"}, "must be absolute"},
		{"world mode", Options{Path: filepath.Join(good, "a.sock"), Mode: 0o666}, "never world-accessible"},
		{"dir open to others", Options{Path: filepath.Join(open, "a.sock")}, "chmod 0750"},
		{"dir group-writable", Options{Path: filepath.Join(groupWritable, "a.sock")}, "chmod 0750"},
		{"dir is a symlink", Options{Path: filepath.Join(base, "link", "a.sock")}, "is a symlink"},
		{"path is a file", Options{Path: filepath.Join(good, "file.sock")}, "is not a socket"},
		{"path is a symlink", Options{Path: filepath.Join(good, "symlink.sock")}, "does not follow it"},
		{"someone listens", Options{Path: filepath.Join(good, "live.sock")}, "listening on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Listen(tc.o)
			if err == nil {
				l.Close()
				t.Fatal("Listen succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %q, want it to say %q", err, tc.want)
			}
		})
	}
	if b, _ := os.ReadFile("/etc/passwd"); len(b) == 0 {
		t.Fatal("/etc/passwd was touched")
	}
	if b, _ := os.ReadFile(filepath.Join(good, "file.sock")); string(b) != "x" {
		t.Fatal("the file at the socket path was replaced")
	}
}

// privateDir is a directory keywardd accepts for its socket.
func privateDir(t *testing.T) string {
	d := t.TempDir()
	os.Chmod(d, 0o750)
	return d
}

func TestStaleSocketReplaced(t *testing.T) {
	dir := privateDir(t)
	path := filepath.Join(dir, "k.sock")
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	old.Close() // as after kill -9: the file stays, nobody listens
	l, err := Listen(Options{Path: path})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	defer l.Close()
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatal(err)
	} else {
		c.Close()
	}
}

// TestCloseLeavesOthers: if something else took the path meanwhile, Close
// does not remove it.
func TestCloseLeavesOthers(t *testing.T) {
	path := filepath.Join(privateDir(t), "k.sock")
	l, err := Listen(Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	os.WriteFile(path, []byte("someone else's"), 0o600)
	l.Close()
	if b, _ := os.ReadFile(path); string(b) != "someone else's" {
		t.Fatal("Close removed a file that was not its socket")
	}
}

func TestSocketGroup(t *testing.T) {
	softhsmtest.RequireRoot(t, "gives the socket another group")
	path := filepath.Join(privateDir(t), "run", "k.sock")
	l, err := Listen(Options{Path: path, GID: 65534})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, p := range []string{path, filepath.Dir(path)} {
		fi, _ := os.Lstat(p)
		if gid := fi.Sys().(*syscall.Stat_t).Gid; gid != 65534 {
			t.Fatalf("%s group %d, want 65534 (the socket's group must reach it)", p, gid)
		}
	}
}
