// Package host runs keyward plugins inside keywardd: it checks a plugin's
// file before each launch (an absolute path, not a symlink, not writable by
// others, nor its directory, owned by root or keywardd's user, and the
// pinned SHA-256 over the very bytes it then executes), starts it with
// hashicorp/go-plugin (gRPC only, AutoMTLS) in an environment of nothing but
// what the configuration gives, puts a deadline on every call, restarts it
// with backoff when it crashes, makes the kernel kill it if keywardd dies,
// and logs its lines in keywardd's log tagged with its name.
//
// The file is opened once per launch, read, hashed, and the bytes hashed
// are copied into a sealed memory file (memfd) that is executed as
// /proc/self/fd/N, so what runs is what was hashed: replacing the file, a
// directory in its path, or writing the file in place after the check
// changes nothing (go-plugin's own SecureConfig hashes the path and then
// executes the path).
package host

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-plugin"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// Config is one plugin as keywardd's configuration names it.
type Config struct {
	// Name is what the plugin must call itself (Describe).
	Name string
	// Path is the plugin's executable: absolute, not a symlink.
	Path string
	// SHA256 is the executable's SHA-256, hex: the plugin is pinned.
	SHA256 string
	// Interpreter, if set, runs Path, a script (a Python plugin): the
	// interpreter's executable, absolute, pinned by InterpreterSHA256. Both
	// run from sealed memory copies: the interpreter is started with its
	// path as argv[0] (so that it finds its library) and the script as
	// /dev/fd/3, a copy no one can change between the check and the run.
	Interpreter, InterpreterSHA256 string
	// InterpreterArgs go between the interpreter and the script: for
	// Python, -I (isolated: no PYTHON* variables, no user site, not the
	// script's directory on the path), so that what imports is the pinned
	// script (a zipapp with its modules) and the system's packages.
	InterpreterArgs []string
	// Env is the plugin's whole environment (keywardd's is not passed on).
	Env map[string]string
	// CallTimeout bounds every call; default 30 s.
	CallTimeout time.Duration
	// StartTimeout bounds a launch up to the handshake; default 10 s.
	StartTimeout time.Duration
	// Log receives the plugin's lines and the host's, tagged with the
	// plugin's name; slog.Default() if nil.
	Log *slog.Logger
}

// Errors of the host.
var (
	// ErrRefused: the plugin's file fails a check; it is not run.
	ErrRefused = errors.New("plugin refused")
	// ErrUnavailable: the plugin is not running now (starting, crashed and
	// waiting to restart, or refused); the call may be retried.
	ErrUnavailable = errors.New("plugin unavailable")
)

var (
	nameForm = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)
	envName  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// CheckConfig says whether c can be a plugin's configuration, without
// looking at its file (that is checked at every launch).
func CheckConfig(c Config) error { return c.check() }

