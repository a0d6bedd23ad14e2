package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/hsm"
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
	// Reload receives a value when the policy and the GeoIP database
	// should be read again (SIGHUP).
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

// withDefaults fills in what o leaves out.
func (o Options) withDefaults() Options {
	if o.Log == nil {
		o.Log = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.KeysEvery <= 0 {
		o.KeysEvery = 5 * time.Minute
	}
	if o.CredentialsEvery <= 0 {
		o.CredentialsEvery = time.Minute
	}
	return o
}

// Run serves until ctx ends, then drains the calls in flight, stops the
// background tasks and waits for them, removes the socket and closes
// everything. It returns the first error that kept it from serving or from
// closing cleanly (a background task that failed stops it too); ExitCode
// says what kind it is.
//
// In order: assemble opens and builds every part (assemble.go); the
// background tasks start (keywardd's own jobs, jobs.go, and the rest
// below); the socket serves; and at the end the calls in flight drain
// before the tasks stop, since they still count usage, are watched for
// anomalies and queue plugin events.
func Run(ctx context.Context, cfg *Config, o Options) (err error) {
	o = o.withDefaults()
	if err := cfg.check(); err != nil {
		return err
	}
	d, err := assemble(ctx, cfg, o)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := d.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	bg := startTasks(append(d.tasks(), d.elect(d.jobs())...))
	d.log.Info("keywardd serving", "socket", d.ln.Path(), "token", d.h.Token().Label, "store", d.st.Path(), "audit", d.cfg.auditPath(), "version", d.o.Version)
	if d.o.Ready != nil {
		close(d.o.Ready) // the socket listens: calls wait in its backlog until Serve takes them
	}
	err = d.serve(ctx, bg.failed())
	if werr := bg.wait(); werr != nil {
		d.log.Error("a background task failed", "error", werr.Error())
		if err == nil {
			err = werr
		}
	}
	return err
}

// tasks are the background tasks that serve keywardd's callers, beside
// the socket: its health, the policy's reloads, the survey of names, the
// HTTP listeners.
func (d *daemonParts) tasks() []task {
	ts := []task{
		loop("health", d.srv.WatchHealth),
		loop("legacy names survey", func(ctx context.Context) { d.legacy.survey(ctx, d.km, d.akm, d.cm, d.cfg.Plugins, d.log) }),
		loop("policy reload", d.reloadPolicy),
	}
	if d.ship != nil {
		ts = append(ts, loop("audit shipping", d.ship.Run))
	}
	return append(ts, d.http...)
}

// reloadPolicy reads the policy, and the GeoIP database if there is one,
// again each time o.Reload says (SIGHUP), until ctx ends; one that does
// not parse leaves the one in force.
func (d *daemonParts) reloadPolicy(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.o.Reload:
			d.reloadGeo()
			p, err := loadPolicy(d.cfg.PolicyFile)
			if err != nil {
				d.log.Error("policy reload failed; the previous policy stays in force", "error", err.Error())
				continue
			}
			d.srv.SetPolicy(p)
			d.log.Info("policy reloaded", "file", d.cfg.PolicyFile)
			if why := cgroupsUnreadable(p, "/proc/self/cgroup"); why != "" {
				d.log.Warn(why, "policy", d.cfg.PolicyFile)
			}
		}
	}
}

// reloadGeo reads the GeoIP database again, if there is one; one that
// cannot be used leaves the one in use.
func (d *daemonParts) reloadGeo() {
	if d.geo == nil {
		return
	}
	if err := d.geo.Reload(); err != nil {
		d.log.Error("GeoIP database reload failed; the database before stays in use", "error", err.Error())
		return
	}
	d.log.Info("GeoIP database reloaded", "file", d.geo.Path(), "built", d.geo.Built().UTC().Format(time.RFC3339))
	if w := d.geo.Warning(); w != "" {
		d.log.Warn(w, "file", d.geo.Path())
	}
}

// serve serves the socket until ctx ends or failed is closed (a background
// task failed, or was stopped), then drains the calls in flight
// (DrainTimeout at most). Its error is the socket's, if it stopped serving
// by itself.
func (d *daemonParts) serve(ctx context.Context, failed <-chan struct{}) error {
	served := make(chan error, 1)
	go func() { served <- d.gs.Serve(d.ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
		d.log.Info("keywardd stopping: draining calls in flight")
	case <-failed: // Run returns its error
		d.log.Error("keywardd stopping: a background task failed; draining calls in flight")
	}
	drained := make(chan struct{})
	go func() { d.gs.GracefulStop(); close(drained) }()
	select {
	case <-drained:
		<-served
		return nil
	case <-time.After(d.o.DrainTimeout):
	}
	d.log.Warn("calls still running after the drain timeout; stopping them", "timeout", d.o.DrainTimeout.String())
	d.gs.Stop() // closes the connections; handlers still running (one stuck in the HSM) are not waited for
	select {
	case <-drained:
	case <-time.After(stopGrace):
		d.log.Error("calls still running after the connections closed; stopping without them (their answers are lost, and one that ends after the audit log closed is not audited; acts that cannot be undone are audited before they are done)", "waited", (d.o.DrainTimeout + stopGrace).String())
	}
	return nil
}

// stopGrace is how long Run waits, once the connections are closed, for
// handlers still running: gRPC's Stop does not wait for them, and one stuck
// in the HSM must not keep keywardd from its last flushes before systemd's
// stop timeout (30 s) kills it.
const stopGrace = 2 * time.Second
