// Package daemontest starts keywardd for tests: the one harness of the
// daemon's own tests, of keywardd's command and of the keyward CLI's
// transcripts.
//
// What it starts is the real thing. Each test gets a SoftHSM2 token of its
// own in t.TempDir() (softhsmtest.New), a data directory with a real bbolt
// store and audit log, a real Unix socket, a policy file and a
// keywardd.yaml written from a daemon.Config (NewFiles). On those files
// keywardd runs either in the test's process through daemon.Run (Start),
// or as a process of its own: the keywardd binary, built once per test
// binary (Build), or any command that runs keywardd (Exec). Everything it
// starts is stopped, and every file removed, when the test ends.
//
// What it never does: touch the system's token store or its SoftHSM2
// configuration (every token has its own SOFTHSM2_CONF), stand in a mock
// for the HSM, or fake the socket, the store or the audit log.
//
// A test that needs a knob daemon.Run has (the clock, the reload signal,
// how often health, credentials and keys are looked at, accepting a store
// rollback) sets it on the Daemon, and it holds from the next (re)start.
package daemontest

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keyward/keyward/daemon"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// Files is a keywardd set-up on disk: a token, a policy, a data directory,
// the socket's path and a configuration file naming them all.
type Files struct {
	Token      *softhsmtest.Token
	Dir        string         // the test's directory (0750) holding all but the token
	Config     *daemon.Config // what ConfigFile says as written (a test may edit either after)
	ConfigFile string         // Dir/keywardd.yaml
	Socket     string         // Config.Socket.Path, Dir/run/k.sock (short: a socket's path has at most 107 bytes)
	DataDir    string         // Config.DataDir, Dir/data
}

// An Option changes how NewFiles and Start set keywardd up.
type Option func(*setup)

type setup struct {
	policy    string
	configure []func(*daemon.Config)
	prepared  bool
	token     *softhsmtest.Token
}

// Policy makes yaml keywardd's policy. Without it, the policy grants the
// test's uid every operation on every key (AllowAll).
func Policy(yaml string) Option { return func(s *setup) { s.policy = yaml } }

// Configure changes the configuration before it is written; the options'
// functions run in their order.
func Configure(f func(*daemon.Config)) Option {
	return func(s *setup) { s.configure = append(s.configure, f) }
}

// PreparedToken lays out the token's directory, configuration and PIN
// files without making the token: for a test that runs in parallel with
// others, where the process that runs keywardd makes it (SoftHSM2 reads
// SOFTHSM2_CONF once per process, and softhsmtest.New sets it for the
// whole test process).
func PreparedToken() Option { return func(s *setup) { s.prepared = true } }

// SharedToken uses tok instead of a token of the set-up's own: the nodes
// of a fleet share one HSM (SoftHSM2's file store takes several processes).
func SharedToken(tok *softhsmtest.Token) Option { return func(s *setup) { s.token = tok } }

// AllowAll is a policy granting the test's uid every operation on every key.
func AllowAll() string {
	return fmt.Sprintf("version: 1\nroles:\n  all:\n    permissions:\n      - operations: [\"*\"]\n        keys: [\"*\"]\nbindings:\n  - role: all\n    callers:\n      - uid: %d\n", os.Getuid())
}

