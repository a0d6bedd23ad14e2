package server

import (
	"context"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/keys"
)

func (s *Server) GetStatus(ctx context.Context, _ *keywardv1.GetStatusRequest) (*keywardv1.GetStatusResponse, error) {
	if err := s.allow(ctx, "StatusService.GetStatus", ""); err != nil {
		return nil, err
	}
	tok := s.cfg.HSM.Token()
	out := &keywardv1.GetStatusResponse{
		Version:   s.cfg.Version,
		StartTime: timestamppb.New(s.start),
		Hsm:       &keywardv1.HSMStatus{TokenLabel: tok.Label, TokenSerial: tok.Serial, Manufacturer: tok.Manufacturer, Model: tok.Model, Healthy: true},
		Store:     &keywardv1.StoreStatus{Path: s.cfg.Store.Path()},
		Keys:      &keywardv1.KeyCounts{},
	}
	if p := s.hsmErr.Load(); p != nil {
		out.Hsm.Healthy, out.Hsm.Error = false, (*p).Error()
	}
	if err := s.cfg.Audit.CheckpointErr(); err != nil {
		out.AuditCheckpointError = err.Error()
	}
	if v, err := s.cfg.Store.SchemaVersion(); err == nil {
		out.Store.SchemaVersion = uint32(v)
	}
	if s.cfg.Fleet != nil {
		f := s.cfg.Fleet()
		out.Fleet = &keywardv1.FleetStatus{Node: f.Node, Leader: f.Leader, Revision: f.Revision, StalenessBound: durationpb.New(f.Staleness),
			Nodes: f.Nodes, LeaderNode: f.LeaderNode}
		if !f.FreshAt.IsZero() {
			out.Fleet.FreshTime = timestamppb.New(f.FreshAt)
		}
	}
	if err := s.cfg.Store.Err(); err != nil {
		// The key counts need the store: the rest says what is wrong.
		out.Store.Error = err.Error()
		return out, nil
	}
	all, err := s.cfg.Keys.List()
	if err != nil {
		return nil, err
	}
	for _, k := range all {
		out.Keys.Total++
		switch k.State {
		case keys.Enabled:
			out.Keys.Enabled++
		case keys.Disabled:
			out.Keys.Disabled++
		case keys.PendingDeletion:
			out.Keys.PendingDeletion++
		}
	}
	if s.cfg.Plugins != nil {
		for _, p := range s.cfg.Plugins() {
			out.Plugins = append(out.Plugins, &keywardv1.PluginStatus{Name: p.Name, Version: p.Version, State: p.State, Pid: uint32(p.PID),
				Launches: uint32(p.Launches), LastError: p.LastError, Capabilities: p.Capabilities, Since: timestamppb.New(p.Since),
				EventsPending: uint32(p.EventsPending), DeliveryError: p.DeliveryError})
		}
	}
	if s.cfg.AuditSinks != nil {
		for _, st := range s.cfg.AuditSinks() {
			out.AuditSinks = append(out.AuditSinks, &keywardv1.AuditSinkStatus{Name: st.Name, Type: st.Type, OnFailure: st.OnFailure, State: st.State,
				LagBytes: st.LagBytes, MaxLagBytes: st.MaxLagBytes, OverBound: st.OverBound, Seq: st.Seq,
				Shipped: st.Shipped, Filtered: st.Filtered, Failures: st.Failures, LastError: st.LastError})
		}
	}
	if s.cfg.NamesToRename != nil {
		out.NamesToRename = map[string]uint32{}
		for kind, n := range s.cfg.NamesToRename() {
			out.NamesToRename[kind] = uint32(n)
		}
	}
	return out, nil
}

func (s *Server) Ping(ctx context.Context, _ *keywardv1.PingRequest) (*keywardv1.PingResponse, error) {
	if err := s.allow(ctx, "StatusService.Ping", ""); err != nil {
		return nil, err
	}
	return &keywardv1.PingResponse{}, nil
}
