package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/limitwin"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/ratelimit"
)

// LimitWindows are API keys' scheduled limit windows: daemon/limitwin.
type LimitWindows interface {
	Schedule(w limitwin.Window) (limitwin.Window, error)
	Prepare(w limitwin.Window) (limitwin.Window, error)
	List(f limitwin.Filter) []limitwin.Window
	Get(id string) (limitwin.Window, error)
	Cancel(id, by string) (limitwin.Window, error)
	Active(key limitwin.Key, t time.Time) *limitwin.Window
	Overriding(w limitwin.Window, key limitwin.Key) *limitwin.Window
}

// maxLimitChanges is how many keys a ScheduleLimits answer details.
const maxLimitChanges = 100

var limitWindowStates = map[string]keywardv1.LimitWindowState{
	"pending":   keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_PENDING,
	"active":    keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_ACTIVE,
	"ended":     keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_ENDED,
	"cancelled": keywardv1.LimitWindowState_LIMIT_WINDOW_STATE_CANCELLED,
}

func toLimitWindow(w *limitwin.Window, now time.Time) *keywardv1.LimitWindow {
	return &keywardv1.LimitWindow{Id: w.ID, KeyId: w.Key, Owner: w.Owner, Environment: w.Environment, Factor: w.Factor,
		StartTime: timestamppb.New(w.Start), EndTime: timestamppb.New(w.End), Reason: w.Reason,
		CreateTime: timeOrNil(w.Created), CreatedBy: w.By, CancelTime: timeOrNil(w.Cancelled), CancelledBy: w.CancelledBy,
		State: limitWindowStates[w.State(now)]}
}

func (s *Server) limitWindows() (LimitWindows, error) {
	if s.cfg.LimitWindows == nil {
		return nil, fmt.Errorf("%w: this keywardd does not schedule API keys' limits", errUnavailable)
	}
	return s.cfg.LimitWindows, nil
}

// allowWindow checks the caller may act with op on a window's target: on
// the key's owner, on the owner, or, for an environment's keys of every
// owner, by a grant on the owner glob "*" itself.
func (s *Server) allowWindow(ctx context.Context, op string, w *limitwin.Window) error {
	switch {
	case w.Key != "":
		return s.allow(ctx, op, w.KeyOwner)
	case w.Owner != "":
		return s.allow(ctx, op, w.Owner)
	}
	if err := s.allow(ctx, op, ""); err != nil {
		return err
	}
	return s.policy.Load().AllowEveryKey(subject(callFrom(ctx).caller), op)
}

// callerName is the caller as records kept for people name it: its uid
// and program.
func callerName(ctx context.Context) string {
	c := callFrom(ctx).caller
	name := fmt.Sprintf("uid=%d", c.UID)
	if c.Exe != "" {
		name += " exe=" + c.Exe
	}
	return name
}

// ScheduleLimits schedules a window (or, with dry_run, says what it
// would change). A raise needs, besides ScheduleLimits, what widening a
// key's limits needs (UpdateAPIKey's rule): CreateAPIKey on the owner, on
// the owner glob "*" itself for an environment's keys of every owner.
// Only a dry run lists the keys covered: a store of many keys costs a scan.
func (s *Server) ScheduleLimits(ctx context.Context, r *keywardv1.ScheduleLimitsRequest) (*keywardv1.ScheduleLimitsResponse, error) {
	const op = "APIKeyService.ScheduleLimits"
	lw, err := s.limitWindows()
	if err != nil {
		return nil, err
	}
	win := limitwin.Window{Target: limitwin.Target{Key: r.GetKeyId(), Owner: r.GetOwner(), Environment: r.GetEnvironment()},
		Factor: r.GetFactor(), Reason: r.GetReason(), By: callerName(ctx)}
	if err := win.Target.Check(); err != nil {
		return nil, err
	}
	var keyRec *apikeys.Record // a key target's key
	if win.Key != "" {
		if keyRec, err = s.apiKey(ctx, op, win.Key); err != nil {
			return nil, err
		}
		win.KeyOwner = keyRec.Owner
	} else if err := s.allowWindow(ctx, op, &win); err != nil {
		return nil, err
	}
	if win.Factor > 1 {
		if err := s.allowWindow(ctx, "APIKeyService.CreateAPIKey", &win); err != nil {
			return nil, fmt.Errorf("%w: a raise widens the keys' limits, which takes APIKeyService.CreateAPIKey on their owner (on \"*\" for an environment's keys); a cut (factor under 1) does not", policy.ErrDenied)
		}
	}
	if r.GetStartTime() != nil {
		if win.Start, err = timestamp("start_time", r.GetStartTime()); err != nil {
			return nil, err
		}
	}
	if win.End, err = timestamp("end_time", r.GetEndTime()); err != nil {
		return nil, err
	}
	if r.GetDryRun() {
		win, err = lw.Prepare(win)
	} else {
		win, err = lw.Schedule(win)
	}
	c := callFrom(ctx)
	if err != nil {
		c.detail = fmt.Sprintf("%s, factor %v, dry run %v; reason %q", win.Target, r.GetFactor(), r.GetDryRun(), r.GetReason())
		return nil, err
	}
	c.detail = fmt.Sprintf("%s: %s, dry run %v; reason %q", win.Target, win.Change(), r.GetDryRun(), win.Reason)
	if !r.GetDryRun() {
		c.key = win.ID
	}
	now := s.cfg.Now()
	out := &keywardv1.ScheduleLimitsResponse{Window: toLimitWindow(&win, now), DryRun: r.GetDryRun()}
	if !r.GetDryRun() {
		return out, nil
	}
	err = s.coveredKeys(ctx, op, win, keyRec, func(rec *apikeys.Record) {
		out.Keys++
		if len(rec.Limits) == 0 {
			out.Unlimited++
		}
		if len(out.Changes) < maxLimitChanges {
			ch := &keywardv1.LimitChange{KeyId: rec.ID, Owner: rec.Owner, Name: rec.Name, Environment: rec.Environment,
				Before: toLimits(rec.Limits), During: toLimits(ratelimit.Scale(rec.Limits, win.Factor))}
			if o := lw.Overriding(win, limitwin.Key{ID: rec.ID, Owner: rec.Owner, Environment: rec.Environment}); o != nil {
				ch.OverriddenBy = o.ID
			}
			out.Changes = append(out.Changes, ch)
		}
	})
	c.items = int(out.Keys)
	return out, err
}