func (c *Config) check() error {
	switch {
	case !nameForm.MatchString(c.Name):
		return fmt.Errorf("plugin name %q: lower case letters, digits and -, a letter first", c.Name)
	case !filepath.IsAbs(c.Path) || filepath.Clean(c.Path) != c.Path:
		return fmt.Errorf("plugin %s: path %q must be absolute and clean", c.Name, c.Path)
	}
	if b, err := hex.DecodeString(c.SHA256); err != nil || len(b) != sha256.Size {
		return fmt.Errorf("plugin %s: sha256 must be 64 hex digits (sha256sum %s)", c.Name, c.Path)
	}
	if c.Interpreter == "" && (c.InterpreterSHA256 != "" || len(c.InterpreterArgs) > 0) {
		return fmt.Errorf("plugin %s: interpreter_sha256 or interpreter_args without interpreter: set the interpreter too, or neither", c.Name)
	}
	for _, a := range c.InterpreterArgs {
		if !strings.HasPrefix(a, "-") || strings.ContainsRune(a, 0) {
			return fmt.Errorf("plugin %s: interpreter_args %q: options only (the script is the pinned path, given as /dev/fd/3)", c.Name, a)
		}
	}
	if c.Interpreter != "" || c.InterpreterSHA256 != "" {
		if !filepath.IsAbs(c.Interpreter) || filepath.Clean(c.Interpreter) != c.Interpreter {
			return fmt.Errorf("plugin %s: interpreter %q must be absolute and clean (the interpreter's own file, say /usr/bin/python3.11)", c.Name, c.Interpreter)
		}
		if b, err := hex.DecodeString(c.InterpreterSHA256); err != nil || len(b) != sha256.Size {
			return fmt.Errorf("plugin %s: interpreter_sha256 must be 64 hex digits (sha256sum %s)", c.Name, c.Interpreter)
		}
	}
	for k := range c.Env {
		if !envName.MatchString(k) || strings.HasPrefix(k, "PLUGIN_") || k == pluginv1.Handshake.MagicCookieKey {
			return fmt.Errorf("plugin %s: environment variable %q: a name of letters, digits and _, not PLUGIN_* or %s (go-plugin's)", c.Name, k, pluginv1.Handshake.MagicCookieKey)
		}
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = 30 * time.Second
	}
	if c.StartTimeout <= 0 {
		c.StartTimeout = 10 * time.Second
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	c.Log = c.Log.With("plugin", c.Name)
	return nil
}

// openPinned opens the plugin's file and checks it: a regular file, not a
// symlink, owned by root or this process's user, writable by neither group
// nor others, in a directory writable by neither, below directories others
// cannot change (or sticky ones, as /tmp), and with the pinned SHA-256.
// The returned file is the one to execute.
func openPinned(c *Config) (*os.File, error) {
	return openPinnedFile(c.Name, c.Path, c.SHA256, c.Interpreter == "")
}

// openPinnedFile is path, checked and hashed against sha, in a sealed
// memory copy; exe: it must be executable (a script run by its
// interpreter need not be).
func openPinnedFile(name, path, sha string, exe bool) (*os.File, error) {
	c := &Config{Name: name, Path: path, SHA256: sha}
	refuse := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrRefused, c.Name, fmt.Sprintf(format, a...))
	}
	fi, err := os.Lstat(c.Path)
	if err != nil {
		return nil, refuse("%v", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return nil, refuse("%s is a symlink; configure the file it points to", c.Path)
	}
	f, err := os.OpenFile(c.Path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, refuse("%v", err)
	}
	fail := func(err error) (*os.File, error) { f.Close(); return nil, err }
	if fi, err = f.Stat(); err != nil {
		return fail(refuse("%v", err))
	}
	st := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		return fail(refuse("%s is not a regular file", c.Path))
	case fi.Mode().Perm()&0o022 != 0:
		return fail(refuse("%s is writable by others (mode %04o); chmod go-w it", c.Path, fi.Mode().Perm()))
	case exe && fi.Mode().Perm()&0o100 == 0:
		return fail(refuse("%s is not executable by its owner", c.Path))
	case st.Uid != 0 && int(st.Uid) != os.Getuid():
		return fail(refuse("%s belongs to uid %d; a plugin must belong to root or to keywardd's user", c.Path, st.Uid))
	}
	for dir := filepath.Dir(c.Path); ; dir = filepath.Dir(dir) {
		di, err := os.Stat(dir)
		if err != nil {
			return fail(refuse("%v", err))
		}
		perm := di.Mode().Perm()
		if dir == filepath.Dir(c.Path) && perm&0o022 != 0 {
			return fail(refuse("its directory %s is writable by others (mode %04o); chmod go-w it", dir, perm))
		}
		if perm&0o002 != 0 && di.Mode()&os.ModeSticky == 0 {
			return fail(refuse("%s, above it, is writable by anyone", dir))
		}
		if dir == "/" {
			break
		}
	}
	// The bytes are read once, hashed, and copied into a sealed memory
	// file that is what runs: writing the file in place after the hash
	// (its owner can) changes nothing.
	b, err := io.ReadAll(io.LimitReader(f, maxPluginSize+1))
	f.Close()
	if err != nil {
		return nil, refuse("reading %s: %v", c.Path, err)
	}
	if len(b) > maxPluginSize {
		return nil, refuse("%s is larger than %d MiB", c.Path, maxPluginSize>>20)
	}
	if got := sha256.Sum256(b); hex.EncodeToString(got[:]) != strings.ToLower(c.SHA256) {
		return nil, refuse("%s has SHA-256 %s, not the pinned %s; if the new file is the one to run, pin it", c.Path, hex.EncodeToString(got[:]), strings.ToLower(c.SHA256))
	}
	return sealedCopy(c.Name, b)
}

// maxPluginSize bounds a plugin's executable.
const maxPluginSize = 512 << 20

