package daemon

// How keywardd is put together: assemble opens and builds every part, in
// order, with a small constructor each; Run (run.go) then serves and runs
// the background tasks. A part that needs closing says so to onClose, and
// close closes them in the reverse order.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/appcrypto"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/audit/ship"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/dynlimits"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/events"
	"github.com/keyward/keyward/daemon/geo"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/leaks"
	"github.com/keyward/keyward/daemon/limitwin"
	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/daemon/socket"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/store/etcdstore"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/plugins/host"
)

// grpcServer is what Run needs of the gRPC server that server.New makes.
type grpcServer interface {
	Serve(net.Listener) error
	GracefulStop()
	Stop()
}

// daemonParts are keywardd's parts, as assemble made them.
type daemonParts struct {
	cfg *Config
	o   Options
	log *slog.Logger

	ln      *socket.Listener
	h       *hsm.HSM
	al      *audit.Log
	ship    *ship.Shipper // the audit sinks; nil without any
	st      stateStore
	feed    changeFeed  // what other nodes changed, for the caches (a fleet's)
	lead    *leadership // a fleet's election of the node that runs the jobs done once; nil on one host
	km      *keys.Manager
	tokens  *tokens.Service
	det     *anomaly.Detector   // nil unless anomaly.enabled
	geo     *geo.DB             // nil unless geoip.database is set
	gov     *dynlimits.Governor // nil unless dynamic_limits.enabled
	lw      *limitwin.Windows   // API keys' limit windows
	akm     *apikeys.Manager
	plugins []*host.Plugin
	env     *envelope.Service
	cm      *credentials.Manager
	ob      *outbox.Outbox
	hub     *events.Hub // the watch stream's
	sched   *schedule.Scheduler
	mx      *metrics.Metrics
	legacy  *legacyNames
	srv     *server.Server
	gs      grpcServer
	http    []task // the HTTP listeners' tasks: metrics, the JWKS

	closers []func() error
}

// onClose has close call fn, before what was opened earlier.
func (d *daemonParts) onClose(fn func() error) { d.closers = append(d.closers, fn) }

// close closes every part in the reverse order of opening, and returns the
// first error.
func (d *daemonParts) close() (err error) {
	for i := len(d.closers) - 1; i >= 0; i-- {
		if cerr := d.closers[i](); cerr != nil && err == nil {
			err = cerr
		}
	}
	d.closers = nil
	return err
}

// assemble opens and builds every part of keywardd, in order. On an error
// it closes what it opened.
func assemble(ctx context.Context, cfg *Config, o Options) (d *daemonParts, err error) {
	d = &daemonParts{cfg: cfg, o: o, log: o.Log}
	defer func() {
		if err != nil {
			d.close()
			d = nil
		}
	}()
	for _, step := range []func(context.Context) error{
		d.listen,     // the socket first: its lock makes a second keywardd stop at once
		d.openHSM,    //
		d.openAudit,  // before the store: its last line says how many writes the store made
		d.openStore,  //
		d.newKeys,    // keywardd's own keys made or adopted, and checked
		d.newAPIKeys, // with anomaly detection and dynamic limits if configured
		d.newPlugins, // and what uses them: managed credentials, the plugins' events
		d.newMetrics, //
		d.newServer,  //
		d.listenHTTP, // metrics and the JWKS, if configured
	} {
		if err := step(ctx); err != nil {
			return d, err
		}
	}
	return d, nil
}

func (d *daemonParts) listen(context.Context) error {
	so, err := d.cfg.socketOptions()
	if err != nil {
		return err
	}
	if d.ln, err = socket.Listen(so); err != nil {
		return listenError(err)
	}
	d.onClose(func() error { d.ln.Close(); return nil })
	return nil
}

func (d *daemonParts) openHSM(context.Context) (err error) {
	if err := os.MkdirAll(d.cfg.DataDir, 0o700); err != nil {
		return fileError(fmt.Errorf("data directory: %w", err))
	}
	if d.h, err = hsm.Open(d.cfg.hsmConfig()); err != nil {
		return err
	}
	d.onClose(d.h.Close)
	return nil
}

