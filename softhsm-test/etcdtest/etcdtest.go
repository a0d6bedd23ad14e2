// Package etcdtest runs a real etcd cluster inside a test's process, for
// the tests of keywardd's fleet (docs/fleet.md, "Testing against etcd").
//
// Each member is etcd's own server (go.etcd.io/etcd/server/v3/embed), with
// its data directory in t.TempDir(), listening on loopback TCP ports the
// kernel handed out as free (no fixed ports, so that several test binaries
// can run at once). A test stops, kills and restarts members, loses and
// heals quorum, and compacts the history, to see what a client sees then.
//
// Why TCP, not Unix sockets: embed takes a Unix socket's name from the
// URL's host, relative to the process's working directory (there is no
// way to name an absolute path), so sockets would land in the source tree.
// A port the kernel found free may still be taken by another process
// before etcd binds it: NewCluster then starts again on fresh ports, and
// Start retries while the port is busy.
package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Config says how to start a cluster. The zero value of every field but
// Members means etcd's own default, which is what keyward must work with.
type Config struct {
	// Members is the number of members (1 or more).
	Members int
	// MaxTxnOps is the most operations a transaction may hold (etcd's
	// default: 128).
	MaxTxnOps uint
	// MaxRequestBytes is the largest request a member takes (etcd's
	// default: 1.5 MiB).
	MaxRequestBytes uint
	// QuotaBackendBytes is the size at which etcd raises its NOSPACE alarm
	// and refuses writes (etcd's default: 2 GiB).
	QuotaBackendBytes int64
	// AutoCompactionMode ("periodic" or "revision") and
	// AutoCompactionRetention turn etcd's automatic compaction on; by
	// default it is off, and a test compacts with Cluster.Compact.
	AutoCompactionMode      string
	AutoCompactionRetention string
	// TickMs and ElectionMs are raft's heartbeat interval and election
	// timeout (etcd's defaults: 100 ms and 1 s). A follower that hears
	// nothing from the leader for ElectionMs starts an election.
	TickMs, ElectionMs uint
}

// Cluster is a running etcd cluster whose members a test can stop and
// start. Its methods are safe for concurrent use, and fail the test that
// made it (with t.Fatal, so call them from the test's goroutine).
type Cluster struct {
	t      TB
	cfg    Config
	logger *zap.Logger

	mu      sync.Mutex
	members []*member
}

// member is one etcd server: its fixed identity (name, URLs, data
// directory) and, while it runs, the server.
type member struct {
	name      string
	dir       string
	peerURL   url.URL
	clientURL url.URL
	etcd      *embed.Etcd // nil while stopped
	quiet     atomic.Bool // drop what it logs: it is stopping
}

// startTimeout bounds how long a member or a cluster may take to start
// or elect a leader before the test fails.
const startTimeout = 20 * time.Second

// NewCluster starts an n-member cluster with etcd's defaults (automatic
// compaction off) and waits until it has a leader. It stops every member
// when t ends.
func NewCluster(t TB, n int) *Cluster {
	t.Helper()
	return New(t, Config{Members: n})
}

// New starts a cluster as cfg says and waits until it has a leader; it
// stops every member when t ends.
func New(t TB, cfg Config) *Cluster {
	t.Helper()
	if cfg.Members < 1 {
		t.Fatalf("etcdtest: a cluster needs at least one member, not %d", cfg.Members)
	}
	c := &Cluster{t: t, cfg: cfg, logger: testLogger(t)}
	// The first TempDir registers its removal; the members must stop
	// before it (cleanups run last first).
	dir := t.TempDir()
	t.Cleanup(c.closeAll)
	var err error
	for attempt := 1; attempt <= 5; attempt++ {
		if err = c.startNew(dir); err == nil {
			c.WaitLeader()
			return c
		}
		c.closeAll()
		if !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		dir = t.TempDir()
	}
	t.Fatalf("etcdtest: starting %d members: %v", cfg.Members, err)
	return nil
}

