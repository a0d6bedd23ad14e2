package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/plugins/conformance"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// TestMain makes the test binary keyward itself, and the keywardd the
// scripts talk to, when it is run under those names (testscript puts
// copies in the scripts' $PATH).
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"keyward":       func() { os.Exit(mainCode()) },
		"test-keywardd": func() { os.Exit(testKeywardd()) },
	})
}

// TestScripts runs the transcripts in testdata/script: each is a shell
// session of keyward commands against a keywardd of its own (see
// scriptSetup), with their output and exit codes.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:   filepath.Join("testdata", "script"),
		Setup: scriptSetup,
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"keywardd": cmdKeywardd,
			"exits":    cmdExits,
			"json":     cmdJSON,
			"grab":     cmdGrab,
			"perm":     cmdPerm,
			"holds":    cmdHolds,
		},
	})
}

// scriptDaemon is a script's keywardd: a process of the test binary
// running daemon.Run on a SoftHSM2 token of its own.
type scriptDaemon struct {
	tb      testing.TB
	tok     *softhsmtest.Token
	config  string
	socket  string
	logPath string
	cmd     *exec.Cmd
	done    chan error
}

// scriptSetup gives the script a SoftHSM2 token, a keywardd on it, and
// its environment:
//
//	KEYWARD_SOCKET   the socket keywardd serves
//	KEYWARDD_DATA    its data directory (audit.log is there)
//	HSM_MODULE, HSM_TOKEN, HSM_PIN_FILE, HSM_PIN, SOFTHSM2_CONF   the token
//
// keywardd's policy is the script's policy.yaml, with $UID for the uid
// the script's commands run as; without one, that uid may do everything.
// The script's keywardd.yaml, if any, is added to the configuration; a
// plugin whose path is a command of this module (keyward-plugin-file) is
// built and pinned by its checksum. $WORK in either file is the script's
// directory.
func scriptSetup(env *testscript.Env) error {
	tb, ok := env.T().(testing.TB)
	if !ok {
		return errors.New("scripts run under go test")
	}
	dir := tb.TempDir()
	if err := os.Chmod(dir, 0o750); err != nil {
		return err
	}
	tok, err := softhsmtest.Prepare(filepath.Join(dir, "hsm"), "keyward-test", "", "")
	if err != nil {
		return err
	}
	expand := func(b []byte) string {
		return os.Expand(string(b), func(v string) string {
			switch v {
			case "UID":
				return strconv.Itoa(os.Getuid())
			case "WORK":
				return env.WorkDir
			}
			return "$" + v
		})
	}
	policy := fmt.Sprintf("version: 1\nroles:\n  all:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\nbindings:\n  - role: all\n    callers:\n      - uid: %d\n", os.Getuid())
	if b, err := os.ReadFile(filepath.Join(env.WorkDir, "policy.yaml")); err == nil {
		policy = expand(b)
	}
	policyPath := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policyPath, []byte(policy), 0o600); err != nil {
		return err
	}
	cfg := map[string]any{}
	if b, err := os.ReadFile(filepath.Join(env.WorkDir, "keywardd.yaml")); err == nil {
		if err := yaml.Unmarshal([]byte(expand(b)), &cfg); err != nil {
			return fmt.Errorf("keywardd.yaml: %w", err)
		}
	}
	sock, data := filepath.Join(dir, "run", "k.sock"), filepath.Join(dir, "data")
	cfg["socket"] = map[string]any{"path": sock}
	cfg["data_dir"] = data
	cfg["policy_file"] = policyPath
	cfg["hsm"] = map[string]any{"module": tok.Module, "token": tok.Label, "pin_file": tok.PINFile}
	if plugins, ok := cfg["plugins"].([]any); ok {
		for _, p := range plugins {
			p, _ := p.(map[string]any)
			if path, _ := p["path"].(string); path != "" && !filepath.IsAbs(path) {
				bin := conformance.Build(tb, "github.com/keyward/keyward/cmd/"+path)
				b, err := os.ReadFile(bin)
				if err != nil {
					return err
				}
				sum := sha256.Sum256(b)
				p["path"], p["sha256"] = bin, hex.EncodeToString(sum[:])
			}
		}
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	config := filepath.Join(dir, "keywardd.yaml")
	if err := os.WriteFile(config, b, 0o600); err != nil {
		return err
	}
	gorace := os.Getenv("GORACE")
	if !strings.Contains(gorace, "atexit_sleep_ms") {
		// A program built with -race sleeps a second at exit unless told
		// not to; the scripts run keyward a few hundred times.
		gorace = strings.TrimSpace(gorace + " atexit_sleep_ms=0")
	}
	env.Vars = append(env.Vars,
		"KEYWARD_SOCKET="+sock, "KEYWARDD_DATA="+data, "GORACE="+gorace, "SOFTHSM2_CONF="+tok.Conf,
		"HSM_MODULE="+tok.Module, "HSM_TOKEN="+tok.Label, "HSM_PIN_FILE="+tok.PINFile, "HSM_PIN="+tok.PIN)

	d := &scriptDaemon{tb: tb, tok: tok, config: config, socket: sock, logPath: filepath.Join(dir, "keywardd.log")}
	env.Values[daemonKey{}] = d
	env.Defer(func() {
		if err := d.stop(); err != nil {
			tb.Error(err)
		}
		if tb.Failed() {
			if b, err := os.ReadFile(d.logPath); err == nil {
				tb.Logf("keywardd's log:\n%s", b)
			}
		}
	})
	return d.start(gorace)
}