// coveredKeys calls fn for each live key the window covers that the
// caller may see, by ID: keyRec alone for a key target (read already).
func (s *Server) coveredKeys(ctx context.Context, op string, win limitwin.Window, keyRec *apikeys.Record, fn func(*apikeys.Record)) error {
	if keyRec != nil {
		if keyRec.State != apikeys.StateRevoked {
			fn(keyRec)
		}
		return nil
	}
	f := apikeys.Filter{Owner: win.Owner, Environment: win.Environment, Owners: s.owners(ctx, op)}
	for after := ""; ; {
		recs, next, err := s.cfg.APIKeys.List(f, after, apikeys.MaxPageSize)
		if err != nil {
			return err
		}
		for _, rec := range recs {
			if rec.State != apikeys.StateRevoked {
				fn(rec)
			}
		}
		if next == "" {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		after = next
	}
}

// ListLimitWindows lists the windows the caller may see.
func (s *Server) ListLimitWindows(ctx context.Context, r *keywardv1.ListLimitWindowsRequest) (*keywardv1.ListLimitWindowsResponse, error) {
	const op = "APIKeyService.ListLimitWindows"
	lw, err := s.limitWindows()
	if err != nil {
		return nil, err
	}
	f := limitwin.Filter{Ended: r.GetIncludeEnded()}
	var key limitwin.Key
	var limits []ratelimit.Layer
	switch {
	case r.GetKeyId() != "" && (r.GetOwner() != "" || r.GetEnvironment() != ""):
		return nil, fmt.Errorf("%w: give key_id, or owner and/or environment, not both", errInvalid)
	case r.GetKeyId() != "":
		// The windows covering a key the caller may see: all of them,
		// the environment's too.
		rec, err := s.apiKey(ctx, op, r.GetKeyId())
		if err != nil {
			return nil, err
		}
		key, limits = limitwin.Key{ID: rec.ID, Owner: rec.Owner, Environment: rec.Environment}, rec.Limits
		f.Key = &key
	default:
		if r.GetOwner() != "" || r.GetEnvironment() != "" {
			f.Target = &limitwin.Target{Owner: r.GetOwner(), Environment: r.GetEnvironment()}
		}
		// Nothing is listed for a caller granted op on no owner at all.
		if err := s.allow(ctx, op, r.GetOwner()); err != nil {
			return nil, err
		}
		f.Visible = func(w *limitwin.Window) bool { return s.allowWindow(ctx, op, w) == nil }
	}
	now := s.cfg.Now()
	out := &keywardv1.ListLimitWindowsResponse{FactorNow: 1}
	for _, w := range lw.List(f) {
		out.Windows = append(out.Windows, toLimitWindow(&w, now))
	}
	if f.Key != nil {
		out.LimitsNow = toLimits(limits)
		if w := lw.Active(key, now); w != nil {
			out.FactorNow, out.ActiveWindow, out.LimitsNow = w.Factor, w.ID, toLimits(ratelimit.Scale(limits, w.Factor))
		}
	}
	callFrom(ctx).items = len(out.Windows)
	return out, nil
}

// CancelLimitWindow ends a window now.
func (s *Server) CancelLimitWindow(ctx context.Context, r *keywardv1.CancelLimitWindowRequest) (*keywardv1.CancelLimitWindowResponse, error) {
	const op = "APIKeyService.CancelLimitWindow"
	lw, err := s.limitWindows()
	if err != nil {
		return nil, err
	}
	// Nothing is looked up for a caller granted op on no owner at all.
	if err := s.allow(ctx, op, ""); err != nil {
		return nil, err
	}
	w, err := lw.Get(r.GetId())
	if err != nil {
		return nil, err
	}
	c := callFrom(ctx)
	c.key = w.ID
	if err := s.allowWindow(ctx, op, &w); err != nil {
		return nil, &policy.Denied{Op: op + " on this window's target"}
	}
	c.detail = fmt.Sprintf("%s: %s; reason %q", w.Target, w.Change(), w.Reason)
	if w, err = lw.Cancel(w.ID, callerName(ctx)); err != nil {
		return nil, err
	}
	return &keywardv1.CancelLimitWindowResponse{Window: toLimitWindow(&w, s.cfg.Now())}, nil
}
