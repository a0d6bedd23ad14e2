package daemon

// keywardd's own jobs: what it does in the background, unasked. Each is a
// task (tasks.go) that Run starts once keywardd serves and stops, and
// waits for, once the calls in flight have drained. Every job that changes
// something audits it as keywardd.<Op>, with caller "keywardd"; one that
// cannot be undone (a key's deletion, a scheduled rotation) is audited
// before it is done, and not done if it cannot be.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/dynlimits"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/limitwin"
	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/daemon/outbox"
	"github.com/keyward/keyward/daemon/tokens"
)

// jobs are keywardd's own jobs, in one table: what each does, how often,
// and which run on one node of a fleet at a time (once: the elected one,
// fleet.go).
func (d *daemonParts) jobs() []task {
	log, now := d.log, d.o.Now
	keyClock, sweepClock := newClockWatch(now), newClockWatch(now)
	flushEvery := d.cfg.APIKeys.FlushEvery
	if flushEvery == 0 {
		flushEvery = DefaultFlushEvery
	}
	windowsAudited := map[string]string{}
	ts := []task{
		// Keys past their deletion date: destroyed in the HSM (audited first).
		once(every("key deletions", d.o.KeysEvery, func(ctx context.Context) { deleteDueKeys(ctx, d.km, d.al, log, keyClock) })),
		// Managed credentials: pending rotations, overlaps' ends, periods, revocations.
		once(every("credential maintenance", d.o.CredentialsEvery, func(ctx context.Context) { maintainCredentials(ctx, d.cm, d.al, log, now) })),
		// Keys, API keys and credentials due by their rotation policies (scheduled.go).
		once(loop("scheduled rotation", func(ctx context.Context) {
			d.sched.Run(ctx, checkEvery(&d.cfg.Rotation), func(err error) { log.Error("scheduled rotation", "error", err.Error()) })
		})),
		// Token revocations past the tokens' expiry: forgotten.
		once(every("token revocation sweep", time.Hour, func(context.Context) { sweepRevocations(d.tokens, log, sweepClock) })),
		// Bulk revocations cut short: finished from their recorded intents
		// (on one host, every one this process does not run; on a fleet,
		// those untouched for a minute, as one may be under way on another
		// node).
		once(every("unfinished bulk revocations", time.Minute, func(ctx context.Context) {
			cutoff := now()
			if d.lead != nil {
				cutoff = cutoff.Add(-time.Minute)
			}
			resumeRevocations(ctx, d.akm, d.srv.Owners, d.al, log, now, cutoff)
		})),
		// API keys entering their last days: an api_key_expiring event
		// each, for the watch stream and the plugins.
		once(every("expiring API keys", 10*time.Minute, func(ctx context.Context) {
			noticeExpiring(ctx, d.akm, d.al, log, now, d.cfg.Events.WithDefaults().ExpiringWithin)
		})),
		// API keys' limit windows: each start and end audited once (each
		// applies on time by itself: limitwin).
		once(every("limit windows", time.Second, func(ctx context.Context) { noticeWindows(ctx, d.lw, d.al, log, now, windowsAudited) })),
		// Ended limit windows out of what verifications look at, on
		// every node.
		every("limit windows in memory", time.Second, func(context.Context) { d.lw.Tidy() }),
		// Revocation events delivered to the plugins (outbox).
		once(loop("plugin events", func(ctx context.Context) { d.ob.Run(ctx, time.Second) })),
		// The rest runs on every node of a fleet, on what the node sees.
		// API key usage and quotas written, and once more at the end.
		loop("API key usage", func(ctx context.Context) {
			d.akm.RunFlusher(ctx, flushEvery, func(err error) {
				log.Error("writing API key usage failed; it is kept and retried", "error", err.Error())
			})
		}),
	}
	if d.det != nil {
		// Anomalies acted on (a key disabled where configured), baselines
		// written, and once more at the end.
		ts = append(ts, task{name: "anomaly response", run: func(ctx context.Context) error {
			watchAnomalies(ctx, d.det, d.akm, d.al, d.mx, d.ob.Notify, log, d.cfg.Anomaly.FlushEvery, now)
			return d.det.Flush()
		}})
	}
	if d.gov != nil {
		ts = append(ts, loop("load watch", func(ctx context.Context) { watchLoad(ctx, d.gov, log) }))
	}
	return ts
}