type daemonKey struct{}

// start runs keywardd and waits until it answers.
func (d *scriptDaemon) start(gorace string) error {
	if d.cmd != nil {
		return errors.New("keywardd is running")
	}
	bin, err := exec.LookPath("test-keywardd")
	if err != nil {
		return err
	}
	log, err := os.OpenFile(d.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(bin, d.tok.Dir, d.tok.Label, d.config)
	// The PINs reach the token's making through the environment, never
	// argv (as softhsm-test/mktoken takes them).
	cmd.Env = append(os.Environ(), "KEYWARD_SO_PIN="+d.tok.SOPIN, "KEYWARD_USER_PIN="+d.tok.PIN, "GORACE="+gorace)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	d.cmd, d.done = cmd, make(chan error, 1)
	go func() { d.done <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-d.done:
			d.cmd = nil
			b, _ := os.ReadFile(d.logPath)
			return fmt.Errorf("keywardd exited (%v):\n%s", err, b)
		case <-time.After(20 * time.Millisecond):
		}
		if _, err := os.Stat(d.socket); err != nil {
			continue
		}
		// A new connection each time: one that failed waits out gRPC's
		// reconnect backoff before it tries again.
		c, err := client.Dial(d.socket)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = c.Status.Ping(ctx, &keywardv1.PingRequest{})
		cancel()
		c.Close()
		// Any answer but UNAVAILABLE is keywardd's (the policy may deny
		// the Ping).
		if status.Code(err) != codes.Unavailable {
			return nil
		}
	}
	return errors.New("keywardd did not answer within a minute")
}

// stop ends keywardd with SIGTERM, as systemd does, and waits for it.
func (d *scriptDaemon) stop() error {
	if d.cmd == nil {
		return nil
	}
	defer func() { d.cmd = nil }()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-d.done:
		if err != nil {
			return fmt.Errorf("keywardd: %v", err)
		}
		return nil
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		return errors.New("keywardd did not stop within 30 s of SIGTERM")
	}
}

