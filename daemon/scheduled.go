package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/schedule"
	"github.com/keyward/keyward/daemon/server"
)

// scheduleOps are the audit records' operations of scheduled runs.
var scheduleOps = map[schedule.Action]map[schedule.Kind]string{
	schedule.Rotate: {schedule.Key: "keywardd.RotateKey", schedule.Credential: "keywardd.RotateCredential"},
	schedule.Remind: {schedule.APIKey: "keywardd.RemindAPIKeyRotation"},
	schedule.Force:  {schedule.APIKey: "keywardd.ForceAPIKeyRotation"},
}

// keywardd is keywardd itself as the caller of what it does on its own
// (scheduled rotations, deletions, anomaly responses), for the audit log.
func keywardd() audit.Caller {
	self, _ := os.Executable()
	return audit.Caller{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: os.Getpid(), Exe: self}
}

// remindEvery is how often an API key's owner is told again.
func remindEvery(r *schedule.Rules) time.Duration {
	if r.RemindEvery > 0 {
		return r.RemindEvery
	}
	return 24 * time.Hour
}

// checkEvery is how often keywardd looks for rotations due.
func checkEvery(r *schedule.Rules) time.Duration {
	if r.CheckEvery > 0 {
		return r.CheckEvery
	}
	return time.Minute
}

// newScheduler schedules keys, API keys and credentials by the
// configuration's rules. Each run is audited before it acts (one that
// cannot be audited waits) and again if it fails.
func newScheduler(cfg *Config, st schedule.Store, km *keys.Manager, cm *credentials.Manager, akm *apikeys.Manager, al *audit.Log, log *slog.Logger, now func() time.Time) *schedule.Scheduler {
	rules := &cfg.Rotation
	jitter := time.Hour
	if rules.Jitter != nil {
		jitter = *rules.Jitter
	}
	record := func(s schedule.Subject, outcome, detail string) audit.Record {
		return audit.Record{Time: now().UTC(), Op: scheduleOps[s.Action][s.Kind], Key: s.ID, Outcome: outcome,
			Caller: keywardd(), Detail: detail}
	}
	return schedule.New(schedule.Config{Store: st, Now: now, Jitter: jitter, Grace: 2 * checkEvery(rules), RemindEvery: remindEvery(rules),
		Sources: []schedule.Source{schedule.KeySource(km, rules, server.ReservedPrefix), schedule.CredentialSource(cm), schedule.APIKeySource(akm, rules, now, 10, remindEvery(rules))},
		Before: func(ctx context.Context, s schedule.Subject, e schedule.Entry) error {
			detail := fmt.Sprintf("rotation policy %s (every %v), last rotated %s, due %s", s.Policy.Name, s.Policy.Every,
				s.Last.UTC().Format(time.RFC3339), e.Due.Format(time.RFC3339))
			if err := al.AppendBefore(ctx, record(s, "ok", detail)); err != nil {
				return fmt.Errorf("not running the scheduled %s of %s %s: it cannot be audited: %w", s.Action, s.Kind, s.ID, err)
			}
			return nil
		},
		After: func(ctx context.Context, s schedule.Subject, e schedule.Entry, detail string, err error) {
			if err == nil {
				log.Info("scheduled rotation", "kind", string(s.Kind), "id", s.ID, "action", string(s.Action), "policy", s.Policy.Name, "did", detail)
				return
			}
			log.Error("scheduled rotation failed; it is retried", "kind", string(s.Kind), "id", s.ID, "action", string(s.Action), "error", err.Error(), "retry", e.Next)
			if aerr := al.Append(ctx, record(s, "error", err.Error())); aerr != nil {
				log.Error("auditing a failed scheduled rotation failed", "id", s.ID, "error", aerr.Error())
			}
		},
	})
}

// clockWatch tells whether keywardd's clock jumped between two looks: moved
// by more than a minute more or less than real time (the monotonic clock)
// did. Acts that cannot be undone wait until it has been steady for
// steadyLooks looks in a row (after a start, too).
type clockWatch struct {
	wall     func() time.Time
	lastWall time.Time
	lastMono time.Time
	looks    int // steady looks in a row
}

// steadyLooks is how many looks in a row on a steady clock irreversible
// acts wait for, after keywardd starts and after the clock jumps.
const steadyLooks = 3

func newClockWatch(wall func() time.Time) *clockWatch {
	return &clockWatch{wall: wall, lastWall: wall().Round(0), lastMono: time.Now()}
}

// maxDrift is how far the clock may move apart from real time between two
// looks without counting as a jump.
const maxDrift = time.Minute

// jumped returns how far the clock moved apart from real time since the
// last call (0 if less than maxDrift). The wall reading is stripped of its
// monotonic one (Round(0)): between two time.Now readings Sub would use
// the monotonic clock alone and never see a jump.
func (c *clockWatch) jumped() time.Duration {
	wall, mono := c.wall().Round(0), time.Now()
	d := wall.Sub(c.lastWall) - mono.Sub(c.lastMono)
	c.lastWall, c.lastMono = wall, mono
	if d.Abs() < maxDrift {
		return 0
	}
	return d
}

// steady looks at the clock and says whether it has now been steady for
// steadyLooks looks in a row; a jump is logged, saying what waits (what).
func (c *clockWatch) steady(log *slog.Logger, what string) bool {
	if jump := c.jumped(); jump != 0 {
		log.Warn("the clock jumped: "+what+" wait until it has been steady for a while", "jump", jump.String(), "looks", steadyLooks)
		c.looks = 0
		return false
	}
	c.looks = min(c.looks+1, steadyLooks)
	return c.looks >= steadyLooks
}
