// Package pgtest starts a throw-away PostgreSQL server for tests: a fresh
// cluster in a temporary directory, listening on a free loopback port, with
// an administrator role that logs in with a password (SCRAM-SHA-256), and
// stopped and removed when the test ends. It needs Debian's postgresql
// package (apt-get install postgresql); without it the test fails saying
// so, it does not skip. Run as root, the server runs as the postgres user
// (PostgreSQL refuses to run as root).
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Server is a running PostgreSQL.
type Server struct {
	Host          string
	Port          int
	AdminUser     string
	AdminPassword string
	Dir           string
	cmd           *exec.Cmd
}

// DSN is a connection string for user and password to database.
func (s *Server) DSN(user, password, database string) string {
	return fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=disable connect_timeout=5", s.Host, s.Port, user, password, database)
}

// Login logs in to database postgres as user with password, and out again.
func (s *Server) Login(user string, password []byte) error {
	c, err := pgx.Connect(context.Background(), s.DSN(user, string(password), "postgres"))
	if err != nil {
		return err
	}
	return c.Close(context.Background())
}

// Connect connects as the administrator.
func (s *Server) Connect(t testing.TB) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), s.DSN(s.AdminUser, s.AdminPassword, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// binDir finds the newest PostgreSQL installed the Debian way.
func binDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return va - vb
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", fmt.Errorf("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
}

// Start starts a server for the test.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := binDir()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "keyward-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var cred *syscall.Credential
	if os.Getuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root, PostgreSQL needs the postgres user (apt-get install postgresql makes it): %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	b := make([]byte, 16)
	rand.Read(b)
	s := &Server{Host: "127.0.0.1", AdminUser: "keyward_admin", AdminPassword: hex.EncodeToString(b), Dir: dir}
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte(s.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		os.Chown(pw, int(cred.Uid), int(cred.Gid))
	}
	run := func(name string, args ...string) *exec.Cmd {
		c := exec.Command(filepath.Join(bin, name), args...)
		c.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
		c.Env = []string{"LANG=C", "LC_ALL=C"}
		return c
	}
	data := filepath.Join(dir, "data")
	if out, err := run("initdb", "-D", data, "-U", s.AdminUser, "--pwfile="+pw, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	log, _ := os.Create(filepath.Join(dir, "log"))
	s.cmd = run("postgres", "-D", data, "-c", "listen_addresses=127.0.0.1", "-c", "port="+strconv.Itoa(s.Port),
		"-c", "unix_socket_directories="+dir, "-c", "fsync=off", "-c", "password_encryption=scram-sha-256")
	s.cmd.Stdout, s.cmd.Stderr = log, log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGINT) // fast shutdown
		done := make(chan struct{})
		go func() { s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
		}
	})
	for i := 0; ; i++ {
		c, err := pgx.Connect(context.Background(), s.DSN(s.AdminUser, s.AdminPassword, "postgres"))
		if err == nil {
			c.Close(context.Background())
			return s
		}
		if i == 200 {
			l, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("PostgreSQL did not come up: %v\n%s", err, strings.TrimSpace(string(l)))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