// startNew starts the members of a new cluster on fresh ports, with their
// data under dir; it returns the first error (EADDRINUSE: a port was taken
// between choosing it and binding it).
func (c *Cluster) startNew(dir string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ports, err := freePorts(2 * c.cfg.Members)
	if err != nil {
		return err
	}
	c.members = make([]*member, c.cfg.Members)
	var initial []string
	for i := range c.members {
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			dir:       filepath.Join(dir, fmt.Sprintf("m%d", i)),
			peerURL:   url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", ports[2*i])},
			clientURL: url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", ports[2*i+1])},
		}
		c.members[i] = m
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	for _, m := range c.members {
		e, err := embed.StartEtcd(c.embedConfig(m, strings.Join(initial, ",")))
		if err != nil {
			return fmt.Errorf("member %s: %w", m.name, err)
		}
		m.etcd = e
	}
	// A member is ready once the cluster has a leader and the member has
	// published itself through it.
	deadline := time.After(startTimeout)
	for _, m := range c.members {
		select {
		case <-m.etcd.Server.ReadyNotify():
		case err := <-m.etcd.Err():
			return fmt.Errorf("member %s: %w", m.name, err)
		case <-deadline:
			return fmt.Errorf("member %s not ready after %v", m.name, startTimeout)
		}
	}
	return nil
}

// embedConfig is m's configuration. initialCluster names every member's
// peer URL; a member started again reads its membership from its data
// directory instead.
func (c *Cluster) embedConfig(m *member, initialCluster string) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenPeerUrls = []url.URL{m.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
	cfg.ListenClientUrls = []url.URL{m.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.InitialCluster = initialCluster
	cfg.InitialClusterToken = "etcdtest"
	cfg.EnableGRPCGateway = false
	m.quiet.Store(false)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(c.logger.Named(m.name).WithOptions(
		zap.WrapCore(func(core zapcore.Core) zapcore.Core { return quietCore{core, &m.quiet} })))
	if c.cfg.MaxTxnOps != 0 {
		cfg.MaxTxnOps = c.cfg.MaxTxnOps
	}
	if c.cfg.MaxRequestBytes != 0 {
		cfg.MaxRequestBytes = c.cfg.MaxRequestBytes
	}
	cfg.QuotaBackendBytes = c.cfg.QuotaBackendBytes
	if c.cfg.AutoCompactionMode != "" {
		cfg.AutoCompactionMode = c.cfg.AutoCompactionMode
	}
	cfg.AutoCompactionRetention = "0" // off
	if c.cfg.AutoCompactionRetention != "" {
		cfg.AutoCompactionRetention = c.cfg.AutoCompactionRetention
	}
	if c.cfg.TickMs != 0 {
		cfg.TickMs = c.cfg.TickMs
	}
	if c.cfg.ElectionMs != 0 {
		cfg.ElectionMs = c.cfg.ElectionMs
	}
	return cfg
}

// TB is what a cluster needs of the test that runs it: testing.TB has it,
// and a program that runs a cluster (make fleet) uses a Program.
type TB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Log(args ...any)
	TempDir() string
	Cleanup(func())
}

var _ TB = testing.TB(nil)

// Program is a TB for a program that runs a cluster rather than a test:
// etcd's warnings go to Out; a failure is printed to Out and standard
// error and exits the program (after Close); each TempDir is a new
// directory under Dir; what Cleanup is given runs at Close, last first.
type Program struct {
	Dir string
	Out io.Writer

	mu       sync.Mutex
	dirs     int
	cleanups []func()
}

func (p *Program) Helper() {}

func (p *Program) Fatal(args ...any) {
	fmt.Fprintln(p.Out, args...)
	if p.Out != os.Stderr {
		fmt.Fprintln(os.Stderr, args...)
	}
	p.Close()
	os.Exit(1)
}

func (p *Program) Fatalf(format string, args ...any) { p.Fatal(fmt.Sprintf(format, args...)) }

func (p *Program) Log(args ...any) { fmt.Fprintln(p.Out, args...) }

func (p *Program) TempDir() string {
	p.mu.Lock()
	p.dirs++
	dir := filepath.Join(p.Dir, fmt.Sprintf("etcd-%d", p.dirs))
	p.mu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		p.Fatal(err)
	}
	return dir
}

func (p *Program) Cleanup(fn func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cleanups = append(p.cleanups, fn)
}

// Close runs what Cleanup was given, last first.
func (p *Program) Close() {
	p.mu.Lock()
	fns := p.cleanups
	p.cleanups = nil
	p.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}

// freePorts asks the kernel for n loopback ports that are free now.
func freePorts(n int) ([]string, error) {
	ports := make([]string, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		ports = append(ports, port)
		// Closed only once all are chosen, so that no two are the same.
		defer l.Close()
	}
	return ports, nil
}

// Size is the number of members, running or not.
func (c *Cluster) Size() int { return len(c.members) }

// Endpoints are the client URLs of every member, running or not: what a
// fleet node is configured with.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.clientURL.String()
	}
	return out
}