func (d *daemonParts) openAudit(context.Context) (err error) {
	d.al, err = audit.Open(d.cfg.auditPath(), d.h, AuditKey, audit.Options{Now: d.o.Now, Node: d.cfg.nodeName()})
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return configError(fmt.Errorf("%w: the audit log's checkpoints were MACed by %s, which this token (%s) does not have: is hsm.token the token keywardd used with this audit log?", err, AuditKey, d.h.Token().Label))
	}
	if err != nil {
		return fileError(err)
	}
	d.onClose(d.al.Close)
	if len(d.cfg.AuditSinks) == 0 {
		return nil
	}
	// The sinks read the log after it is written: their cursors are kept
	// beside the store, and they ship from when keywardd serves (tasks).
	d.ship, err = ship.New(d.cfg.AuditSinks, ship.Options{LogPath: d.cfg.auditPath(), Size: func() int64 { return d.al.State().Size },
		StateDir: filepath.Join(d.cfg.DataDir, "audit-sinks"), Log: d.log})
	if err != nil {
		return configError(fmt.Errorf("config: %w", err))
	}
	d.onClose(d.ship.Close)
	return nil
}

// auditLog is the audit log as the server sees it: with a sink whose
// failure policy is block, calls are refused (as when the log cannot be
// written) while that sink lags past its bound.
func (d *daemonParts) auditLog() server.AuditLog {
	if d.ship == nil {
		return d.al
	}
	return shippedAudit{d.al, d.ship}
}

// shippedAudit is the audit log and its sinks.
type shippedAudit struct {
	*audit.Log
	ship *ship.Shipper
}

// Err is why calls are refused: the log cannot be written, or a blocking
// sink is too far behind.
func (a shippedAudit) Err() error {
	if err := a.Log.Err(); err != nil {
		return err
	}
	if err := a.ship.Blocked(); err != nil {
		return fmt.Errorf("%w: %w", server.ErrAuditBehind, err)
	}
	return nil
}

// SetNotify has fn called when either may have changed.
func (a shippedAudit) SetNotify(fn func()) {
	a.Log.SetNotify(fn)
	a.ship.SetNotify(fn)
}

// shipMetrics are the audit sinks' metrics, read at each scrape.
// auditSinks are the audit sinks' states for GetStatus; nil without sinks.
func (d *daemonParts) auditSinks() []server.AuditSinkState {
	if d.ship == nil {
		return nil
	}
	var out []server.AuditSinkState
	for _, st := range d.ship.Status() {
		out = append(out, server.AuditSinkState(st))
	}
	return out
}

func (d *daemonParts) shipMetrics() []prometheus.Collector {
	if d.ship == nil {
		return nil
	}
	each := func(v func(ship.Status) float64) func() map[string]float64 {
		return func() map[string]float64 {
			out := map[string]float64{}
			for _, st := range d.ship.Status() {
				out[st.Name] = v(st)
			}
			return out
		}
	}
	return []prometheus.Collector{
		metrics.NewGaugeFunc("keyward_audit_sink_lag_bytes", "Bytes of the audit log a sink has not yet delivered.", "sink",
			each(func(st ship.Status) float64 { return float64(st.LagBytes) })),
		metrics.NewGaugeFunc("keyward_audit_sink_over_bound", "1 while a sink lags past its max_lag_bytes (on_failure: block refuses calls then).", "sink",
			each(func(st ship.Status) float64 { return map[bool]float64{true: 1}[st.OverBound] })),
		metrics.NewCounterVecFunc("keyward_audit_sink_records_total", "Records a sink delivered since keywardd started (stubs of filtered records not counted).", "sink",
			each(func(st ship.Status) float64 { return float64(st.Shipped) })),
		metrics.NewCounterVecFunc("keyward_audit_sink_filtered_total", "Records a sink's filter left out since keywardd started (shipped as stubs).", "sink",
			each(func(st ship.Status) float64 { return float64(st.Filtered) })),
		metrics.NewCounterVecFunc("keyward_audit_sink_failures_total", "Deliveries to a sink that failed (each is tried again).", "sink",
			each(func(st ship.Status) float64 { return float64(st.Failures) })),
	}
}

// stateStore is keywardd's state: a bbolt file (store.Store), or a fleet
// node's view of the state in etcd (fleetStore).
type stateStore interface {
	store.Backend
	Path() string
	SchemaVersion() (int, error)
}

func (d *daemonParts) openStore(ctx context.Context) (err error) {
	if e := d.cfg.Store.Etcd; e != nil {
		st, cli, closeAll, err := openFleetStore(ctx, d.cfg, d.h, d.al, &d.feed, d.log)
		if err != nil {
			return err
		}
		d.st = st
		d.onClose(closeAll)
		timeout := e.Timeout
		if timeout == 0 {
			timeout = etcdstore.DefaultTimeout
		}
		ttl := e.LeaderTTL
		if ttl == 0 {
			ttl = DefaultLeaderTTL
		}
		d.lead = &leadership{cli: cli, key: e.prefix() + "/leader", node: d.cfg.nodeName(), ttl: int(ttl / time.Second), timeout: timeout, log: d.log}
		d.lead.count(ctx)
		return nil
	}
	st, err := openStore(ctx, d.cfg, d.h, d.al, d.o, d.log)
	if err != nil {
		return fileError(err)
	}
	d.st = st
	d.onClose(st.Close)
	return nil
}

