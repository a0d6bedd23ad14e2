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

	"github.com/rogpeppe/go-internal/testscript"
	"go.yaml.in/yaml/v3"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/geo/geotest"
	"github.com/keyward/keyward/plugins/conformance"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
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
	tb    testing.TB
	files *daemontest.Files
	proc  *daemontest.Process // nil while stopped
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
// directory. The script's countries.txt, if any (lines of "PREFIX
// COUNTRY"), becomes the GeoIP database $WORK/countries.mmdb (geotest),
// for a keywardd.yaml's geoip.database.
func scriptSetup(env *testscript.Env) error {
	tb, ok := env.T().(testing.TB)
	if !ok {
		return errors.New("scripts run under go test")
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
	// Scripts run in parallel: each keywardd makes its token in its own
	// process (SoftHSM2 reads SOFTHSM2_CONF once per process).
	opts := []daemontest.Option{daemontest.PreparedToken()}
	if b, err := os.ReadFile(filepath.Join(env.WorkDir, "policy.yaml")); err == nil {
		opts = append(opts, daemontest.Policy(expand(b)))
	}
	if b, err := os.ReadFile(filepath.Join(env.WorkDir, "countries.txt")); err == nil {
		var nets []geotest.Network
		for line := range strings.Lines(string(b)) {
			prefix, country, ok := strings.Cut(strings.TrimSpace(line), " ")
			if !ok {
				return fmt.Errorf("countries.txt: %q is not PREFIX COUNTRY", line)
			}
			nets = append(nets, geotest.Network{Prefix: prefix, Country: strings.TrimSpace(country)})
		}
		geotest.Write(tb, env.WorkDir, nets...)
	}
	var cfgErr error
	if b, err := os.ReadFile(filepath.Join(env.WorkDir, "keywardd.yaml")); err == nil {
		opts = append(opts, daemontest.Configure(func(c *daemon.Config) {
			socket, data, policy, hsm := c.Socket, c.DataDir, c.PolicyFile, c.HSM
			dec := yaml.NewDecoder(strings.NewReader(expand(b)))
			dec.KnownFields(true)
			if err := dec.Decode(c); err != nil {
				cfgErr = fmt.Errorf("keywardd.yaml: %w", err)
				return
			}
			c.Socket, c.DataDir, c.PolicyFile, c.HSM = socket, data, policy, hsm
			for i, p := range c.Plugins {
				if p.Path != "" && !filepath.IsAbs(p.Path) {
					bin := conformance.Build(tb, "github.com/keyward/keyward/cmd/"+p.Path)
					b, err := os.ReadFile(bin)
					if err != nil {
						cfgErr = err
						return
					}
					sum := sha256.Sum256(b)
					c.Plugins[i].Path, c.Plugins[i].SHA256 = bin, hex.EncodeToString(sum[:])
				}
			}
		}))
	}
	files := daemontest.NewFiles(tb, opts...)
	if cfgErr != nil {
		return cfgErr
	}
	tok := files.Token
	gorace := os.Getenv("GORACE")
	if !strings.Contains(gorace, "atexit_sleep_ms") {
		// A program built with -race sleeps a second at exit unless told
		// not to; the scripts run keyward a few hundred times.
		gorace = strings.TrimSpace(gorace + " atexit_sleep_ms=0")
	}
	env.Vars = append(env.Vars,
		"KEYWARD_SOCKET="+files.Socket, "KEYWARDD_DATA="+files.DataDir, "GORACE="+gorace, "SOFTHSM2_CONF="+tok.Conf,
		"HSM_MODULE="+tok.Module, "HSM_TOKEN="+tok.Label, "HSM_PIN_FILE="+tok.PINFile, "HSM_PIN="+tok.PIN)

	d := &scriptDaemon{tb: tb, files: files}
	env.Values[daemonKey{}] = d
	env.Defer(func() {
		if err := d.stop(); err != nil {
			tb.Error(err)
		}
		if tb.Failed() {
			if b, err := os.ReadFile(filepath.Join(files.Dir, "keywardd.log")); err == nil {
				tb.Logf("keywardd's log:\n%s", b)
			}
		}
	})
	return d.start(gorace)
}

type daemonKey struct{}

// start runs keywardd (test-keywardd, below) and waits until it answers.
func (d *scriptDaemon) start(gorace string) error {
	if d.proc != nil {
		return errors.New("keywardd is running")
	}
	bin, err := exec.LookPath("test-keywardd")
	if err != nil {
		return err
	}
	tok := d.files.Token
	// The PINs reach the token's making through the environment, never
	// argv (as softhsm-test/mktoken takes them).
	d.proc = daemontest.Exec(d.tb, bin, d.files, daemontest.Args(tok.Dir, tok.Label, d.files.ConfigFile),
		daemontest.Env("KEYWARD_SO_PIN="+tok.SOPIN, "KEYWARD_USER_PIN="+tok.PIN, "GORACE="+gorace))
	return nil
}

// stop ends keywardd with SIGTERM, as systemd does, and waits for it.
func (d *scriptDaemon) stop() error {
	if d.proc == nil {
		return nil
	}
	defer func() { d.proc = nil }()
	return d.proc.Stop()
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