// deleteDueKeys deletes keys whose deletion date passed. Each deletion is
// audited before it happens; one that cannot be audited waits. A deletion
// cannot be undone, so it waits until the clock has been steady (clock) for
// steadyLooks looks: a clock run ahead for a while and set right again
// destroys nothing early.
func deleteDueKeys(ctx context.Context, km *keys.Manager, al *audit.Log, log *slog.Logger, clock *clockWatch) {
	due, err := km.DueForDeletion()
	if err != nil {
		log.Error("listing keys past their deletion date failed", "error", err.Error())
	}
	if !clock.steady(log, "keys past their deletion date") {
		return
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
}

// resumeRevocations finishes the bulk revocations cut short, untouched
// since cutoff, each audited with its outcome.
func resumeRevocations(ctx context.Context, akm *apikeys.Manager, reach func(json.RawMessage) (func(string) bool, error),
	al *audit.Log, log *slog.Logger, now func() time.Time, cutoff time.Time) {
	done, err := akm.ResumeRevocations(cutoff, reach)
	if err != nil {
		log.Error("reading the bulk revocations under way failed", "error", err.Error())
	}
	for _, r := range done {
		rec := audit.Record{Time: now().UTC(), Op: "keywardd.RevokeAPIKeys", Outcome: "ok", Caller: keywardd(), Items: r.Revoked, Detail: r.String()}
		if r.Err != nil {
			rec.Outcome, rec.Detail = "error", r.String()+": "+r.Err.Error()
			log.Error("finishing a bulk revocation cut short failed; it is retried", "intent", r.Intent, "revoked", r.Revoked, "error", r.Err.Error())
		} else {
			log.Warn("a bulk revocation cut short was finished", "intent", r.Intent, "revoked", r.Revoked)
		}
		if aerr := al.Append(ctx, rec); aerr != nil {
			log.Error("auditing a resumed bulk revocation failed", "intent", r.Intent, "error", aerr.Error())
		}
	}
}

// maintainCredentials does what is due for managed credentials: resumes
// pending rotations, retires previous versions after their overlap,
// rotates those whose period passed, finishes revocations. Each is audited
// with its outcome.
func maintainCredentials(ctx context.Context, cm *credentials.Manager, al *audit.Log, log *slog.Logger, now func() time.Time) {
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
}

// sweepRevocations forgets the revocations of tokens past their expiry,
// once the clock has been steady.
func sweepRevocations(revoked *tokens.Service, log *slog.Logger, clock *clockWatch) {
	if !clock.steady(log, "expired token revocations") {
		return
	}
	if _, err := revoked.Sweep(); err != nil {
		log.Error("forgetting expired token revocations failed", "error", err.Error())
	}
}

// watchAnomalies acts on the detector's alerts until ctx ends: the key is
// revoked or disabled first if the configuration says so, with its event
// for the plugins in the same transaction, then the alert is audited,
// logged and counted. An action that fails (the store cannot be written,
// a fleet's etcd has lost its quorum) is tried again, from a second apart
// up to a minute apart, until it is done; meanwhile this node refuses the
// key (the detector's Stopped). Baselines are written every flushEvery.
func watchAnomalies(ctx context.Context, det *anomaly.Detector, akm *apikeys.Manager, al *audit.Log, mx *metrics.Metrics, notify func(), log *slog.Logger, flushEvery time.Duration, now func() time.Time) {
	if flushEvery <= 0 {
		flushEvery = time.Minute
	}
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	type action struct {
		anomaly.Alert
		revoked bool // its revocation was done; the event and audit were not
	}
	pending := map[string]action{} // actions that failed, by key
	backoff := time.Duration(0)
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	handle := func(p action, again bool) {
		a := p.Alert
		detail, disabled, revoked, err := actOnAnomaly(akm, a, p.revoked)
		switch {
		case err != nil && again:
			// Audited once, when it first failed; logged each time.
			pending[a.KeyID] = action{a, revoked}
			log.Error("acting on an API key anomaly failed again; this node refuses the key meanwhile", "key_id", a.KeyID, "kind", a.Kind, "error", err.Error())
			return
		case err != nil:
			pending[a.KeyID] = action{a, revoked}
			detail += "; acting on it failed, nothing was disabled or revoked yet: keywardd tries again until it is done, and this node refuses the key meanwhile: " + err.Error()
		default:
			delete(pending, a.KeyID)
			if a.Stops() {
				det.Settle(a.KeyID) // the store refuses it now
			}
			if again {
				detail += " (on a later try: the first failed)"
			}
		}
		rec := audit.Record{Time: now().UTC(), Op: "keywardd.APIKeyAnomaly", Key: a.KeyID, Outcome: "ok", Detail: detail,
			Caller: keywardd()}
		if err != nil {
			rec.Outcome = "error"
		}
		if aerr := al.Append(ctx, rec); aerr != nil {
			log.Error("auditing an API key anomaly failed", "key_id", a.KeyID, "error", aerr.Error())
		}
		if !again || err == nil {
			log.Warn("API key anomaly", "key_id", a.KeyID, "kind", a.Kind, "disabled", disabled, "detail", detail)
		}
		if !again {
			mx.Anomaly(a.Kind, disabled)
		}
		notify()
	}
	schedule := func() {
		if len(pending) == 0 {
			backoff = 0
			return
		}
		backoff = min(max(2*backoff, time.Second), time.Minute)
		retry.Reset(backoff)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := det.Flush(); err != nil {
				log.Error("writing API key baselines failed; they are kept and retried", "error", err.Error())
			}
		case a := <-det.Alerts():
			if p, waiting := pending[a.KeyID]; waiting && a.Stops() {
				// Already being tried; the newer alert's action is tried
				// in its place (a revoke after a disable, say).
				pending[a.KeyID] = action{a, p.revoked}
				continue
			}
			handle(action{Alert: a}, false)
			if len(pending) > 0 && backoff == 0 {
				schedule()
			}
		case <-retry.C:
			for _, a := range pending {
				handle(a, true)
			}
			schedule()
		}
	}
}