// newKeys makes the key manager, creates the keys that must exist, and
// uses keywardd's own once each.
func (d *daemonParts) newKeys(ctx context.Context) (err error) {
	tc := d.cfg.tokenConfig()
	d.km, err = keys.New(d.st, d.h, keys.Options{
		SignPrePublish: d.cfg.Tokens.PrePublish,
		// A retired signing version stays published while tokens it
		// signed can be valid: the longest lifetime plus the most leeway.
		SignKeepPublished: tc.MaxTTL + tokens.MaxLeeway,
		Now:               d.o.Now,
	})
	if err != nil {
		return err
	}
	d.feed.on(store.BucketKeys, func(c []etcdstore.Change) { d.km.Forget(keysOf(c)) })
	// keywardd's own keys are adopted if the HSM has them and the store
	// does not (a lost store): the audit key MACed the existing log, and
	// the pepper is what API keys restored from a backup are kept under.
	own := []keys.Spec{{Name: AuditKey.Name, Purpose: keys.MAC, Adopt: true}, {Name: PepperKey.Name, Purpose: keys.MAC, Adopt: true},
		{Name: CredentialsKey, Purpose: keys.Encrypt, Adopt: true}, {Name: StoreKey.Name, Purpose: keys.MAC, Adopt: true}}
	if err := ensureKeys(ctx, d.km, append(own, d.o.Keys...)); err != nil {
		return err
	}
	if err := checkOwnKeys(ctx, d.h, own); err != nil {
		return err
	}
	// Revocations other nodes make reach the set from the moment it is
	// made, so that none falls between the load and the feed.
	revoked := tokens.NewRevoked(d.st, d.o.Now)
	d.feed.on(store.BucketRevokedTokens, func(c []etcdstore.Change) {
		if c == nil { // the local copy was reloaded: read them all again (not from this goroutine)
			go func() {
				for pause := 100 * time.Millisecond; ; pause = min(2*pause, 5*time.Second) {
					err := revoked.Load()
					if err == nil || errors.Is(err, store.ErrClosed) {
						return
					}
					d.log.Warn("reading the revoked tokens again after the fleet's state was reloaded; trying again", "error", err, "after", pause.String())
					time.Sleep(pause)
				}
			}()
			return
		}
		recs := make(map[string][]byte, len(c))
		for _, ch := range c {
			recs[ch.Key] = ch.Rec
		}
		revoked.Apply(recs)
	})
	if err := revoked.Load(); err != nil {
		return err
	}
	d.tokens = tokens.NewService(tc, d.km, d.h, revoked, d.o.Now)
	return nil
}

// newAPIKeys makes the API key manager, with the anomaly detector and the
// load governor if they are on.
func (d *daemonParts) newAPIKeys(context.Context) (err error) {
	ako, err := d.cfg.apiKeyOptions()
	if err != nil {
		return err
	}
	ako.Now = d.o.Now
	if p := d.cfg.GeoIP.Database; p != "" {
		if d.geo, err = geo.Open(p); err != nil {
			return fmt.Errorf("geoip.database: %w", err)
		}
		if w := d.geo.Warning(); w != "" {
			d.log.Warn(w, "file", p)
		}
		ako.Geo = d.geo
	}
	if d.cfg.Anomaly.Enabled {
		d.det = anomaly.New(d.cfg.Anomaly, d.st)
	}
	if d.lw, err = limitwin.New(d.st, d.o.Now); err != nil {
		return err
	}
	for key, why := range d.lw.Bad() {
		d.log.Error("a limit window record does not parse: its windows are skipped, and the next write of its target replaces it", "key", key, "error", why)
	}
	if d.lead != nil {
		d.lw.Fed()
	}
	lw := d.lw
	ako.WindowFactor = func(rec *apikeys.Record, now time.Time) float64 {
		return lw.Factor(limitwin.Key{ID: rec.ID, Owner: rec.Owner, Environment: rec.Environment}, now)
	}
	if d.cfg.DynamicLimits.Enabled {
		var clean func(string, time.Time) bool
		if d.det != nil {
			clean = d.det.Clean
		}
		gov := dynlimits.New(d.cfg.DynamicLimits, clean)
		d.gov = gov
		ako.LimitFactor = func(rec *apikeys.Record, now time.Time) float64 { return gov.Factor(rec.ID, rec.Created, now) }
	}
	if d.lead != nil {
		ako.FleetNodes = d.lead.Nodes
	}
	d.akm, err = apikeys.NewManager(d.st, d.h, PepperKey, ako)
	if err != nil {
		return err
	}
	d.feed.on(store.BucketAPIKeys, func(c []etcdstore.Change) { d.akm.Forget(keysOf(c)) })
	d.feed.on(store.BucketSchedule, func(c []etcdstore.Change) {
		if c == nil {
			// Anything may have changed, and the feed may not read the
			// store: read it once the feed has gone on.
			go func() {
				if err := lw.Reload(); err != nil {
					d.log.Error("reloading the limit windows failed; they are as they were", "error", err.Error())
				}
			}()
			return
		}
		for _, ch := range c {
			if err := lw.Changed(ch.Key, ch.Rec); err != nil {
				d.log.Error("a limit window record from the fleet does not parse; the target's windows are as they were", "key", ch.Key, "error", err.Error())
			}
		}
	})
	return nil
}

