package host

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

var (
	buildOnce sync.Once
	builtPath string
	buildErr  error
)

// testPlugin builds testdata/testplugin once and copies it into a fresh
// directory of the test (mode 0700), returning its path and SHA-256.
func testPlugin(t testing.TB) (string, string) {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "keyward-testplugin-")
		if err != nil {
			buildErr = err
			return
		}
		builtPath = filepath.Join(dir, "testplugin")
		if out, err := exec.Command("go", "build", "-o", builtPath, "./testdata/testplugin").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	b, err := os.ReadFile(builtPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "plugins")
	os.Mkdir(dir, 0o755)
	path := filepath.Join(dir, "testplugin")
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return path, hex.EncodeToString(sum[:])
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// setup is a Config for the test plugin, its record file and its log.
func setup(t *testing.T, mode string) (Config, string, *syncBuffer) {
	path, sum := testPlugin(t)
	rec := filepath.Join(t.TempDir(), "record")
	logs := &syncBuffer{}
	return Config{Name: "test", Path: path, SHA256: sum, CallTimeout: 5 * time.Second,
		Env: map[string]string{"TESTPLUGIN_RECORD": rec, "TESTPLUGIN_MODE": mode},
		Log: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}, rec, logs
}

func start(t *testing.T, cfg Config) *Plugin {
	t.Helper()
	p, err := Start(cfg)
	if err != nil {
		if p != nil {
			p.Close()
		}
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

var cred = &pluginv1.Credential{Name: "db", Config: []byte(`{}`)}

func TestRotateThroughPlugin(t *testing.T) {
	// A canary in keywardd's environment must not reach the plugin.
	t.Setenv("KEYWARD_TEST_CANARY", "hsm-pin-1234")
	cfg, rec, logs := setup(t, "")
	p := start(t, cfg)
	st := p.Status()
	if st.State != Running || st.Version != "0.0.1" || st.PID == 0 || len(st.Capabilities) != 2 || st.Launches != 1 {
		t.Fatalf("status %+v", st)
	}
	secret := []byte("s3cr3t-canary-9f8e7d")
	ctx := context.Background()
	var handle string
	for range 2 { // the same operation twice: one credential
		err := p.Call(ctx, func(ctx context.Context, c *pluginv1.Clients) error {
			r, err := c.Rotator.Create(ctx, &pluginv1.CreateRequest{OperationId: "op-1", Credential: cred, Secret: secret})
			handle = r.GetHandle()
			return err
		})
		if err != nil || handle != "db-1" {
			t.Fatalf("Create = %q, %v", handle, err)
		}
	}
	err := p.Call(ctx, func(ctx context.Context, c *pluginv1.Clients) error {
		if _, err := c.Rotator.Test(ctx, &pluginv1.TestRequest{OperationId: "op-1", Credential: cred, Handle: handle, Secret: secret}); err != nil {
			return err
		}
		if _, err := c.Rotator.Activate(ctx, &pluginv1.ActivateRequest{OperationId: "op-1", Credential: cred, Handle: handle}); err != nil {
			return err
		}
		_, err := c.Revoker.Revoke(ctx, &pluginv1.RevokeRequest{OperationId: "op-2", Event: &pluginv1.Event{Kind: pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED, Id: "ak_1"}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Call(ctx, func(ctx context.Context, c *pluginv1.Clients) error {
		_, err := c.Rotator.Retire(ctx, &pluginv1.RetireRequest{OperationId: "op-3", Credential: cred, Handle: "permanent"})
		return err
	})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "no such handle") {
		t.Errorf("a permanent failure: %v, want FAILED_PRECONDITION", err)
	}
	b, _ := os.ReadFile(rec)
	got := string(b)
	for _, want := range []string{"create op-1 db-1 20\n", "test op-1 db-1\n", "activate op-1 db-1\n", "revoke op-2 EVENT_KIND_API_KEY_REVOKED ak_1 \n"} {
		if !strings.Contains(got, want) {
			t.Errorf("the plugin did not record %q:\n%s", want, got)
		}
	}
	if strings.Count(got, "create ") != 1 {
		t.Errorf("a repeated operation created twice:\n%s", got)
	}
	envLine := got[strings.Index(got, "env "):]
	envLine = envLine[:strings.IndexByte(envLine, '\n')]
	if strings.Contains(envLine, "KEYWARD_TEST_CANARY") || strings.Contains(envLine, "PATH") || !strings.Contains(envLine, "TESTPLUGIN_RECORD") {
		t.Errorf("the plugin's environment: %s", envLine)
	}
	// Its log lines are in ours, tagged, and the secret in none of them.
	waitFor(t, func() bool { return strings.Contains(logs.String(), `"creating"`) })
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, `"creating"`) && !strings.Contains(line, `"plugin":"test"`) {
			t.Errorf("a plugin line without its tag: %s", line)
		}
	}
	if strings.Contains(logs.String(), string(secret)) {
		t.Errorf("the secret is in the log:\n%s", logs.String())
	}
}

func TestSecretNotInError(t *testing.T) {
	cfg, _, _ := setup(t, "leak")
	p := start(t, cfg)
	secret := []byte("s3cr3t-canary-leak")
	err := p.Call(context.Background(), func(ctx context.Context, c *pluginv1.Clients) error {
		_, err := c.Rotator.Create(ctx, &pluginv1.CreateRequest{OperationId: "op-1", Credential: cred, Secret: secret})
		return err
	})
	if err == nil || strings.Contains(err.Error(), string(secret)) || !strings.Contains(err.Error(), "[redacted]") {
		t.Fatalf("an error quoting the secret: %v", err)
	}
}

func TestRefused(t *testing.T) {
	for name, mod := range map[string]func(t *testing.T, c *Config){
		"checksum mismatch": func(t *testing.T, c *Config) { c.SHA256 = strings.Repeat("0", 64) },
		"file writable by others": func(t *testing.T, c *Config) {
			os.Chmod(c.Path, 0o777)
		},
		"directory writable by others": func(t *testing.T, c *Config) {
			os.Chmod(filepath.Dir(c.Path), 0o777)
		},
		"symlink": func(t *testing.T, c *Config) {
			link := filepath.Join(filepath.Dir(c.Path), "link")
			os.Symlink(c.Path, link)
			c.Path = link
		},
		"replaced after pinning": func(t *testing.T, c *Config) {
			b, _ := os.ReadFile(c.Path)
			os.WriteFile(c.Path, append(b, 0), 0o755)
		},
		"another name": func(t *testing.T, c *Config) { c.Env["TESTPLUGIN_NAME"] = "impostor" },
	} {
		t.Run(name, func(t *testing.T) {
			cfg, rec, _ := setup(t, "")
			mod(t, &cfg)
			p, err := Start(cfg)
			if p != nil {
				defer p.Close()
			}
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("Start: %v, want ErrRefused", err)
			}
			t.Log(err)
			if b, _ := os.ReadFile(rec); name != "another name" && len(b) > 0 {
				t.Errorf("a refused plugin ran: %s", b)
			}
			if st := p.Status(); st.State == Running || st.LastError == "" {
				t.Errorf("status of a refused plugin: %+v", st)
			}
			if err := p.Call(context.Background(), func(context.Context, *pluginv1.Clients) error { return nil }); !errors.Is(err, ErrUnavailable) {
				t.Errorf("a call to a refused plugin: %v", err)
			}
		})
	}
	if _, err := Start(Config{Name: "x", Path: "plugins/x", SHA256: strings.Repeat("0", 64)}); err == nil || !strings.Contains(err.Error(), "absolute") {
		t.Errorf("a relative path: %v", err)
	}
	if _, err := Start(Config{Name: "x", Path: "/x", SHA256: "abc"}); err == nil || !strings.Contains(err.Error(), "64 hex") {
		t.Errorf("a short checksum: %v", err)
	}
}

func TestStdoutBeforeHandshake(t *testing.T) {
	cfg, _, logs := setup(t, "stdout")
	p, err := Start(cfg)
	if p != nil {
		defer p.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "wrote to standard output before the handshake") {
		t.Fatalf("Start: %v", err)
	}
	if strings.Contains(err.Error(), "hunter2") || strings.Contains(logs.String(), "hunter2") {
		t.Errorf("what the plugin printed was repeated: %v", err)
	}
}

func TestDeadline(t *testing.T) {
	cfg, _, _ := setup(t, "hang")
	cfg.CallTimeout = 300 * time.Millisecond
	p := start(t, cfg)
	start := time.Now()
	err := p.Call(context.Background(), func(ctx context.Context, c *pluginv1.Clients) error {
		_, err := c.Rotator.Test(ctx, &pluginv1.TestRequest{OperationId: "op", Credential: cred, Handle: "h"})
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "no answer within 300ms") {
		t.Fatalf("a hanging call: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the deadline took %v", d)
	}
}

func TestRestartAfterCrash(t *testing.T) {
	cfg, _, logs := setup(t, "crash")
	p := start(t, cfg)
	pid := p.Status().PID
	err := p.Call(context.Background(), func(ctx context.Context, c *pluginv1.Clients) error {
		_, err := c.Rotator.Create(ctx, &pluginv1.CreateRequest{OperationId: "op", Credential: cred, Secret: []byte("x")})
		return err
	})
	if err == nil {
		t.Fatal("a call that crashed the plugin succeeded")
	}
	waitFor(t, func() bool { st := p.Status(); return st.State == Running && st.Launches == 2 })
	if st := p.Status(); st.PID == pid || !strings.Contains(st.LastError, "exited") {
		t.Errorf("after a restart: %+v", st)
	}
	if !strings.Contains(logs.String(), "starting it again") {
		t.Errorf("the restart is not logged")
	}
}

// TestNoOrphans: a host killed with SIGKILL leaves no plugin behind. The
// host is this test binary run again (see TestMain).
func TestNoOrphans(t *testing.T) {
	cfg, rec, _ := setup(t, "")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "KEYWARD_HOST_HELPER=1", "HELPER_PATH="+cfg.Path, "HELPER_SHA256="+cfg.SHA256, "HELPER_RECORD="+rec)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	pid, perr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || perr != nil || pid == 0 {
		t.Fatalf("the helper said %q (%v)", line, err)
	}
	if syscall.Kill(pid, 0) != nil {
		t.Fatalf("plugin %d is not running", pid)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	waitFor(t, func() bool { return syscall.Kill(pid, 0) != nil })
}

func TestMain(m *testing.M) {
	if os.Getenv("KEYWARD_HOST_HELPER") == "1" {
		p, err := Start(Config{Name: "test", Path: os.Getenv("HELPER_PATH"), SHA256: os.Getenv("HELPER_SHA256"),
			Env: map[string]string{"TESTPLUGIN_RECORD": os.Getenv("HELPER_RECORD")}})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(p.Status().PID)
		select {}
	}
	os.Exit(m.Run())
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	for range 200 {
		if ok() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("timed out waiting")
}

// TestStderrLines: a plugin's plain lines on standard error (an
// interpreter's traceback) reach keywardd's log, and those of a plugin that
// dies before its handshake are in its error, which its status shows.
func TestStderrLines(t *testing.T) {
	cfg, _, logs := setup(t, "traceback")
	p, err := Start(cfg)
	if p != nil {
		defer p.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "ModuleNotFoundError: No module named 'grpc'") || !strings.Contains(err.Error(), "Traceback (most recent call last)") {
		t.Fatalf("Start of a plugin that dies with a traceback: %v", err)
	}
	if !strings.Contains(logs.String(), "plugin wrote to standard error") || !strings.Contains(logs.String(), "No module named") {
		t.Errorf("the traceback is not in keywardd's log:\n%s", logs)
	}

	cfg, _, logs = setup(t, "chatty") // the same lines, then it serves
	p2 := start(t, cfg)
	defer p2.Close()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(logs.String(), "No module named"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a running plugin's plain stderr line is not in keywardd's log:\n%s", logs)
		}
	}
	if strings.Contains(logs.String(), `"level":"DEBUG"`) {
		t.Errorf("go-plugin's debug lines reach keywardd's log:\n%s", logs)
	}
}

// TestScriptPlugin: a plugin that is a script runs under its interpreter,
// both pinned: the interpreter gets its own path as argv[0] and the
// script as /dev/fd/3, a sealed copy; a script or an interpreter not as
// pinned is refused.
func TestScriptPlugin(t *testing.T) {
	interp, interpSum := testPlugin(t)
	dir := t.TempDir()
	script := filepath.Join(dir, "plugin.script")
	body := []byte("#!keyward-test-script\nname=scripted\n")
	if err := os.WriteFile(script, body, 0o644); err != nil { // not executable: the interpreter reads it
		t.Fatal(err)
	}
	sum := sha256.Sum256(body)
	rec := filepath.Join(dir, "record")
	cfg := Config{Name: "scripted", Path: script, SHA256: hex.EncodeToString(sum[:]), Interpreter: interp, InterpreterSHA256: interpSum,
		CallTimeout: 5 * time.Second, Env: map[string]string{"TESTPLUGIN_RECORD": rec}}
	p := start(t, cfg)
	if st := p.Status(); st.State != Running || st.Version != "0.0.1" {
		t.Fatalf("the script plugin: %+v", st)
	}
	p.Close()
	if b, _ := os.ReadFile(rec); !strings.Contains(string(b), "script /dev/fd/3 as "+interp) {
		t.Errorf("the interpreter was not given the script as /dev/fd/3 and its own path: %s", b)
	}

	if err := os.WriteFile(script, append(body, "# changed\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := Start(cfg); err == nil || !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "not the pinned") {
		t.Errorf("a script changed after it was pinned: %v", err)
		if p != nil {
			p.Close()
		}
	} else if p != nil {
		p.Close()
	}
	os.WriteFile(script, body, 0o644)
	cfg.InterpreterSHA256 = strings.Repeat("0", 64)
	if p, err := Start(cfg); err == nil || !errors.Is(err, ErrRefused) {
		t.Errorf("an interpreter not as pinned: %v", err)
		if p != nil {
			p.Close()
		}
	} else if p != nil {
		p.Close()
	}
}

// TestLogBridge: a line the plugin wrote without a level is logged with
// its secret-named attributes redacted; a plain line has what looks like
// a secret scrubbed, is cut to a length, and the lines are paced;
// go-plugin's own modules are not taken for the plugin's.
func TestLogBridge(t *testing.T) {
	var out syncBuffer
	tail := &stderrTail{}
	l := newLogBridge(slog.New(slog.NewJSONHandler(&out, nil)), tail, "plugin.7").Named("7")
	l.Debug(`{"password":"hunter2","user":"u"}`)
	l.Debug(`connect failed: invalid dsn "postgres://app:S3cret@db/x" token=abc123`)
	l.Named("x").Debug("received EOF, stopping recv loop") // not the plugin's module
	l.Debug(strings.Repeat("x", 5000))
	for range 30 {
		l.Debug("chatter")
	}
	s := out.String()
	if strings.Contains(s, "hunter2") || strings.Contains(s, "S3cret") || strings.Contains(s, "abc123") {
		t.Errorf("a secret reached the log:\n%s", s)
	}
	if !strings.Contains(s, `"user":"u"`) || !strings.Contains(s, "postgres://app:[redacted]@db/x") {
		t.Errorf("the lines lost what is not secret:\n%s", s)
	}
	if strings.Contains(s, "received EOF") {
		t.Errorf("go-plugin's own line was taken for the plugin's")
	}
	if strings.Contains(s, strings.Repeat("x", 1100)) {
		t.Errorf("a long line was not cut")
	}
	if n := strings.Count(s, `"chatter"`); n >= 30 {
		t.Errorf("%d of 30 lines in a second logged; want the pace to hold", n)
	}
	if strings.Contains(tail.String(), "S3cret") {
		t.Errorf("a secret in the tail kept for the status: %s", tail)
	}
}