// actOnAnomaly does what the configuration says to a's key, and says what
// it did for the audit record. revokedBefore: an earlier try revoked the
// key, and failed after.
func actOnAnomaly(akm *apikeys.Manager, a anomaly.Alert, revokedBefore bool) (detail string, disabled, revoked bool, err error) {
	seen := a.Kind + ": " + a.Detail
	var disabling bool
	revoking := revokedBefore
	// A revocation first, in its own transaction with its event for the
	// plugins: should the anomaly's event fail after it, the key is
	// revoked all the same (fail closed), and the failure logged.
	var revokeErr error
	if a.Action == anomaly.ActionRevoke && !revokedBefore {
		if r, err := akm.Get(a.KeyID); err == nil && r.State != apikeys.StateRevoked {
			_, revokeErr = akm.Revoke(a.KeyID)
			revoking = revokeErr == nil
		} else if err != nil && !errors.Is(err, apikeys.ErrNotFound) {
			revokeErr = err
		}
	}
	_, err = akm.Notice(a.KeyID, outbox.Anomaly, a.KeyID, seen, func(r *apikeys.Record) (string, error) {
		disabling = false
		switch {
		case a.Action == anomaly.ActionRevoke && revoking:
			return fmt.Sprintf("; keywardd revoked the key (anomaly.revoke names %s)", a.Kind), nil
		case a.Action == anomaly.ActionRevoke && revokeErr != nil:
			return "; revoking it failed: " + revokeErr.Error(), nil
		case a.Action == anomaly.ActionDisable && r.State == apikeys.Active:
			r.State, disabling = apikeys.StateDisabled, true
			return fmt.Sprintf("; keywardd disabled the key (keyward apikey update -id %s -enable, once it is understood)", a.KeyID), nil
		case a.Stops():
			return "; the key was not active, so nothing was done to it", nil
		}
		return "; alert only (anomaly.disable and anomaly.revoke do not name " + a.Kind + ")", nil
	}, &detail)
	if err == nil {
		err = revokeErr
	}
	if err != nil {
		return seen, false, revoking, err
	}
	return detail, disabling || revoking, revoking, nil
}

