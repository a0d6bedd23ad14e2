package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/events"
	"github.com/keyward/keyward/daemon/outbox"
)

// Events is the watch stream EventService.Watch translates to:
// daemon/events.Hub.
type Events interface {
	Join(uid uint32) (leave func(), err error)
	// Invalidate sends every watcher a resync marker (the policy changed).
	Invalidate(reason string)
	Watch(ctx context.Context, from string, start events.Start, allow func(outbox.Event) bool, send func(events.Item) error) error
}

// watchOp is the watch stream's operation.
const watchOp = "EventService.Watch"

// Kinds are the events a watcher may ask for.
var Kinds = []string{outbox.APIKeyRevoked, outbox.APIKeyDisabled, outbox.APIKeyEnabled, outbox.APIKeyUpdated, outbox.APIKeyRotated,
	outbox.APIKeyExpiring, outbox.APIKeyLeaked, outbox.Anomaly, outbox.RotationDue, outbox.TokenRevoked, outbox.KeyVersionCreated, outbox.KeyVersionRetired,
	outbox.KeyVersionRevoked, outbox.CredentialRotated, outbox.CredentialRevoked}

// resource is what the policy's keys of EventService.Watch are matched
// against for e: a credential's name, else the event's subject (an API
// key's owner, a key's name).
func resource(e outbox.Event) string {
	switch e.Kind {
	case outbox.CredentialRevoked, outbox.CredentialRotated:
		return e.ID
	}
	return e.Subject
}

// interceptStream is intercept for streaming calls (EventService.Watch):
// the caller identified, the audit log and the store checked, the call
// audited when it ends. A watch stream leaves its caller's budget of calls
// in flight once it is counted among the caller's streams
// (events.max_watchers), since it may last for days; every other stream
// (health's Watch, reflection) stays in the budget until it ends.
func (s *Server) interceptStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	c, err := newCall(ctx, info.FullMethod)
	if err != nil {
		return err
	}
	if strings.HasPrefix(info.FullMethod, "/grpc.") {
		return handler(srv, ss) // health's Watch and reflection: no keys, nothing to audit
	}
	if err := s.cfg.Audit.Err(); err != nil {
		return status.Error(codes.Unavailable, "keywardd: the audit log cannot be written, so nothing is done: "+err.Error())
	}
	if err := s.cfg.Store.Err(); err != nil {
		return toStatus(err).Err()
	}
	err = handler(srv, &callStream{ServerStream: ss, ctx: context.WithValue(ctx, callKey{}, c)})
	if errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled {
		err = nil // the watcher went away: the stream's normal end
	}
	st := toStatus(err)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditTimeout)
	defer cancel()
	if aerr := s.cfg.Audit.Append(actx, s.record(c, err, st)); aerr != nil {
		return status.Error(codes.Unavailable, "keywardd: the call could not be audited: "+aerr.Error())
	}
	code := codes.OK
	if st != nil {
		code = st.Code()
	}
	s.cfg.Metrics.Call(c.op, code.String(), 0)
	if st != nil {
		return st.Err()
	}
	return nil
}

// callStream is a stream whose context carries its call.
type callStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *callStream) Context() context.Context { return s.ctx }

// Watch streams the events the caller may see. Opening it is audited
// before the first event goes out; its end is audited with how many were
// sent.
func (s *Server) Watch(r *keywardv1.WatchRequest, stream grpc.ServerStreamingServer[keywardv1.WatchResponse]) error {
	ctx := stream.Context()
	const op = watchOp
	if s.cfg.Events == nil {
		return status.Error(codes.Unimplemented, "keywardd: the watch stream is not served here")
	}
	if err := s.allow(ctx, op, ""); err != nil {
		return err
	}
	for _, k := range r.GetKinds() {
		if !slices.Contains(Kinds, k) {
			return fmt.Errorf("%w: kind %q; the kinds are %s", errInvalid, k, strings.Join(Kinds, ", "))
		}
	}
	c := callFrom(ctx)
	if r.GetCursor() != "" {
		if _, _, err := events.ParseCursor(r.GetCursor()); err != nil {
			return err
		}
	}
	leave, err := s.cfg.Events.Join(c.caller.UID)
	if err != nil {
		return err
	}
	defer leave()
	if end, ok := ctx.Value(endKey{}).(func()); ok {
		end() // counted among the caller's streams now, not its calls
	}
	// On record before the first event goes out.
	open := s.record(c, nil, nil)
	open.Detail = "watch opened, from " + or(r.GetCursor(), map[bool]string{true: "the oldest event kept", false: "now"}[r.GetFromOldest()])
	if err := s.cfg.Audit.Append(ctx, open); err != nil {
		return status.Error(codes.Unavailable, "keywardd: the watch could not be audited, so it is not opened: "+err.Error())
	}
	sub := subject(c.caller)
	sent, resyncs := 0, 0
	defer func() { c.detail = fmt.Sprintf("watch ended: %d events sent, %d resync markers", sent, resyncs) }()
	start := events.FromNow
	if r.GetFromOldest() {
		start = events.FromOldest
	}
	allow := func(e outbox.Event) bool {
		if len(r.GetKinds()) > 0 && !slices.Contains(r.GetKinds(), e.Kind) {
			return false
		}
		// The policy as it is now, for every event: a grant taken away
		// (SIGHUP) stops the events it gave. An event naming no owner or
		// key (a token revoked by its ID alone) goes to callers granted
		// Watch on every key only.
		pol := s.policy.Load()
		if res := resource(e); res != "" {
			return pol.Allow(sub, op, res) == nil
		}
		return pol.AllowEveryKey(sub, op) == nil
	}
	return s.cfg.Events.Watch(ctx, r.GetCursor(), start, allow, func(it events.Item) error {
		out := &keywardv1.WatchResponse{Cursor: it.Cursor}
		switch {
		case it.Resync:
			resyncs++
			out.Item = &keywardv1.WatchResponse_Resync{Resync: &keywardv1.Resync{Reason: it.Reason}}
		case it.Progress:
			out.Item = &keywardv1.WatchResponse_Progress{Progress: &keywardv1.Progress{}}
		case it.Event.Kind == "":
			out.Item = &keywardv1.WatchResponse_Start{Start: &keywardv1.Start{}}
		default:
			sent++
			e := it.Event
			out.Item = &keywardv1.WatchResponse_Event{Event: &keywardv1.Event{Kind: e.Kind, Id: e.ID, Subject: e.Subject,
				Time: timestamppb.New(e.Time), Detail: e.Detail}}
		}
		return stream.Send(out)
	})
}

// or is s, or else def.
func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