// newPlugins starts the plugins, and makes what uses them: the envelope
// service, managed credentials, the plugins' events, the rotation
// schedule.
func (d *daemonParts) newPlugins(context.Context) (err error) {
	d.plugins = startPlugins(d.cfg.Plugins, d.log)
	d.onClose(func() error {
		for _, p := range d.plugins {
			p.Close()
		}
		return nil
	})
	d.env = envelope.New(d.km, d.h, envelope.Options{Decoy: hsm.KeyID{Name: CredentialsKey, Version: 1}})
	set := host.Set{}
	for _, p := range d.plugins {
		set[p.Status().Name] = p
	}
	d.cm = credentials.New(d.st, set, credentials.EnvelopeSealer{Envelope: d.env, Key: CredentialsKey}, d.o.Now)
	if d.ob, err = outbox.New(d.st, set, d.log, nil); err != nil {
		return err
	}
	// The watch stream reads the outbox, which keeps events for its
	// watchers to resume from.
	d.ob.KeepFor(d.cfg.Events.WithDefaults().Retention)
	d.hub = events.New(d.st, d.cfg.Events)
	// Events another node of a fleet wrote: the elected node delivers them
	// now rather than at its next round (Notify never waits), and the
	// watchers read them at once. On one host, the store says when it
	// wrote some.
	d.feed.on(store.BucketOutbox, func([]etcdstore.Change) { d.ob.Notify(); d.hub.Wake() })
	if st, ok := d.st.(interface{ OnEvents(func()) }); ok {
		st.OnEvents(d.hub.Wake)
	}
	d.sched = newScheduler(d.cfg, d.st, d.km, d.cm, d.akm, d.al, d.log, d.o.Now)
	return nil
}

// newMetrics makes the metrics (gauges.go) and has the HSM report to them
// and to the load governor.
func (d *daemonParts) newMetrics(context.Context) error {
	d.mx = metrics.New(server.Ops(), append(d.gauges(), d.shipMetrics()...)...)
	d.h.SetObserver(func(op string, took time.Duration, err error) {
		if errors.Is(err, hsm.ErrDecrypt) || errors.Is(err, hsm.ErrInvalidInput) || errors.Is(err, hsm.ErrKeyNotFound) {
			err = nil // the caller's input, not the HSM
		}
		d.mx.HSM(op, took, err)
		if d.gov != nil {
			d.gov.ObserveHSM(op, took)
		}
	})
	return nil
}