// noticeExpiring writes the api_key_expiring events due, and audits them
// in one record.
func noticeExpiring(ctx context.Context, akm *apikeys.Manager, al *audit.Log, log *slog.Logger, now func() time.Time, within time.Duration) {
	ids, err := akm.NoticeExpiring(within)
	if err != nil {
		log.Error("announcing API keys about to expire failed; tried again in 10 minutes", "error", err.Error())
	}
	if len(ids) == 0 {
		return
	}
	rec := audit.Record{Time: now().UTC(), Op: "keywardd.APIKeyExpiring", Outcome: "ok", Caller: keywardd(), Items: len(ids),
		Detail: fmt.Sprintf("%d API keys expire within %v: an api_key_expiring event for each (%s)", len(ids), within, strings.Join(ids, ", "))}
	if aerr := al.Append(ctx, rec); aerr != nil {
		log.Error("auditing the API keys about to expire failed", "error", aerr.Error())
	}
}

// windowOps are the audit records' operations of limit windows' starts
// and ends.
var windowOps = map[string]string{limitwin.Started: "keywardd.LimitWindowStarted", limitwin.Ended: "keywardd.LimitWindowEnded"}

// noticeWindows audits the starts and ends of limit windows not audited
// yet, each once, and drops those past their time on record from the
// store. One that cannot be audited is tried again next time (logged the
// first time). done holds what this process audited ("audited") or
// failed to ("failed"), by window and boundary: if the store cannot record
// an audit, it is audited again only after a restart.
func noticeWindows(ctx context.Context, lw *limitwin.Windows, al *audit.Log, log *slog.Logger, now func() time.Time, done map[string]string) {
	for _, n := range lw.Due() {
		w, id := n.Window, n.Window.ID+" "+n.Boundary
		if done[id] == "audited" {
			continue
		}
		detail := fmt.Sprintf("%s: %s; reason %q; scheduled by %s", w.Target, w.Change(), w.Reason, w.By)
		if !w.Cancelled.IsZero() {
			detail += fmt.Sprintf("; cancelled at %s by %s", w.Cancelled.UTC().Format(time.RFC3339), w.CancelledBy)
		}
		rec := audit.Record{Time: now().UTC(), Op: windowOps[n.Boundary], Key: w.ID, Outcome: "ok", Caller: keywardd(), Detail: detail}
		if err := al.Append(ctx, rec); err != nil {
			if done[id] == "" {
				log.Error("auditing a limit window's "+n.Boundary+" failed; tried again every second", "window", w.ID, "error", err.Error())
			}
			done[id] = "failed"
			return
		}
		done[id] = "audited"
		if err := lw.Noticed(n); err != nil {
			log.Error("recording that a limit window's "+n.Boundary+" was audited failed; it may be audited again after a restart", "window", w.ID, "error", err.Error())
		}
	}
	if err := lw.Prune(); err != nil {
		log.Error("dropping limit windows past their time on record failed; tried again in a second", "error", err.Error())
	}
}

// watchLoad samples the load every so often and logs when keywardd becomes
// overloaded and when it stops being so.
func watchLoad(ctx context.Context, gov *dynlimits.Governor, log *slog.Logger) {
	t := time.NewTicker(gov.Every())
	defer t.Stop()
	was := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cpu, hsm, over := gov.Sample(time.Now()) // a rate: the monotonic clock, not keywardd's
		if over != was {
			if over {
				log.Warn("keywardd is overloaded: API keys' rate limits are tightened", "cpu", cpu, "hsm_latency", hsm.String(), "factor", gov.Gauge())
			} else {
				log.Info("keywardd is no longer overloaded: API keys' rate limits are back", "cpu", cpu, "hsm_latency", hsm.String())
			}
			was = over
		}
	}
}
