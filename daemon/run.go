package daemon

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

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/load"
	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/daemon/socket"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/plugins/host"
)

// AuditKey is the HMAC key in the HSM that MACs the audit log's checkpoints.
var AuditKey = hsm.KeyID{Name: server.ReservedPrefix + "audit", Version: 1}

// PepperKey is the HMAC key in the HSM under which the store keeps API
// keys: lose it and every API key is lost with it.
var PepperKey = hsm.KeyID{Name: server.ReservedPrefix + "apikeys", Version: 1}

// CredentialsKey is the encryption key in the HSM that seals managed
// credentials' secrets.
var CredentialsKey = server.ReservedPrefix + "credentials"

// StoreKey is the HMAC key in the HSM from which keywardd derives the key
// that authenticates every record of its store: lose it and the store
// cannot be read.
var StoreKey = hsm.KeyID{Name: server.ReservedPrefix + "store", Version: 1}

// DefaultFlushEvery is how often API key usage and quotas are written.
const DefaultFlushEvery = 10 * time.Second

// Options are what Run takes besides the configuration.
type Options struct {
	Log *slog.Logger
	// Reload receives a value when the policy should be read again (SIGHUP).
	Reload <-chan struct{}
	// Ready, if set, is closed once the socket serves.
	Ready chan<- struct{}
	// Version is keywardd's version.
	Version string
	// Keys are created at start if missing (dev mode's default keys).
	Keys []keys.Spec
	// DrainTimeout bounds the wait for calls in flight at shutdown. Default 10 s.
	DrainTimeout time.Duration
	// HealthEvery is how often the HSM's health is checked. Default 5 s.
	HealthEvery time.Duration
	// Now is keywardd's clock: of the keys, API keys, tokens, credentials,
	// the rotation schedule, the audit log and the server (tests move it
	// by months, and jump it); nil is time.Now. Durations (timeouts,
	// latencies) are measured on the monotonic clock regardless.
	Now func() time.Time
	// CredentialsEvery is how often managed credentials are maintained
	// (pending rotations, overlaps' ends, periods). Default 1 minute.
	CredentialsEvery time.Duration
	// KeysEvery is how often keys past their deletion date are looked
	// for. Default 5 minutes.
	KeysEvery time.Duration
	// AcceptUnsealedStore seals a store of schema 6 or older although the
	// HSM's keyward-store key shows a sealed store was there before (an
	// old backup put back on purpose); see docs/operations.md.
	AcceptUnsealedStore bool
	// AcceptStoreRollback serves a store older than the last write the
	// audit log records (an operator restored a backup on purpose); the
	// acceptance is audited. See docs/operations.md, "Restoring the store".
	AcceptStoreRollback bool
}