// Endpoint is member i's client URL: a client given only this one talks
// to that member alone.
func (c *Cluster) Endpoint(i int) string { return c.member(i).clientURL.String() }

// ClientConfig is a client configuration for the given endpoints (every
// member's if none): a dial gives up after 2 s, and a connection that does
// not answer a keepalive within 2 s is dropped for another endpoint.
func (c *Cluster) ClientConfig(endpoints ...string) clientv3.Config {
	if len(endpoints) == 0 {
		endpoints = c.Endpoints()
	}
	return clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          2 * time.Second,
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Logger:               c.logger.Named("client"),
	}
}

// Client is a client of the given endpoints (every member's if none),
// configured as ClientConfig says, closed when t ends.
func (c *Cluster) Client(t TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(c.ClientConfig(endpoints...))
	if err != nil {
		t.Fatalf("etcdtest: client: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func (c *Cluster) member(i int) *member {
	c.t.Helper()
	if i < 0 || i >= len(c.members) {
		c.t.Fatalf("etcdtest: no member %d in a cluster of %d", i, len(c.members))
	}
	return c.members[i]
}

// Running reports whether member i runs.
func (c *Cluster) Running(i int) bool {
	m := c.member(i)
	c.mu.Lock()
	defer c.mu.Unlock()
	return m.etcd != nil
}

// Stop stops member i cleanly, keeping its data: a leader first hands its
// leadership to another member, requests in flight are drained for up to
// the request timeout, and the peers' connections are given a second to
// end. Stopping a stopped member does nothing.
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	c.stop(false, c.member(i))
}

// Kill stops member i as abruptly as an in-process server allows, keeping
// its data: raft stops at once (no leadership transfer: the others notice
// only when the election timeout passes), then the listeners close under
// the requests in flight. What a member acknowledged is fsynced either
// way; unlike kill -9, the process's unsynced writes are not lost, so Kill
// tests what the other members and the clients see, not a torn disk.
func (c *Cluster) Kill(i int) {
	c.t.Helper()
	c.stop(true, c.member(i))
}

// stop stops the members given that run, all at once (each takes a
// second to close its peers' connections); hard is Kill.
func (c *Cluster) stop(hard bool, ms ...*member) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var wg sync.WaitGroup
	for _, m := range ms {
		if m.etcd == nil {
			continue
		}
		e := m.etcd
		m.etcd = nil
		// What a member logs as it stops is the noise of its stopping.
		m.quiet.Store(true)
		wg.Go(func() {
			if hard {
				e.Server.HardStop()
			}
			e.Close()
		})
	}
	wg.Wait()
}

// Start starts member i again from its data directory, on the same ports,
// and waits until it serves (which needs a quorum of members running).
// Starting a running member does nothing.
func (c *Cluster) Start(i int) {
	c.t.Helper()
	m := c.member(i)
	c.mu.Lock()
	e, err := c.restart(m)
	c.mu.Unlock()
	if err != nil {
		c.t.Fatalf("etcdtest: starting member %d again: %v", i, err)
	}
	if e == nil {
		return
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		c.t.Fatalf("etcdtest: member %d: %v", i, err)
	case <-time.After(startTimeout):
		c.t.Fatalf("etcdtest: member %d not serving %v after its start (is a quorum running?)", i, startTimeout)
	}
}