// newServer makes the gRPC server and what it serves.
func (d *daemonParts) newServer(context.Context) error {
	pol, err := loadPolicy(d.cfg.PolicyFile)
	if err != nil {
		return err
	}
	if why := cgroupsUnreadable(pol, "/proc/self/cgroup"); why != "" {
		d.log.Warn(why, "policy", d.cfg.PolicyFile)
	}
	if d.det != nil {
		// The anomaly detector hears of every verification of a live
		// secret, and refuses the use that sets off an alert whose action
		// stops the key (and those after it until the key is changed).
		d.akm.SetWatch(func(id string, ip netip.Addr, country string, learn bool) (apikeys.Code, string) {
			a, stop := d.det.Observe(id, ip, country, d.o.Now(), learn)
			if !stop {
				return "", ""
			}
			// The reason names the kind only: the caller may be the
			// attacker, and the baseline or the network are the audit
			// record's to tell.
			if a.Action == anomaly.ActionRevoke {
				return apikeys.Revoked, "anomaly: " + a.Kind + ": keywardd revokes the key; its owner has the details"
			}
			return apikeys.Disabled, "anomaly: " + a.Kind + ": keywardd disables the key; its owner has the details"
		})
	}
	d.legacy = &legacyNames{}
	cfg := d.cfg
	d.srv, d.gs = server.New(server.Config{
		HSM: hsmStatus{d.h}, Store: d.st, Keys: d.km, Envelope: d.env, Crypto: appcrypto.New(d.km, d.h, d.o.Now), Audit: d.auditLog(), AuditReader: d.al, Policy: pol, Credentials: d.cm, Metrics: d.mx,
		MaxBatch: cfg.MaxBatch, Version: d.o.Version, HealthEvery: d.o.HealthEvery,
		Tokens: d.tokens, APIKeys: d.akm, LimitWindows: d.lw, Now: d.o.Now, Schedule: d.sched, Notify: d.ob.Notify, Events: d.hub,
		Plugins:          func() []server.PluginState { return pluginStates(d.plugins, d.ob.Status()) },
		AuditSinks:       d.auditSinks,
		NamesToRename:    d.legacy.Counts,
		Fleet:            d.fleetInfo(),
		HandshakeTimeout: cfg.Connections.HandshakeTimeout, IdleTimeout: cfg.Connections.IdleTimeout, WriteTimeout: cfg.Connections.WriteTimeout,
	})
	return nil
}

// hsmStatus is the HSM as the server sees it.
type hsmStatus struct{ *hsm.HSM }

func (h hsmStatus) Token() server.TokenInfo {
	t := h.HSM.Token()
	return server.TokenInfo{Label: t.Label, Serial: t.Serial, Manufacturer: t.Manufacturer, Model: t.Model}
}

// listenHTTP opens the HTTP listeners configured: metrics on a loopback
// address and/or a Unix socket, nginx's auth_request endpoint on a Unix
// socket, the JWKS for verifiers elsewhere, the
// secret scanners' intake (leaks.http). They
// serve as tasks, from when keywardd serves.
func (d *daemonParts) listenHTTP(ctx context.Context) error {
	metricsServer := func() *http.Server {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", d.mx.Handler())
		return &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second, MaxHeaderBytes: 8 << 10}
	}
	if a := d.cfg.Metrics.Address; a != "" {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return listenError(fmt.Errorf("metrics.address: %w", err))
		}
		d.onClose(func() error { ln.Close(); return nil })
		d.log.Info("serving metrics", "at", "http://"+ln.Addr().String()+"/metrics")
		d.http = append(d.http, serveHTTP("metrics over HTTP", metricsServer(), ln, d.log))
	}
	if d.cfg.Metrics.Socket != "" {
		if err := d.serveOnSocket("metrics.socket", "metrics", "/metrics", d.cfg.metricsSocketOptions, metricsServer()); err != nil {
			return err
		}
	}
	if d.cfg.Gateway.HTTPSocket.Path != "" {
		if err := d.serveOnSocket("gateway.http_socket", "nginx's auth_request", server.AuthRequestPath, d.cfg.gatewaySocketOptions, d.srv.AuthRequest()); err != nil {
			return err
		}
	}
	if d.cfg.Tokens.HTTP.Address != "" {
		t, err := d.jwksHTTP()
		if err != nil {
			return err
		}
		d.http = append(d.http, t)
	}
	if d.cfg.Leaks.HTTP.Address != "" {
		ts, err := d.leaksHTTP(ctx)
		if err != nil {
			return err
		}
		d.http = append(d.http, ts...)
	}
	return nil
}

// serveOnSocket listens on the Unix socket opts gives (field names it in
// errors) and serves hs there (what, at path) as a task.
func (d *daemonParts) serveOnSocket(field, what, path string, opts func() (socket.Options, error), hs *http.Server) error {
	so, err := opts()
	if err != nil {
		return err
	}
	ln, err := socket.Listen(so)
	if err != nil {
		return listenError(fmt.Errorf("%s: %w", field, err))
	}
	d.onClose(func() error { ln.Close(); return nil })
	d.log.Info("serving "+what, "at", "unix:"+ln.Path()+" "+path)
	d.http = append(d.http, serveHTTP(what+" on a socket", hs, ln, d.log))
	return nil
}

