package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/schedule"
)

// Schedule is the rotation schedule GetRotationPlan reads:
// daemon/schedule.Scheduler.
type Schedule interface {
	// Plan is every scheduled rotation, soonest first.
	Plan() ([]schedule.Entry, error)
	// Now is the schedule's clock, against which entries are due.
	Now() time.Time
}

// maxPlan bounds a plan's answer: a million API keys under rules would
// not fit in a gRPC message.
const maxPlan = 10_000

func (s *Server) GetRotationPlan(ctx context.Context, r *keywardv1.GetRotationPlanRequest) (*keywardv1.GetRotationPlanResponse, error) {
	if err := s.allow(ctx, "RotationService.GetRotationPlan", ""); err != nil {
		return nil, err
	}
	if s.cfg.Schedule == nil {
		return nil, fmt.Errorf("%w: no rotation schedule in this keywardd", errUnavailable)
	}
	if r.GetWithin() != nil && r.GetWithin().AsDuration() < 0 {
		return nil, fmt.Errorf("%w: within must not be negative", errInvalid)
	}
	limit := int(r.GetLimit())
	switch {
	case limit == 0:
		limit = 1000
	case limit > maxPlan:
		return nil, fmt.Errorf("%w: a limit of at most %d (narrow it with within)", errInvalid, maxPlan)
	}
	plan, err := s.cfg.Schedule.Plan()
	if err != nil {
		return nil, err
	}
	now := s.cfg.Schedule.Now()
	sub := subject(callFrom(ctx).caller)
	out := &keywardv1.GetRotationPlanResponse{}
	for _, e := range plan {
		if r.GetWithin() != nil && e.Next.After(now.Add(r.GetWithin().AsDuration())) {
			continue
		}
		// The key globs match what they match in the other services: a
		// key's or a credential's name, an API key's owner.
		name := e.ID
		if e.Kind == schedule.APIKey {
			name = e.Owner
		}
		if s.policy.Load().Allow(sub, "RotationService.GetRotationPlan", name) != nil {
			continue
		}
		if out.Total++; len(out.Rotations) == limit {
			continue
		}
		out.Rotations = append(out.Rotations, &keywardv1.ScheduledRotation{Kind: string(e.Kind), Id: e.ID, Owner: e.Owner, Policy: e.Policy,
			Every: durationpb.New(e.Every), Overlap: durationpb.New(e.Overlap), Action: string(e.Action),
			LastRotateTime: timestamppb.New(e.Base), DueTime: timestamppb.New(e.Due), NextRunTime: timestamppb.New(e.Next),
			Overdue: e.Overdue(now), LastRunTime: timeOrNil(e.LastRun), Outcome: e.Outcome})
	}
	return out, nil
}

func (s *Server) PanicRotate(ctx context.Context, r *keywardv1.PanicRotateRequest) (*keywardv1.PanicRotateResponse, error) {
	if err := s.allow(ctx, "RotationService.PanicRotate", r.GetName()); err != nil {
		return nil, err
	}
	if err := notReserved(r.GetName()); err != nil {
		return nil, err
	}
	p, err := s.cfg.Keys.PanicRotate(ctx, r.GetName(), r.GetDryRun())
	if err != nil {
		return nil, err
	}
	out := &keywardv1.PanicRotateResponse{NewVersion: p.NewVersion, RetiredVersions: p.Retired, Encryptions: p.Encryptions,
		Withdrawn: p.Withdrawn, PluginEvents: uint32(len(p.Retired)), DryRun: r.GetDryRun()}
	c := callFrom(ctx)
	c.detail = fmt.Sprintf("dry run %v: new version %d, retired versions %v, %d encryptions under them, withdrawn %v",
		r.GetDryRun(), p.NewVersion, p.Retired, p.Encryptions, p.Withdrawn)
	if !r.GetDryRun() {
		out.EffectiveTime = timestamppb.New(s.cfg.Now())
		if s.cfg.Notify != nil {
			s.cfg.Notify()
		}
	}
	return out, nil
}
