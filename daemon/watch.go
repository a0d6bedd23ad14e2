package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/load"
	"github.com/keyward/keyward/daemon/metrics"
	"github.com/keyward/keyward/daemon/outbox"
)

// watchAnomalies acts on the detector's alerts until ctx ends: the key is
// disabled first if the configuration says so, with its event for the
// plugins in the same transaction, then the alert is audited, logged and
// counted. Baselines are written every flushEvery.
func watchAnomalies(ctx context.Context, det *anomaly.Detector, akm *apikeys.Manager, al *audit.Log, mx *metrics.Metrics, notify func(), log *slog.Logger, flushEvery time.Duration, now func() time.Time) {
	if flushEvery <= 0 {
		flushEvery = time.Minute
	}
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := det.Flush(); err != nil {
				log.Error("writing API key baselines failed; they are kept and retried", "error", err.Error())
			}
		case a := <-det.Alerts():
			seen := a.Kind + ": " + a.Detail
			var detail string // what the event says, once it is written
			var disabling bool
			_, err := akm.Notice(a.KeyID, outbox.Anomaly, a.KeyID, seen, func(r *apikeys.Record) (string, error) {
				disabling = false
				switch {
				case a.Disable && r.State == apikeys.Active:
					r.State, disabling = apikeys.StateDisabled, true
					return fmt.Sprintf("; keywardd disabled the key (keyward apikey update -id %s -enable, once it is understood)", a.KeyID), nil
				case a.Disable:
					return "; the key was not active, so nothing was disabled", nil
				}
				return "; alert only (anomaly.disable does not name " + a.Kind + ")", nil
			}, &detail)
			disabled := err == nil && disabling
			if err != nil {
				detail = seen + "; acting on it failed, nothing was disabled: " + err.Error()
			}
			rec := audit.Record{Time: now().UTC(), Op: "keywardd.APIKeyAnomaly", Key: a.KeyID, Outcome: "ok", Detail: detail,
				Caller: keywardd()}
			if err != nil {
				rec.Outcome = "error"
			}
			if aerr := al.Append(ctx, rec); aerr != nil {
				log.Error("auditing an API key anomaly failed", "key_id", a.KeyID, "error", aerr.Error())
			}
			log.Warn("API key anomaly", "key_id", a.KeyID, "kind", a.Kind, "disabled", disabled, "detail", detail)
			mx.Anomaly(a.Kind, disabled)
			notify()
		}
	}
}

// watchLoad samples the load every so often and logs when keywardd becomes
// overloaded and when it stops being so.
func watchLoad(ctx context.Context, gov *load.Governor, log *slog.Logger) {
	t := time.NewTicker(gov.Every())
	defer t.Stop()
	was := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cpu, hsm, over := gov.Sample(time.Now())
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