// listenMaybeTLS listens on address: plain TCP, or TLS 1.3 if cert is set
// (LoadConfig refuses a non-loopback address without one). name is the
// configuration section, for errors.
func (d *daemonParts) listenMaybeTLS(name, address, cert, key string) (ln net.Listener, scheme string, tlsCfg *tls.Config, err error) {
	ln, err = net.Listen("tcp", address)
	if err != nil {
		return nil, "", nil, listenError(fmt.Errorf("%s: %w", name, err))
	}
	d.onClose(func() error { ln.Close(); return nil })
	if cert == "" {
		return ln, "http", nil, nil
	}
	c, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, "", nil, configError(fmt.Errorf("%s: %w", name, err))
	}
	tlsCfg = &tls.Config{Certificates: []tls.Certificate{c}, MinVersion: tls.VersionTLS13}
	return tls.NewListener(ln, tlsCfg), "https", tlsCfg, nil
}

// countedLeaks is the intake's Reporter, counting its reports in the
// metrics.
type countedLeaks struct {
	leaks.Reporter
	mx *metrics.Metrics
}

func (c countedLeaks) ReportLeak(ctx context.Context, presented string, l apikeys.Leak, allow func(id, owner string) error) (apikeys.LeakVerdict, error) {
	v, err := c.Reporter.ReportLeak(ctx, presented, l, allow)
	if err == nil {
		c.mx.Leak("scanner", v.TruePositive, v.Changed)
	}
	return v, err
}

// leaksHTTP opens the secret scanners' intake (package leaks) and the
// refresh of their public keys.
func (d *daemonParts) leaksHTTP(ctx context.Context) ([]task, error) {
	c := d.cfg.Leaks.WithDefaults()
	keys, err := leaks.NewKeys(ctx, c.PublicKeysFile, c.PublicKeysURL, d.log)
	if err != nil {
		return nil, configError(err) // it names leaks.public_keys_file
	}
	if keys.Len() == 0 {
		d.log.Error("the secret scanner's public keys could not be had yet; reports are refused until a refresh gets them", "url", c.PublicKeysURL)
	}
	ln, scheme, tlsCfg, err := d.listenMaybeTLS("leaks.http", c.HTTP.Address, c.HTTP.TLSCert, c.HTTP.TLSKey)
	if err != nil {
		return nil, err
	}
	in := leaks.New(leaks.Options{Keys: keys, Reporter: countedLeaks{d.akm, d.mx}, Audit: d.al, Caller: keywardd(), Log: d.log, Now: d.o.Now,
		MaxBody: c.MaxBody, ReplayWindow: *c.ReplayWindow, MaxInFlight: c.MaxInFlight})
	hs := &http.Server{Handler: in.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: time.Minute, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10, TLSConfig: tlsCfg}
	d.log.Info("taking secret scanning reports", "url", scheme+"://"+ln.Addr().String()+leaks.Path, "keys", keys.Len(), "action", c.Action)
	return []task{
		serveHTTP("the secret scanners' intake", hs, ln, d.log),
		loop("refreshing the secret scanners' keys", func(ctx context.Context) { keys.Run(ctx, c.RefreshEvery) }),
	}, nil
}

// jwksHTTP opens the HTTP listener for verifiers elsewhere: plain HTTP on
// loopback, TLS 1.3 otherwise (LoadConfig refuses a non-loopback address
// without a certificate).
func (d *daemonParts) jwksHTTP() (task, error) {
	h := d.cfg.Tokens.HTTP
	ln, scheme, tlsCfg, err := d.listenMaybeTLS("tokens.http", h.Address, h.TLSCert, h.TLSKey)
	if err != nil {
		return task{}, err
	}
	base := h.BaseURL
	if base == "" {
		base = scheme + "://" + ln.Addr().String()
	}
	pre := d.cfg.Tokens.PrePublish
	if pre == 0 {
		pre = 10 * time.Minute
	}
	hs := &http.Server{Handler: d.tokens.JWKSHandler(base, pre), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 8 << 10, TLSConfig: tlsCfg}
	d.log.Info("serving the JWKS", "url", base+"/.well-known/jwks.json")
	return serveHTTP("the JWKS over HTTP", hs, ln, d.log), nil
}