// NewFiles lays out a keywardd set-up under t.TempDir(): a fresh token
// (softhsmtest.New, which points SOFTHSM2_CONF at it for the rest of the
// test), the policy, and keywardd.yaml written from the configuration.
func NewFiles(t testing.TB, opts ...Option) *Files {
	t.Helper()
	s := setup{policy: AllowAll()}
	for _, o := range opts {
		o(&s)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	tok := s.token
	switch {
	case tok != nil: // shared, made by whoever made it
	case s.prepared:
		var err error
		if tok, err = softhsmtest.Prepare(filepath.Join(dir, "hsm"), "keyward-test", "", ""); err != nil {
			t.Fatal(err)
		}
	default:
		tok = softhsmtest.New(t)
	}
	cfg := &daemon.Config{DataDir: filepath.Join(dir, "data"), PolicyFile: filepath.Join(dir, "policy.yaml")}
	cfg.Socket.Path = filepath.Join(dir, "run", "k.sock")
	cfg.HSM.Module, cfg.HSM.Token, cfg.HSM.PINFile = tok.Module, tok.Label, tok.PINFile
	for _, f := range s.configure {
		if f != nil {
			f(cfg)
		}
	}
	if err := os.WriteFile(cfg.PolicyFile, []byte(s.policy), 0o600); err != nil {
		t.Fatal(err)
	}
	f := &Files{Token: tok, Dir: dir, Config: cfg, ConfigFile: filepath.Join(dir, "keywardd.yaml"), Socket: cfg.Socket.Path, DataDir: cfg.DataDir}
	b, err := MarshalConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.ConfigFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// MarshalConfig writes cfg as keywardd.yaml says it, leaving out what is
// not set (an empty string, zero, false, a zero duration, an empty list or
// map), as a person would: a test that edits the file then adds a field
// without meeting an empty one of the same name. So a pointer to a zero
// value, and a string "0s", are left out too.
func MarshalConfig(cfg *daemon.Config) ([]byte, error) {
	var n yaml.Node
	if err := n.Encode(cfg); err != nil {
		return nil, fmt.Errorf("daemontest: %w", err)
	}
	prune(&n)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return nil, fmt.Errorf("daemontest: %w", err)
	}
	return buf.Bytes(), enc.Close()
}

// prune removes from a mapping every key whose value is empty, and
// reports whether n itself is now empty.
func prune(n *yaml.Node) bool {
	switch n.Kind {
	case yaml.MappingNode:
		kept := n.Content[:0]
		for i := 0; i+1 < len(n.Content); i += 2 {
			if !prune(n.Content[i+1]) {
				kept = append(kept, n.Content[i], n.Content[i+1])
			}
		}
		n.Content = kept
		return len(kept) == 0
	case yaml.SequenceNode:
		for _, c := range n.Content {
			prune(c)
		}
		return len(n.Content) == 0
	case yaml.ScalarNode:
		switch {
		case n.Tag == "!!null", n.Tag == "!!bool" && n.Value == "false", n.Tag == "!!int" && n.Value == "0",
			n.Tag == "!!float" && n.Value == "0", n.Tag == "!!str" && (n.Value == "" || n.Value == "0s"):
			return true
		}
	}
	return false
}

// Daemon is keywardd running in the test's process through daemon.Run, on
// the files of NewFiles. Its exported knobs are read at every (re)start.
type Daemon struct {
	*Files
	Conn *grpc.ClientConn // to the socket; a new one at every start, closed at Stop
	Log  *Log             // keywardd's JSON log, across restarts

	Now                 func() time.Time // the clock of keys, API keys, credentials and the schedule; nil: time.Now
	HealthEvery         time.Duration    // how often the HSM's health is checked; 0: keywardd's default
	CredentialsEvery    time.Duration    // how often managed credentials are looked at; 0: the default
	KeysEvery           time.Duration    // how often keys past their deletion date are looked for; 0: the default
	AcceptStoreRollback bool             // keywardd -accept-store-rollback

	t       testing.TB
	reload  chan struct{}
	cancel  context.CancelFunc
	errc    chan error
	running bool
}

// Start lays out the files (NewFiles, with opts), runs keywardd on them
// until it is ready, and dials its socket. keywardd is stopped when the
// test ends; a failure to start fails the test.
func Start(t testing.TB, opts ...Option) *Daemon {
	t.Helper()
	d := &Daemon{Files: NewFiles(t, opts...), Log: &Log{}, t: t, reload: make(chan struct{})}
	d.Restart()
	t.Cleanup(func() { d.Stop() })
	return d
}

func (d *Daemon) options(ready chan struct{}) daemon.Options {
	return daemon.Options{Log: slog.New(slog.NewJSONHandler(d.Log, nil)), Reload: d.reload, Ready: ready, Version: "test",
		HealthEvery: d.HealthEvery, CredentialsEvery: d.CredentialsEvery, Now: d.Now, AcceptStoreRollback: d.AcceptStoreRollback, KeysEvery: d.KeysEvery}
}

// Restart stops keywardd if it runs, and starts it again on the same files
// and configuration (d.Config, which the test may have changed), with the
// knobs as they are now.
func (d *Daemon) Restart() {
	d.t.Helper()
	if err := d.Stop(); err != nil {
		d.t.Fatalf("daemontest: keywardd stopped with: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready, errc := make(chan struct{}), make(chan error, 1)
	go func() { errc <- daemon.Run(ctx, d.Config, d.options(ready)) }()
	select {
	case <-ready:
	case err := <-errc:
		cancel()
		d.t.Fatalf("keywardd did not start: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+d.Config.Socket.Path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cancel()
		<-errc
		d.t.Fatal(err)
	}
	d.cancel, d.errc, d.Conn, d.running = cancel, errc, conn, true
}

// Stop closes the connection, stops keywardd and returns what daemon.Run
// returned. Stopping a stopped Daemon does nothing.
func (d *Daemon) Stop() error {
	if !d.running {
		return nil
	}
	d.running = false
	d.Conn.Close()
	d.cancel()
	return <-d.errc
}

// RunOnce runs keywardd on d's files (which must not be serving) until it
// fails to start or is ready, and stops it: for set-ups keywardd must
// refuse. It returns daemon.Run's error, or nil once keywardd was ready.
func (d *Daemon) RunOnce() error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready, errc := make(chan struct{}), make(chan error, 1)
	opts := d.options(ready)
	opts.Reload = nil
	go func() { errc <- daemon.Run(ctx, d.Config, opts) }()
	select {
	case err := <-errc:
		return err
	case <-ready:
		cancel()
		<-errc
		return nil
	}
}

// Reload signals keywardd to reload its policy, as SIGHUP does, once
// keywardd takes the signal.
func (d *Daemon) Reload() { d.reload <- struct{}{} }

// SetPolicy writes yaml to the policy file, has keywardd reload it and
// waits until the log says it did.
func (d *Daemon) SetPolicy(yaml string) {
	d.t.Helper()
	n := strings.Count(d.Log.String(), "policy reloaded")
	if err := os.WriteFile(d.Config.PolicyFile, []byte(yaml), 0o600); err != nil {
		d.t.Fatal(err)
	}
	d.Reload()
	for range 200 {
		if strings.Count(d.Log.String(), "policy reloaded") > n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.t.Fatalf("keywardd did not reload its policy within 2 s; log:\n%s", d.Log)
}

// Log is a log that keywardd writes while the test reads it.
type Log struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns what was written.
func (l *Log) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// Reset forgets what was written.
func (l *Log) Reset() { l.mu.Lock(); defer l.mu.Unlock(); l.b.Reset() }