// sealedCopy is b in a memory file sealed against any change.
func sealedCopy(name string, b []byte) (*os.File, error) {
	fd, err := unix.MemfdCreate("keyward-plugin-"+name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("plugin %s: a memory file: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "keyward-plugin-"+name)
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, fmt.Errorf("plugin %s: %w", name, err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		f.Close()
		return nil, fmt.Errorf("plugin %s: sealing its memory file: %w", name, err)
	}
	return f, nil
}

// State is where a plugin is.
type State string

const (
	Starting   State = "starting"
	Running    State = "running"
	Restarting State = "restarting" // it exited or failed to start; another launch is due
	Stopped    State = "stopped"
)

// Status is a plugin's state, for GetStatus.
type Status struct {
	Name, Version string
	State         State
	PID           int
	Capabilities  []pluginv1.Capability
	Events        []pluginv1.EventKind
	Launches      int
	LastError     string
	Since         time.Time
}

// Plugin is a supervised plugin process.
type Plugin struct {
	cfg Config

	mu     sync.Mutex
	client *plugin.Client
	api    *pluginv1.Clients
	desc   *pluginv1.DescribeResponse
	status Status
	stop   chan struct{}
	done   chan struct{}
	closed sync.Once
	tail   *stderrTail // the plain lines of the last launch's standard error
}

// Backoff of restarts: from minBackoff, doubling, to maxBackoff; a plugin
// that ran for stableAfter starts again from minBackoff.
const (
	minBackoff  = time.Second
	maxBackoff  = time.Minute
	stableAfter = time.Minute
)

// Start launches the plugin and supervises it until Close. If the first
// launch fails, Start returns the error and the Plugin, which keeps trying
// with backoff (a file mended or re-pinned is picked up).
func Start(cfg Config) (*Plugin, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	p := &Plugin{cfg: cfg, status: Status{Name: cfg.Name, State: Starting, Since: time.Now()}, stop: make(chan struct{}), done: make(chan struct{})}
	err := p.launch()
	if err != nil {
		p.setState(Restarting, err)
	}
	go p.supervise(err)
	return p, err
}

// launch runs the plugin once, up to its Describe.
func (p *Plugin) launch() error {
	p.setState(Starting, nil)
	f, err := openPinned(&p.cfg)
	if err != nil {
		return err
	}
	defer f.Close()
	env := make([]string, 0, len(p.cfg.Env))
	for _, k := range slices.Sorted(maps.Keys(p.cfg.Env)) {
		env = append(env, k+"="+p.cfg.Env[k])
	}
	cmd := &exec.Cmd{
		Path: fmt.Sprintf("/proc/self/fd/%d", f.Fd()),
		Args: []string{p.cfg.Path},
		Env:  env,
		// The kernel kills the plugin if keywardd dies, even by SIGKILL.
		SysProcAttr: &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL},
	}
	if p.cfg.Interpreter != "" {
		// f is the script; the interpreter runs, and reads it as fd 3
		// (an exec'd memory file cannot be opened again as a script by
		// its path: /proc/self/fd/N is closed on exec).
		in, err := openPinnedFile(p.cfg.Name, p.cfg.Interpreter, p.cfg.InterpreterSHA256, true)
		if err != nil {
			return fmt.Errorf("the interpreter: %w", err)
		}
		defer in.Close()
		var magic [2]byte
		if _, err := in.ReadAt(magic[:], 0); err == nil && string(magic[:]) == "#!" {
			return fmt.Errorf("%w: %s: the interpreter %s is itself a script (a shim?): configure the binary it runs", ErrRefused, p.cfg.Name, p.cfg.Interpreter)
		}
		cmd.Path = fmt.Sprintf("/proc/self/fd/%d", in.Fd())
		cmd.Args = append(append([]string{p.cfg.Interpreter}, p.cfg.InterpreterArgs...), "/dev/fd/3")
		cmd.ExtraFiles = []*os.File{f}
	}
	tail := &stderrTail{}
	p.tail = tail
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  pluginv1.Handshake,
		VersionedPlugins: pluginv1.PluginSets(&pluginv1.GRPCPlugin{}),
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		SkipHostEnv:      true,
		StartTimeout:     p.cfg.StartTimeout,
		Logger:           newLogBridge(p.cfg.Log, tail, "plugin."+filepath.Base(cmd.Path)),
	})
	rpc, err := client.Client()
	if err != nil {
		client.Kill()
		return p.startError(err)
	}
	raw, err := rpc.Dispense(pluginv1.PluginName)
	if err != nil {
		client.Kill()
		return fmt.Errorf("plugin %s: %w", p.cfg.Name, err)
	}
	api := raw.(*pluginv1.Clients)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.CallTimeout)
	defer cancel()
	desc, err := api.Plugin.Describe(ctx, &pluginv1.DescribeRequest{})
	if err != nil {
		client.Kill()
		return fmt.Errorf("plugin %s: Describe: %w", p.cfg.Name, err)
	}
	if desc.GetName() != p.cfg.Name {
		client.Kill()
		return fmt.Errorf("%w: %s: the plugin calls itself %q; configure it under that name or run the right file", ErrRefused, p.cfg.Name, desc.GetName())
	}
	pid := 0
	if rc := client.ReattachConfig(); rc != nil {
		pid = rc.Pid
	}
	p.mu.Lock()
	p.client, p.api, p.desc = client, api, desc
	p.status.Version, p.status.Capabilities, p.status.Events, p.status.PID = desc.GetVersion(), desc.GetCapabilities(), desc.GetEvents(), pid
	p.status.Launches++
	p.mu.Unlock()
	p.setState(Running, nil)
	p.cfg.Log.Info("plugin running", "version", desc.GetVersion(), "pid", pid)
	return nil
}