// Run serves until ctx ends, then drains the calls in flight, removes the
// socket and closes everything. It returns the first error that kept it from
// serving or from closing cleanly; ExitCode says what kind it is.
func Run(ctx context.Context, cfg *Config, o Options) (err error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if err := cfg.check(); err != nil {
		return err
	}
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			if cerr := closers[i](); cerr != nil && err == nil {
				err = cerr
			}
		}
	}()

	// The socket first: its lock makes a second keywardd stop at once.
	sockOpts, err := cfg.socketOptions()
	if err != nil {
		return err
	}
	ln, err := socket.Listen(sockOpts)
	if err != nil {
		return listenError(err)
	}
	closers = append(closers, func() error { ln.Close(); return nil })

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fileError(fmt.Errorf("data directory: %w", err))
	}
	h, err := hsm.Open(cfg.hsmConfig())
	if err != nil {
		return err
	}
	closers = append(closers, h.Close)
	// The audit log before the store: its last line says how many writes
	// the store had made, and a store with fewer is an older copy.
	al, err := audit.Open(cfg.auditPath(), h, AuditKey, audit.Options{Now: o.Now})
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return configError(fmt.Errorf("%w: the audit log's checkpoints were MACed by %s, which this token (%s) does not have: is hsm.token the token keywardd used with this audit log?", err, AuditKey, h.Token().Label))
	}
	if err != nil {
		return fileError(err)
	}
	closers = append(closers, al.Close)
	st, err := openStore(ctx, cfg, h, al, o, log)
	if err != nil {
		return fileError(err)
	}
	closers = append(closers, st.Close)

	tc := cfg.tokenConfig()
	km, err := keys.New(st, h, keys.Options{
		SignPrePublish: cfg.Tokens.PrePublish,
		// A retired signing version stays published while tokens it
		// signed can be valid: the longest lifetime plus the most leeway.
		SignKeepPublished: tc.MaxTTL + tokens.MaxLeeway,
		Now:               o.Now,
	})
	if err != nil {
		return err
	}
	// keywardd's own keys are adopted if the HSM has them and the store
	// does not (a lost store): the audit key MACed the existing log, and
	// the pepper is what API keys restored from a backup are kept under.
	own := []keys.Spec{{Name: AuditKey.Name, Purpose: keys.MAC, Adopt: true}, {Name: PepperKey.Name, Purpose: keys.MAC, Adopt: true},
		{Name: CredentialsKey, Purpose: keys.Encrypt, Adopt: true}, {Name: StoreKey.Name, Purpose: keys.MAC, Adopt: true}}
	if err := ensureKeys(ctx, km, append(own, o.Keys...)); err != nil {
		return err
	}
	if err := checkOwnKeys(ctx, h, own); err != nil {
		return err
	}

	pol, err := loadPolicy(cfg.PolicyFile)
	if err != nil {
		return err
	}
	revoked, err := tokens.LoadRevoked(st, o.Now)
	if err != nil {
		return err
	}
	ako, err := cfg.apiKeyOptions()
	if err != nil {
		return err
	}
	ako.Now = o.Now
	var det *anomaly.Detector
	if cfg.Anomaly.Enabled {
		det = anomaly.New(cfg.Anomaly, st)
	}
	var gov *load.Governor
	if cfg.DynamicLimits.Enabled {
		var clean func(string, time.Time) bool
		if det != nil {
			clean = det.Clean
		}
		gov = load.New(cfg.DynamicLimits, clean)
		ako.LimitFactor = func(rec *apikeys.Record, now time.Time) float64 { return gov.Factor(rec.ID, rec.Created, now) }
	}
	akm, err := apikeys.NewManager(st, h, PepperKey, ako)
	if err != nil {
		return err
	}
	// Usage and quotas are written every so often, and once more before
	// the store closes.
	flushCtx, stopFlush := context.WithCancel(context.Background())
	flushed := make(chan struct{})
	every := cfg.APIKeys.FlushEvery
	if every == 0 {
		every = DefaultFlushEvery
	}
	go func() {
		defer close(flushed)
		akm.RunFlusher(flushCtx, every, func(err error) {
			log.Error("writing API key usage failed; it is kept and retried", "error", err.Error())
		})
	}()
	closers = append(closers, func() error { stopFlush(); <-flushed; return nil })
	plugins := startPlugins(cfg.Plugins, log)
	closers = append(closers, func() error {
		for _, p := range plugins {
			p.Close()
		}
		return nil
	})
	env := envelope.New(km, h, envelope.Options{Decoy: hsm.KeyID{Name: CredentialsKey, Version: 1}})
	set := host.Set{}
	for _, p := range plugins {
		set[p.Status().Name] = p
	}
	cm := credentials.New(st, set, credentials.EnvelopeSealer{Envelope: env, Key: CredentialsKey}, o.Now)
	ob, err := outbox.New(st, set, log, nil)
	if err != nil {
		return err
	}
	sched := newScheduler(cfg, st, km, cm, akm, al, log, o.Now)
	mx := metrics.New(server.Ops(),
		metrics.NewCounterFunc("keyward_apikey_anomaly_alerts_dropped_total", "Anomaly alerts lost because more than 1024 were waiting to be handled.", func() float64 {
			if det == nil {
				return 0
			}
			return float64(det.Dropped())
		}),
		metrics.NewCounterFunc("keyward_apikey_anomaly_read_errors_total", "API key uses not watched because the key's stored baseline could not be read.", func() float64 {
			if det == nil {
				return 0
			}
			return float64(det.ReadErrors())
		}),
		metrics.NewValueFunc("keyward_rate_limit_factor", "How API keys' rate limits are scaled now: 1, or dynamic_limits.tighten while keywardd is overloaded.", func() float64 {
			if gov == nil {
				return 1
			}
			return gov.Gauge()
		}),
		metrics.NewGaugeFunc("keyward_rotations_overdue", "Keys, API keys and credentials past their rotation date by more than two checks.", "kind", func() map[string]float64 {
			out := map[string]float64{}
			for k, n := range sched.Overdue() {
				out[string(k)] = float64(n)
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_key_version_age_seconds", "Age of each key's newest version: compare with its rotation period.", "key", func() map[string]float64 {
			out := map[string]float64{}
			all, _ := km.List()
			for _, k := range all {
				if n := len(k.Versions); n > 0 {
					out[k.Name] = o.Now().Sub(k.Versions[n-1].Created).Seconds()
				}
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_plugin_up", "1 while a plugin runs, 0 while it starts, restarts or is refused.", "plugin", func() map[string]float64 {
			out := map[string]float64{}
			for _, p := range plugins {
				st := p.Status()
				out[st.Name] = map[bool]float64{true: 1, false: 0}[st.State == host.Running]
			}
			return out
		}),
		metrics.NewGaugeFunc("keyward_plugin_events_pending", "Revocation events waiting to be delivered to a plugin.", "plugin", func() map[string]float64 {
			out := map[string]float64{}
			for name, st := range ob.Status() {
				out[name] = float64(st.Pending)
			}
			return out
		}),
	)
	h.SetObserver(func(op string, took time.Duration, err error) {
		if errors.Is(err, hsm.ErrDecrypt) || errors.Is(err, hsm.ErrInvalidInput) || errors.Is(err, hsm.ErrKeyNotFound) {
			err = nil // the caller's input, not the HSM
		}
		mx.HSM(op, took, err)
		if gov != nil {
			gov.ObserveHSM(op, took)
		}
	})

	if cfg.Metrics.Address != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Address)
		if err != nil {
			return listenError(fmt.Errorf("metrics.address: %w", err))
		}
		closers = append(closers, serveMetrics(ln, "http://"+ln.Addr().String()+"/metrics", mx, log))
	}
	if cfg.Metrics.Socket != "" {
		so, err := cfg.metricsSocketOptions()
		if err != nil {
			return err
		}
		ln, err := socket.Listen(so)
		if err != nil {
			return listenError(fmt.Errorf("metrics.socket: %w", err))
		}
		closers = append(closers, serveMetrics(ln, "unix:"+ln.Path()+" /metrics", mx, log))
	}
	var observed func(string, netip.Addr, bool)
	if det != nil {
		observed = func(id string, ip netip.Addr, learn bool) { det.Observe(id, ip, o.Now(), learn) }
		done := make(chan struct{})
		actx, stopAnomaly := context.WithCancel(context.Background())
		go func() {
			defer close(done)
			watchAnomalies(actx, det, akm, al, mx, ob.Notify, log, cfg.Anomaly.FlushEvery, o.Now)
		}()
		closers = append(closers, func() error { stopAnomaly(); <-done; return det.Flush() })
	}
	legacy := &legacyNames{}
	srv, gs := server.New(server.Config{
		HSM: h, Store: st, Keys: km, Envelope: env, Audit: al, Policy: pol, Credentials: cm, Metrics: mx,
		MaxBatch: cfg.MaxBatch, Version: o.Version, HealthEvery: o.HealthEvery,
		Tokens: tc, Revoked: revoked, APIKeys: akm, Now: o.Now, Schedule: sched, Notify: ob.Notify, Observed: observed, Plugins: func() []server.PluginState { return pluginStates(plugins, ob.Status()) },
		NamesToRename:    legacy.Counts,
		HandshakeTimeout: cfg.Connections.HandshakeTimeout, IdleTimeout: cfg.Connections.IdleTimeout, WriteTimeout: cfg.Connections.WriteTimeout,
	})
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	go srv.WatchHealth(bg)
	go legacy.survey(bg, km, akm, cm, cfg.Plugins, log)
	if o.KeysEvery <= 0 {
		o.KeysEvery = 5 * time.Minute
	}
	go maintainKeys(bg, km, al, log, newClockWatch(o.Now), o.KeysEvery)
	if gov != nil {
		go watchLoad(bg, gov, log)
	}
	go sched.Run(bg, checkEvery(&cfg.Rotation), func(err error) { log.Error("scheduled rotation", "error", err.Error()) })
	if o.CredentialsEvery <= 0 {
		o.CredentialsEvery = time.Minute
	}
	go maintainCredentials(bg, cm, al, log, o.CredentialsEvery, o.Now)
	go ob.Run(bg, time.Second)
	go func() {
		t := time.NewTicker(time.Hour)
		defer t.Stop()
		clock := newClockWatch(o.Now)
		for {
			select {
			case <-bg.Done():
				return
			case <-t.C:
				if !clock.steady(log, "expired token revocations") {
					continue
				}
				if _, err := revoked.Sweep(); err != nil {
					log.Error("forgetting expired token revocations failed", "error", err.Error())
				}
			}
		}
	}()
	go func() {
		for {
			select {
			case <-bg.Done():
				return
			case <-o.Reload:
				p, err := loadPolicy(cfg.PolicyFile)
				if err != nil {
					log.Error("policy reload failed; the previous policy stays in force", "error", err.Error())
					continue
				}
				srv.SetPolicy(p)
				log.Info("policy reloaded", "file", cfg.PolicyFile)
			}
		}
	}()

	if cfg.Tokens.HTTP.Address != "" {
		stopHTTP, err := serveJWKS(cfg, srv, log)
		if err != nil {
			return err
		}
		closers = append(closers, stopHTTP)
	}
	served := make(chan error, 1)
	go func() { served <- gs.Serve(ln) }()
	log.Info("keywardd serving", "socket", ln.Path(), "token", h.Token().Label, "store", st.Path(), "audit", cfg.auditPath(), "version", o.Version)
	if o.Ready != nil {
		close(o.Ready)
	}
	select {
	case err := <-served:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
	}
	log.Info("keywardd stopping: draining calls in flight")
	drained := make(chan struct{})
	go func() { gs.GracefulStop(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(o.DrainTimeout):
		log.Warn("calls still running after the drain timeout; stopping them", "timeout", o.DrainTimeout.String())
		gs.Stop()
	}
	return nil
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
		p, err := host.Start(host.Config{Name: c.Name, Path: c.Path, SHA256: c.SHA256, Env: c.Env, CallTimeout: c.CallTimeout, Log: log})
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
		if _, err := km.Create(ctx, s); err != nil {
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

// maintainKeys deletes keys whose deletion date passed, every few minutes
// (every). Each deletion is audited before it happens; one that cannot be
// audited waits. A deletion cannot be undone, so it waits until the clock
// has been steady (clock) for steadyLooks looks: a clock run ahead for a
// while and set right again destroys nothing early.
func maintainKeys(ctx context.Context, km *keys.Manager, al *audit.Log, log *slog.Logger, clock *clockWatch, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		due, err := km.DueForDeletion()
		if err != nil {
			log.Error("listing keys past their deletion date failed", "error", err.Error())
		}
		if !clock.steady(log, "keys past their deletion date") {
			due = nil
		}
		for _, name := range due {
			rec := audit.Record{Time: clock.wall().UTC(), Op: "keywardd.DeleteKey", Key: name, Outcome: "ok",
				Caller: keywardd(),
				Detail: "its deletion date passed: destroying every version in the HSM"}
			if err := al.AppendBefore(ctx, rec); err != nil {
				log.Error("not deleting a key: its deletion cannot be audited", "key", name, "error", err.Error())
				continue
			}
			if done, err := km.DeleteDue(ctx, name); err != nil {
				log.Error("deleting a key failed", "key", name, "error", err.Error())
			} else if done {
				log.Info("key deleted", "key", name)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// maintainCredentials does what is due for managed credentials every
// minute: resumes pending rotations, retires previous versions after their
// overlap, rotates those whose period passed, finishes revocations. Each is
// audited with its outcome.
func maintainCredentials(ctx context.Context, cm *credentials.Manager, al *audit.Log, log *slog.Logger, every time.Duration, now func() time.Time) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		done, err := cm.Maintain(ctx)
		if err != nil {
			log.Error("listing managed credentials failed", "error", err.Error())
		}
		for name, err := range done {
			rec := audit.Record{Time: now().UTC(), Op: "keywardd.MaintainCredential", Key: name, Outcome: "ok",
				Caller: keywardd(),
				Detail: "due: a pending rotation, a rotation period, an overlap's end or a revocation"}
			if err != nil {
				rec.Outcome, rec.Detail = "error", err.Error()
				log.Error("managed credential maintenance failed; it is retried", "credential", name, "error", err.Error())
			}
			if aerr := al.Append(ctx, rec); aerr != nil {
				log.Error("auditing credential maintenance failed", "credential", name, "error", aerr.Error())
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// serveMetrics serves /metrics on ln (a loopback address or a Unix
// socket) until the returned func stops it.
func serveMetrics(ln net.Listener, where string, mx *metrics.Metrics, log *slog.Logger) func() error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", mx.Handler())
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second, MaxHeaderBytes: 8 << 10}
	go hs.Serve(ln)
	log.Info("serving metrics", "at", where)
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return hs.Shutdown(ctx)
	}
}

// serveJWKS starts the HTTP listener for verifiers elsewhere: plain HTTP on
// loopback, TLS 1.3 otherwise (LoadConfig refuses a non-loopback address
// without a certificate).
func serveJWKS(cfg *Config, srv *server.Server, log *slog.Logger) (func() error, error) {
	h := cfg.Tokens.HTTP
	ln, err := net.Listen("tcp", h.Address)
	if err != nil {
		return nil, listenError(fmt.Errorf("tokens.http: %w", err))
	}
	scheme := "http"
	var tlsCfg *tls.Config
	if h.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(h.TLSCert, h.TLSKey)
		if err != nil {
			ln.Close()
			return nil, configError(fmt.Errorf("tokens.http: %w", err))
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
		ln = tls.NewListener(ln, tlsCfg)
		scheme = "https"
	}
	base := h.BaseURL
	if base == "" {
		base = scheme + "://" + ln.Addr().String()
	}
	pre := cfg.Tokens.PrePublish
	if pre == 0 {
		pre = 10 * time.Minute
	}
	hs := &http.Server{Handler: srv.JWKSHandler(base, pre), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 8 << 10, TLSConfig: tlsCfg}
	go hs.Serve(ln)
	log.Info("serving the JWKS", "url", base+"/.well-known/jwks.json")
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return hs.Shutdown(ctx)
	}, nil
}