// openStore opens the store under the key derived from StoreKey (made in
// the HSM if it has none yet), refusing one behind the audit log unless the
// operator accepts it, which is then audited; from then on every audit
// line records the store's write count.
func openStore(ctx context.Context, cfg *Config, h *hsm.HSM, al *audit.Log, o Options, log *slog.Logger) (*store.Store, error) {
	path := filepath.Join(cfg.DataDir, "keyward.db")
	key, err := DeriveStoreKey(ctx, h)
	made := false
	if errors.Is(err, hsm.ErrKeyNotFound) {
		// A sealed store needs the key this token lacks: it is the wrong
		// token (or the key was lost); making a new key would help nothing.
		sealed, serr := store.Sealed(path, 0)
		if serr != nil {
			return nil, serr
		}
		if sealed {
			return nil, configError(fmt.Errorf("the store %s is sealed under the HSM key %s, which this token (%s) does not have: is hsm.token the token keywardd used with this store?", path, StoreKey, h.Token().Label))
		}
		if err = h.CreateKey(ctx, StoreKey, hsm.HMACSHA256); err == nil || errors.Is(err, hsm.ErrKeyExists) {
			made = true
			key, err = DeriveStoreKey(ctx, h)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("the store's key %s: %w", StoreKey, err)
	}
	acceptRollback := o.AcceptStoreRollback || marker(cfg.DataDir, AcceptRollbackFile, log)
	acceptUnsealed := o.AcceptUnsealedStore || marker(cfg.DataDir, AcceptUnsealedFile, log)
	acked := al.StoreWrites()
	// What the operator allowed is on record before it is done, or not done.
	before := func(act store.Act, had, acknowledged uint64) error {
		op, detail := "keywardd.AcceptStoreRollback", fmt.Sprintf("the operator accepted a store behind the audit log: it is at write %d where the audit log recorded write %d; every change recorded after that point in this log is undone; the store's count moves to %d", had, acknowledged, acknowledged+1)
		if act == store.Sealing {
			op, detail = "keywardd.AcceptUnsealedStore", "the operator accepted an unsealed store where this HSM token's keyward-store key shows a sealed one was: its records are sealed now as they are, unverified"
		}
		rec := audit.Record{Time: o.Now().UTC(), Op: op, Outcome: "ok", Caller: keywardd(), Detail: detail}
		if err := al.AppendBefore(ctx, rec); err != nil {
			return err
		}
		log.Warn(detail)
		return nil
	}
	st, err := store.Open(path, store.Options{Key: key, Acknowledged: acked, AcceptRollback: acceptRollback, AllowUnsealed: made || acceptUnsealed, Before: before})
	if err != nil {
		return nil, err
	}
	os.Remove(filepath.Join(cfg.DataDir, AcceptRollbackFile)) // for this start only
	os.Remove(filepath.Join(cfg.DataDir, AcceptUnsealedFile))
	st.OnDamage(func(detail string) {
		log.Error("keywardd's store stopped serving; see "+store.Runbook, "found", detail)
	})
	al.SetStoreWrites(st.Writes)
	return st, nil
}

// The files an operator puts in the data directory to say, for the next
// start only, what -accept-store-rollback and -accept-unsealed-store say
// (under systemd, where a flag is awkward to give once); keywardd removes
// them once the store is open.
const (
	AcceptRollbackFile = "accept-store-rollback"
	AcceptUnsealedFile = "accept-unsealed-store"
)

// marker reports whether dir/name is there and root's own, and writable by
// no one else: plugins run as keywardd's user, so a marker they could make
// would let them roll the store back. A keywardd that runs as root takes
// no marker (its plugins are root too): give it the flag instead.
func marker(dir, name string, log *slog.Logger) bool {
	fi, err := os.Lstat(filepath.Join(dir, name))
	if err != nil {
		return false
	}
	if why := markerRefused(fi, os.Geteuid(), name); why != "" {
		log.Error("ignoring "+name+": "+why, "file", filepath.Join(dir, name))
		return false
	}
	return true
}

// markerRefused says why a marker file fi is not taken by a keywardd
// running as euid, or "".
func markerRefused(fi os.FileInfo, euid int, name string) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case euid == 0:
		return "keywardd runs as root, and so do its plugins; start it once with -" + name + " instead"
	case !ok || !fi.Mode().IsRegular() || st.Uid != 0 || fi.Mode().Perm()&0o022 != 0:
		return "it must be a file of root's, writable by no one else (install -o root -m 0644 /dev/null ...)"
	}
	return ""
}

// DeriveStoreKey derives the key that authenticates the store's records
// from StoreKey in the HSM: it never leaves keywardd's memory.
func DeriveStoreKey(ctx context.Context, h *hsm.HSM) ([]byte, error) {
	return h.HMACSHA256(ctx, StoreKey, []byte("keyward store key v1"))
}