// restart starts m from its data directory, retrying for a while if
// another process holds one of its ports; it returns nil, nil if m runs.
func (c *Cluster) restart(m *member) (*embed.Etcd, error) {
	if m.etcd != nil {
		return nil, nil
	}
	deadline := time.Now().Add(startTimeout)
	for {
		// The initial cluster is ignored when the data directory has
		// one, but must still name this member's peer URL.
		e, err := embed.StartEtcd(c.embedConfig(m, m.name+"="+m.peerURL.String()))
		if err == nil {
			m.etcd = e
			return e, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// LoseQuorum kills (as Kill does) as many members as it takes for the
// others to be fewer than a quorum, the first ones, and returns their
// numbers: members 0 and 1 of 3. (A clean stop of two at once would have
// the leader wait for the request timeout, 7 s, to hand its leadership to
// the other one stopping.) The member left running still accepts
// connections, so a client sees what etcd answers without a quorum, not a
// refused connection.
func (c *Cluster) LoseQuorum() []int {
	c.t.Helper()
	n := len(c.members)
	var stopped []int
	for i := range n - n/2 {
		stopped = append(stopped, i)
	}
	c.stop(true, c.members[:len(stopped)]...)
	return stopped
}

// Heal starts every stopped member and waits until the cluster has a
// leader again.
func (c *Cluster) Heal() {
	c.t.Helper()
	// Start waits for a member to serve, which needs a quorum: start them
	// all first, then wait for each.
	var started []*embed.Etcd
	c.mu.Lock()
	for i, m := range c.members {
		e, err := c.restart(m)
		if err != nil {
			c.mu.Unlock()
			c.t.Fatalf("etcdtest: starting member %d again: %v", i, err)
		}
		if e != nil {
			started = append(started, e)
		}
	}
	c.mu.Unlock()
	deadline := time.After(startTimeout)
	for _, e := range started {
		select {
		case <-e.Server.ReadyNotify():
		case err := <-e.Err():
			c.t.Fatalf("etcdtest: %v", err)
		case <-deadline:
			c.t.Fatalf("etcdtest: members not serving %v after healing", startTimeout)
		}
	}
	c.WaitLeader()
}

// Leader is the number of the member that leads, as every running member
// sees it, waiting up to 20 s for them to agree; it fails the test if they
// do not.
func (c *Cluster) Leader() int {
	c.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		if l, ok := c.agreedLeader(); ok {
			return l
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("etcdtest: no leader after %v", startTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WaitLeader waits until the running members agree on a leader that runs.
func (c *Cluster) WaitLeader() {
	c.t.Helper()
	c.Leader()
}

func (c *Cluster) agreedLeader() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	leader := -1
	var lead uint64
	for i, m := range c.members {
		if m.etcd == nil {
			continue
		}
		l := uint64(m.etcd.Server.Leader())
		if l == 0 || (lead != 0 && l != lead) {
			return 0, false
		}
		lead = l
		if uint64(m.etcd.Server.MemberID()) == l {
			leader = i
		}
	}
	return leader, leader >= 0
}

// Compact compacts the cluster's history up to rev (keeping rev itself),
// and waits until the member that took the request has removed what it
// compacted (the others apply it through raft before they answer a
// linearizable read): from then on, a read or watch from an earlier
// revision fails with rpctypes.ErrCompacted.
func (c *Cluster) Compact(rev int64) {
	c.t.Helper()
	cli, err := clientv3.New(c.ClientConfig(c.runningEndpoints()...))
	if err != nil {
		c.t.Fatalf("etcdtest: client: %v", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if _, err := cli.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		c.t.Fatalf("etcdtest: compacting to %d: %v", rev, err)
	}
}

func (c *Cluster) runningEndpoints() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, m := range c.members {
		if m.etcd != nil {
			out = append(out, m.clientURL.String())
		}
	}
	return out
}

// Close stops every member now, as Kill does; New has t's cleanup do it
// otherwise. Nothing may be called on c after.
func (c *Cluster) Close() { c.closeAll() }

// closeAll stops every member, as Kill does: no member waits to hand its
// leadership to the next one to stop; the cleanup of New.
func (c *Cluster) closeAll() {
	c.stop(true, c.members...)
}

// testLogger sends etcd's warnings and errors to t's log (shown when the
// test fails), and drops what is logged once t has ended: a server's
// goroutine may log after its Close returned, and t panics then.
func testLogger(t TB) *zap.Logger {
	w := &testWriter{t: t}
	t.Cleanup(w.end)
	enc := zap.NewDevelopmentEncoderConfig()
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(w), zap.WarnLevel)
	return zap.New(core)
}

// quietCore drops every entry while quiet is set.
type quietCore struct {
	zapcore.Core
	quiet *atomic.Bool
}

func (q quietCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if q.quiet.Load() {
		return ce
	}
	return q.Core.Check(e, ce)
}

func (q quietCore) With(fields []zapcore.Field) zapcore.Core {
	return quietCore{q.Core.With(fields), q.quiet}
}

// testWriter writes to t's log until end is called.
type testWriter struct {
	t     TB
	mu    sync.Mutex
	ended bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.ended {
		w.t.Log(clip(strings.TrimSuffix(string(p), "\n")))
	}
	return len(p), nil
}

// maxLine is the most of one logged line kept: etcd's warning of a slow
// request quotes the whole request, megabytes for a large transaction,
// and would bury the failure it came with.
const maxLine = 1000

func clip(line string) string {
	if len(line) <= maxLine {
		return line
	}
	return fmt.Sprintf("%s… (%d more bytes)", line[:maxLine], len(line)-maxLine)
}

func (w *testWriter) end() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ended = true
}