// testKeywardd is the keywardd of a script: test-keywardd TOKEN-DIR LABEL
// CONFIG makes the token (PINs from $KEYWARD_SO_PIN and $KEYWARD_USER_PIN)
// unless it is there, and runs daemon.Run until SIGTERM.
func testKeywardd() int {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: test-keywardd TOKEN-DIR LABEL CONFIG")
		return 2
	}
	dir, label, config := os.Args[1], os.Args[2], os.Args[3]
	soPIN, userPIN := os.Getenv("KEYWARD_SO_PIN"), os.Getenv("KEYWARD_USER_PIN")
	os.Unsetenv("KEYWARD_SO_PIN")
	os.Unsetenv("KEYWARD_USER_PIN")
	tok, err := softhsmtest.Prepare(dir, label, soPIN, userPIN)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Setenv("SOFTHSM2_CONF", tok.Conf)
	if made, _ := filepath.Glob(filepath.Join(dir, "tokens", "*")); len(made) == 0 {
		if err := tok.Init(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	cfg, err := daemon.LoadConfig(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := daemon.Run(ctx, cfg, daemon.Options{Log: slog.New(slog.NewJSONHandler(os.Stderr, nil)), Version: "test"}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// cmdKeywardd is "keywardd stop" and "keywardd start": the script's
// keywardd stopped (SIGTERM) and started again on its token and data.
func cmdKeywardd(ts *testscript.TestScript, neg bool, args []string) {
	d := ts.Value(daemonKey{}).(*scriptDaemon)
	if neg || len(args) != 1 {
		ts.Fatalf("usage: keywardd start|stop")
	}
	switch args[0] {
	case "stop":
		ts.Check(d.stop())
	case "start":
		ts.Check(d.start(ts.Getenv("GORACE")))
	default:
		ts.Fatalf("usage: keywardd start|stop")
	}
}

// cmdExits is "exits N COMMAND ARGS...": the command runs (as exec runs
// it) and must exit with code N; its output is there for stdout and
// stderr to match.
func cmdExits(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exits CODE COMMAND [ARGS...]")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	code := 0
	if err := ts.Exec(args[1], args[2:]...); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			ts.Fatalf("%s: %v", args[1], err)
		}
		code = ee.ExitCode()
	}
	if code != want {
		ts.Fatalf("%s exited %d, want %d", args[1], code, want)
	}
}

// cmdJSON is "json FILE PATH [WANT]": FILE (or stdout, stderr) is JSON
// with a value at PATH (.a.b.0: object fields and array indexes; "." the
// whole; len() the length of an array or object; [k=v] the first element
// of an array whose field k is the string v). WANT is a regular
// expression that the value must match whole (a string as it is, anything
// else as compact JSON), or =TEXT, which it must equal, or @FILE, whose
// JSON must equal it. With !, the
// path is absent, or the value does not match.
func cmdJSON(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: json FILE PATH [WANT | @FILE]")
	}
	var doc any
	if err := json.Unmarshal([]byte(ts.ReadFile(args[0])), &doc); err != nil {
		ts.Fatalf("%s is not JSON: %v", args[0], err)
	}
	v, found := jsonPath(doc, args[1])
	if len(args) == 2 || !found {
		if found == neg {
			ts.Fatalf("%s: %s found: %v", args[0], args[1], found)
		}
		return
	}
	var match bool
	var got string
	if name, ok := strings.CutPrefix(args[2], "@"); ok {
		var other any
		if err := json.Unmarshal([]byte(ts.ReadFile(name)), &other); err != nil {
			ts.Fatalf("%s is not JSON: %v", name, err)
		}
		match, got = reflect.DeepEqual(v, other), fmt.Sprint(v)
	} else {
		got, _ = v.(string)
		if _, isString := v.(string); !isString {
			b, _ := json.Marshal(v)
			got = string(b)
		}
		if literal, ok := strings.CutPrefix(args[2], "="); ok {
			match = got == literal
		} else {
			match = regexp.MustCompile("^(?:" + args[2] + ")$").MatchString(got)
		}
	}
	if match == neg {
		ts.Fatalf("%s: %s is %s (match %s: %v)", args[0], args[1], got, args[2], match)
	}
}

// jsonPath finds the value at a path of cmdJSON.
func jsonPath(v any, path string) (any, bool) {
	path = strings.TrimPrefix(path, ".")
	if path == "" {
		return v, true
	}
	for _, seg := range strings.Split(path, ".") {
		m, isMap := v.(map[string]any)
		a, isArray := v.([]any)
		switch {
		case seg == "len()" && isMap:
			v = float64(len(m))
		case seg == "len()" && isArray:
			v = float64(len(a))
		case isMap:
			var ok bool
			if v, ok = m[seg]; !ok {
				return nil, false
			}
		case isArray && strings.HasPrefix(seg, "[") && strings.HasSuffix(seg, "]"):
			k, want, _ := strings.Cut(seg[1:len(seg)-1], "=")
			i := slices.IndexFunc(a, func(e any) bool { f, _ := e.(map[string]any); return f[k] == want })
			if i < 0 {
				return nil, false
			}
			v = a[i]
		case isArray:
			i, err := strconv.Atoi(seg)
			if err != nil || i < 0 || i >= len(a) {
				return nil, false
			}
			v = a[i]
		default:
			return nil, false
		}
	}
	return v, true
}

// cmdGrab is "grab VAR FILE REGEXP": $VAR is the first submatch of
// REGEXP in FILE (or stdout, stderr), which must match.
func cmdGrab(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: grab VAR FILE REGEXP")
	}
	m := regexp.MustCompile(args[2]).FindStringSubmatch(ts.ReadFile(args[1]))
	if len(m) < 2 {
		ts.Fatalf("%s does not match %s", args[1], args[2])
	}
	ts.Setenv(args[0], m[1])
}

// cmdPerm is "perm FILE MODE": FILE has the permissions MODE (0600).
func cmdPerm(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: perm FILE MODE")
	}
	want, err := strconv.ParseUint(args[1], 8, 32)
	ts.Check(err)
	fi, err := os.Lstat(ts.MkAbs(args[0]))
	ts.Check(err)
	if (fi.Mode().Perm() == os.FileMode(want)) == neg {
		ts.Fatalf("%s has mode %04o", args[0], fi.Mode().Perm())
	}
}

// cmdHolds is "holds FILE PART": FILE (or stdout, stderr) holds the bytes
// of the file PART (a secret, which is no regular expression).
func cmdHolds(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: holds FILE PART")
	}
	part := ts.ReadFile(args[1])
	if part == "" {
		ts.Fatalf("%s is empty", args[1])
	}
	if strings.Contains(ts.ReadFile(args[0]), part) == neg {
		ts.Fatalf("%s holds %s: %v", args[0], args[1], !neg)
	}
}