// startPlugins starts the configured plugins. One that fails to start is
// logged and keeps being retried with backoff; keywardd serves regardless,
// and GetStatus says where each plugin is.
func startPlugins(cfgs []PluginConfig, log *slog.Logger) []*host.Plugin {
	var out []*host.Plugin
	for _, c := range cfgs {
		p, err := host.Start(host.Config{Name: c.Name, Path: c.Path, SHA256: c.SHA256, Interpreter: c.Interpreter, InterpreterSHA256: c.InterpreterSHA256, InterpreterArgs: c.InterpreterArgs,
			Env: c.Env, CallTimeout: c.CallTimeout, Log: log})
		if err != nil {
			log.Error("a plugin did not start; it is retried with backoff", "plugin", c.Name, "error", err.Error())
		}
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

func pluginStates(ps []*host.Plugin, deliveries map[string]outbox.Status) []server.PluginState {
	out := make([]server.PluginState, 0, len(ps))
	for _, p := range ps {
		st := p.Status()
		d := deliveries[st.Name]
		s := server.PluginState{Name: st.Name, Version: st.Version, State: string(st.State), PID: st.PID, Launches: st.Launches, LastError: st.LastError, Since: st.Since,
			EventsPending: d.Pending, DeliveryError: d.LastError}
		for _, c := range st.Capabilities {
			s.Capabilities = append(s.Capabilities, strings.ToLower(strings.TrimPrefix(c.String(), "CAPABILITY_")))
		}
		out = append(out, s)
	}
	return out
}

// ensureKeys creates the keys that must exist.
func ensureKeys(ctx context.Context, km *keys.Manager, specs []keys.Spec) error {
	for _, s := range specs {
		if _, err := km.Get(s.Name); err == nil {
			continue
		} else if !errors.Is(err, keys.ErrNotFound) {
			return err
		}
		// Made meanwhile by another node of a fleet starting at once: the
		// same key, from the same spec.
		if _, err := km.Create(ctx, s); err != nil && !errors.Is(err, keys.ErrExists) {
			return fmt.Errorf("creating key %q: %w", s.Name, err)
		}
	}
	return nil
}

// checkOwnKeys uses version 1 of each of keywardd's own keys once, so that
// a key the HSM holds in a form keyward refuses (weaker than required, of
// another algorithm, or one of two under one label; the hsm package's
// refusal at connect) or a mechanism the token lacks stops the start, with
// the exit code of a permanent failure, rather than failing calls or
// checkpoints later. An encryption key is tried with a decryption that
// cannot authenticate: an encryption would use a nonce that keys' counts
// of encryptions under the version do not hold.
func checkOwnKeys(ctx context.Context, h *hsm.HSM, own []keys.Spec) error {
	msg := []byte("keywardd start check")
	for _, s := range own {
		id := hsm.KeyID{Name: s.Name, Version: 1}
		var err error
		switch s.Purpose {
		case keys.MAC:
			_, err = h.HMACSHA256(ctx, id, msg)
		case keys.Encrypt:
			if _, err = h.Decrypt(ctx, id, make([]byte, hsm.NonceSize), make([]byte, hsm.TagSize), nil); errors.Is(err, hsm.ErrDecrypt) {
				err = nil // the token tried it
			}
		default:
			err = fmt.Errorf("daemon: no check for purpose %q", s.Purpose)
		}
		if err != nil {
			return fmt.Errorf("keywardd's own key %s: %w", id, err)
		}
	}
	return nil
}

func loadPolicy(path string) (*policy.Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, configError(fmt.Errorf("policy: %w", err))
	}
	p, err := policy.Parse(b, server.Ops())
	if err != nil {
		return nil, configError(fmt.Errorf("%s: %w", path, err))
	}
	return p, nil
}

// cgroupsUnreadable is why the policy's cgroup selectors match nobody on
// this host (keywardd's own /proc/self/cgroup has no unified line: a
// cgroup v1-only host), or "" if they can match, or the policy has none.
func cgroupsUnreadable(p *policy.Policy, procSelfCgroup string) string {
	if !p.SelectsCgroups() {
		return ""
	}
	b, err := os.ReadFile(procSelfCgroup)
	if err == nil {
		_, err = identity.ParseCgroup(b)
	}
	if err != nil {
		return "the policy names callers by their cgroup, but this host's cgroups cannot be read (" + err.Error() + "): those selectors match no caller"
	}
	return ""
}
