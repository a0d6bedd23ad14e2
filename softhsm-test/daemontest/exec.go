package daemontest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// built is keywardd, built once for every test of the test binary.
var built struct {
	once sync.Once
	dir  string
	out  []byte
	err  error
}

// Build builds the keywardd command, once per test binary, and returns the
// binary's path. RemoveBuilt removes it.
func Build(t testing.TB) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "keywardd-test-"); built.err == nil {
			built.out, built.err = exec.Command("go", "build", "-o", filepath.Join(built.dir, "keywardd"), "github.com/keyward/keyward/cmd/keywardd").CombinedOutput()
		}
	})
	if built.err != nil {
		t.Fatalf("go build: %v\n%s", built.err, built.out)
	}
	return filepath.Join(built.dir, "keywardd")
}

// RemoveBuilt removes what Build built: TestMain calls it after m.Run.
func RemoveBuilt() {
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
}

// Process is keywardd running as a process of its own.
type Process struct {
	Cmd   *exec.Cmd
	Files *Files
	log   string
	done  chan struct{}
	err   error // cmd.Wait's, once done is closed
}

// An ExecOption changes how Exec runs keywardd.
type ExecOption func(*exec.Cmd)

// Args replaces the arguments keywardd is given (-config Files.ConfigFile).
func Args(args ...string) ExecOption {
	return func(c *exec.Cmd) { c.Args = append(c.Args[:1], args...) }
}

// Env adds variables (KEY=VALUE) to keywardd's environment, which is the
// test's otherwise.
func Env(kv ...string) ExecOption { return func(c *exec.Cmd) { c.Env = append(c.Env, kv...) } }

// Exec runs bin (the keywardd binary of Build, or a command that runs
// keywardd) on f, with -config f.ConfigFile and SOFTHSM2_CONF set to f's
// token, and waits until its socket answers a Ping (any answer of
// keywardd's, so a policy that denies the Ping will do). Its standard
// output and error are appended to f.Dir/keywardd.log (Log). It is killed,
// if still running, when the test ends; it dies with the test process.
// If it exits or does not answer within a minute, the test fails.
func Exec(t testing.TB, bin string, f *Files, opts ...ExecOption) *Process {
	t.Helper()
	p, err := TryExec(t, bin, f, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TryExec is Exec returning keywardd's exit (or its silence) as an error
// (an ExitError's code says which, after the log) instead of failing the
// test: for a test that plays the supervisor, starting keywardd again
// after a temporary failure as systemd does. It never fails t, so it may
// run on a goroutine of the test's.
func TryExec(t testing.TB, bin string, f *Files, opts ...ExecOption) (*Process, error) {
	t.Helper()
	p := &Process{Files: f, log: filepath.Join(f.Dir, "keywardd.log"), done: make(chan struct{})}
	log, err := os.OpenFile(p.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd := exec.Command(bin, "-config", f.ConfigFile)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+f.Token.Conf)
	for _, o := range opts {
		o(cmd)
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p.Cmd = cmd
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.Kill() })
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		select {
		case <-p.done:
			return nil, &ExitError{Err: p.err, Log: p.Log()}
		case <-time.After(5 * time.Millisecond):
		}
		if _, err := os.Stat(f.Socket); err != nil {
			continue
		}
		// A new connection each time: one that failed waits out gRPC's
		// reconnect backoff (a second) before it tries again.
		c, err := client.Dial(f.Socket)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = c.Status.Ping(ctx, &keywardv1.PingRequest{})
		cancel()
		c.Close()
		// An answer, even a refusal (a policy that denies Ping), says it
		// serves; a Ping that timed out sat in the socket's backlog while
		// keywardd was still starting (the socket is bound first).
		if c := status.Code(err); c != codes.Unavailable && c != codes.DeadlineExceeded {
			return p, nil
		}
	}
	return nil, fmt.Errorf("keywardd did not answer within a minute:\n%s", p.Log())
}

// ExitError is TryExec's error when keywardd exited before it served.
type ExitError struct {
	Err error // the process's exit (an *exec.ExitError)
	Log string
}

func (e *ExitError) Error() string { return fmt.Sprintf("keywardd exited (%v):\n%s", e.Err, e.Log) }

// Code is the exit code (-1 if it did not exit by itself).
func (e *ExitError) Code() int {
	var x *exec.ExitError
	if errors.As(e.Err, &x) {
		return x.ExitCode()
	}
	return -1
}

// Pid is the process's id.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Log returns what keywardd has written to its standard output and error
// (with those of earlier processes on the same files).
func (p *Process) Log() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits for the process to end and returns how it ended (exec.Cmd.Wait).
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Kill ends the process with SIGKILL and waits for it.
func (p *Process) Kill() {
	p.Cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop ends keywardd with SIGTERM, as systemd does, and waits for it: an
// error if it does not exit with code 0 within 30 seconds (then it is
// killed).
func (p *Process) Stop() error {
	if p.Exited() {
		return fmt.Errorf("daemontest: keywardd had already exited: %v", p.err)
	}
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("daemontest: keywardd after SIGTERM: %w", p.err)
		}
		return nil
	case <-time.After(30 * time.Second):
		p.Kill()
		return errors.New("daemontest: keywardd did not stop within 30 s of SIGTERM")
	}
}