// startError says what go-plugin's start-up error means, without quoting
// what the plugin printed (it could be anything, a secret included).
func (p *Plugin) startError(err error) error {
	msg := err.Error()
	said := "its log lines, if any, are above"
	if p.tail != nil {
		if t := p.tail.String(); t != "" {
			said = "its last lines on standard error: " + t
		}
	}
	switch {
	case strings.Contains(msg, "Failed to read any lines"):
		return fmt.Errorf("plugin %s exited or closed standard output before the handshake (%s)", p.cfg.Name, said)
	case strings.Contains(msg, "Unrecognized remote plugin message"):
		return fmt.Errorf("plugin %s wrote to standard output before the handshake: standard output belongs to go-plugin; log to standard error (the SDK's logger does)", p.cfg.Name)
	case strings.Contains(msg, "timeout while waiting for plugin to start"):
		return fmt.Errorf("plugin %s did not complete the handshake within %v", p.cfg.Name, p.cfg.StartTimeout)
	case strings.Contains(msg, "exited before we could connect"):
		return fmt.Errorf("plugin %s exited before the handshake (%s)", p.cfg.Name, said)
	case strings.Contains(msg, "Incompatible API version"), strings.Contains(msg, "incompatible"):
		return fmt.Errorf("plugin %s speaks no protocol version keywardd speaks (%d)", p.cfg.Name, pluginv1.ProtocolVersion)
	}
	// go-plugin's other messages can quote what the plugin printed.
	return fmt.Errorf("plugin %s failed go-plugin's handshake (%s)", p.cfg.Name, said)
}

func (p *Plugin) setState(s State, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.status.State != s {
		p.status.Since = time.Now()
	}
	p.status.State = s
	if err != nil {
		p.status.LastError = err.Error()
	}
}

// supervise restarts the plugin when it exits, with backoff, until Close.
func (p *Plugin) supervise(first error) {
	defer close(p.done)
	backoff := minBackoff
	err := first
	for {
		if err == nil {
			started := time.Now()
			if !p.waitExit() {
				return
			}
			err = errors.New("the plugin exited")
			if time.Since(started) > stableAfter {
				backoff = minBackoff
			}
		}
		p.setState(Restarting, err)
		p.cfg.Log.Error("plugin not running; starting it again after a pause", "error", err.Error(), "pause", backoff.String())
		select {
		case <-p.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
		err = p.launch()
	}
}

// waitExit waits until the running plugin exits (true) or Close (false).
func (p *Plugin) waitExit() bool {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return false
		case <-t.C:
			p.mu.Lock()
			c := p.client
			p.mu.Unlock()
			if c == nil || c.Exited() {
				p.mu.Lock()
				p.client, p.api = nil, nil
				p.mu.Unlock()
				return true
			}
		}
	}
}

// Status is the plugin's state now.
func (p *Plugin) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.status
	s.Capabilities, s.Events = slices.Clone(s.Capabilities), slices.Clone(s.Events)
	return s
}

// Describe is what the running plugin said of itself, or nil.
func (p *Plugin) Describe() *pluginv1.DescribeResponse {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.desc
}

// Call runs fn against the plugin's clients under the call deadline. It
// fails with ErrUnavailable while the plugin is not running.
func (p *Plugin) Call(ctx context.Context, fn func(ctx context.Context, c *pluginv1.Clients) error) error {
	p.mu.Lock()
	api, st := p.api, p.status
	p.mu.Unlock()
	if api == nil || st.State != Running {
		why := ""
		if st.LastError != "" {
			why = ": " + st.LastError
		}
		return fmt.Errorf("%w: %s is %s%s", ErrUnavailable, p.cfg.Name, st.State, why)
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.CallTimeout)
	defer cancel()
	err := fn(ctx, api)
	if status.Code(err) == codes.DeadlineExceeded || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("plugin %s: no answer within %v: %w", p.cfg.Name, p.cfg.CallTimeout, err)
	}
	return err
}

// Close stops supervising and kills the plugin (go-plugin asks it to stop
// first, then kills it).
func (p *Plugin) Close() {
	first := false
	p.closed.Do(func() { close(p.stop); first = true })
	<-p.done
	if !first {
		return
	}
	p.mu.Lock()
	c := p.client
	p.client, p.api = nil, nil
	p.mu.Unlock()
	if c != nil {
		c.Kill()
	}
	p.setState(Stopped, nil)
}
