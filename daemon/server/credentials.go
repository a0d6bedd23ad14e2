package server

import (
	"context"
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/credentials"
)

// For CredentialService the policy's key globs match credential names.

// Credentials is the manager of the credentials plugins rotate, which the
// CredentialService translates to: daemon/credentials.Manager.
type Credentials interface {
	Register(ctx context.Context, s credentials.Spec) (*credentials.Record, error)
	Get(ctx context.Context, name string) (*credentials.Record, []byte, error)
	List() ([]*credentials.Record, error)
	Rotate(ctx context.Context, name string) (*credentials.Record, error)
	Revoke(ctx context.Context, name string) (*credentials.Record, error)
}

func toCredential(r *credentials.Record) *keywardv1.Credential {
	out := &keywardv1.Credential{Name: r.Name, Plugin: r.Plugin, Config: string(r.Config), CreateTime: timestamppb.New(r.Created),
		Failures: uint32(r.Failures), LastError: r.LastError, RetryTime: timeOrNil(r.RetryAt), NextRotationTime: timeOrNil(r.NextRotation())}
	if r.RotationPeriod > 0 {
		out.RotationPeriod = durationpb.New(r.RotationPeriod)
	}
	out.Overlap = durationpb.New(r.Overlap)
	out.State = keywardv1.CredentialState_CREDENTIAL_STATE_ACTIVE
	if r.State == credentials.Revoked {
		out.State = keywardv1.CredentialState_CREDENTIAL_STATE_REVOKED
	}
	version := func(v *credentials.Version) *keywardv1.CredentialVersion {
		if v == nil {
			return nil
		}
		return &keywardv1.CredentialVersion{Handle: v.Handle, ActivateTime: timestamppb.New(v.Activated), RetireTime: timeOrNil(v.RetireAt)}
	}
	out.Current, out.Previous = version(r.Current), version(r.Previous)
	if p := r.Pending; p != nil {
		out.Pending = &keywardv1.PendingRotation{OperationId: p.OperationID, Step: string(p.Step), Handle: p.Handle, StartTime: timestamppb.New(p.Started)}
	}
	return out
}

func (s *Server) credentialsOn() error {
	if s.cfg.Credentials == nil {
		return fmt.Errorf("%w: managed credentials are off in this keywardd", errUnavailable)
	}
	return nil
}

func (s *Server) RegisterCredential(ctx context.Context, r *keywardv1.RegisterCredentialRequest) (*keywardv1.RegisterCredentialResponse, error) {
	if err := s.allow(ctx, "CredentialService.RegisterCredential", r.GetName()); err != nil {
		return nil, err
	}
	if err := s.credentialsOn(); err != nil {
		return nil, err
	}
	spec := credentials.Spec{Name: r.GetName(), Plugin: r.GetPlugin(), Config: json.RawMessage(r.GetConfig()),
		RotationPeriod: r.GetRotationPeriod().AsDuration(), Overlap: r.GetOverlap().AsDuration()}
	if r.GetRotationPeriod() == nil {
		spec.RotationPeriod = 0
	}
	if r.GetOverlap() == nil {
		spec.Overlap = 0
	}
	rec, err := s.cfg.Credentials.Register(ctx, spec)
	if err != nil {
		return nil, err
	}
	return &keywardv1.RegisterCredentialResponse{Credential: toCredential(rec)}, nil
}

func (s *Server) GetCredential(ctx context.Context, r *keywardv1.GetCredentialRequest) (*keywardv1.GetCredentialResponse, error) {
	if err := s.allow(ctx, "CredentialService.GetCredential", r.GetName()); err != nil {
		return nil, err
	}
	if err := s.credentialsOn(); err != nil {
		return nil, err
	}
	rec, secret, err := s.cfg.Credentials.Get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return &keywardv1.GetCredentialResponse{Credential: toCredential(rec), Secret: secret}, nil
}

func (s *Server) RotateCredential(ctx context.Context, r *keywardv1.RotateCredentialRequest) (*keywardv1.RotateCredentialResponse, error) {
	if err := s.allow(ctx, "CredentialService.RotateCredential", r.GetName()); err != nil {
		return nil, err
	}
	if err := s.credentialsOn(); err != nil {
		return nil, err
	}
	rec, err := s.cfg.Credentials.Rotate(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return &keywardv1.RotateCredentialResponse{Credential: toCredential(rec)}, nil
}

func (s *Server) RevokeCredential(ctx context.Context, r *keywardv1.RevokeCredentialRequest) (*keywardv1.RevokeCredentialResponse, error) {
	if err := s.allow(ctx, "CredentialService.RevokeCredential", r.GetName()); err != nil {
		return nil, err
	}
	if err := s.credentialsOn(); err != nil {
		return nil, err
	}
	rec, err := s.cfg.Credentials.Revoke(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return &keywardv1.RevokeCredentialResponse{Credential: toCredential(rec)}, nil
}

func (s *Server) ListCredentials(ctx context.Context, _ *keywardv1.ListCredentialsRequest) (*keywardv1.ListCredentialsResponse, error) {
	const op = "CredentialService.ListCredentials"
	if err := s.allow(ctx, op, ""); err != nil {
		return nil, err
	}
	if err := s.credentialsOn(); err != nil {
		return nil, err
	}
	recs, err := s.cfg.Credentials.List()
	if err != nil {
		return nil, err
	}
	out := &keywardv1.ListCredentialsResponse{}
	pol, sub := s.policy.Load(), subject(callFrom(ctx).caller)
	for _, r := range recs {
		if pol.Allow(sub, op, r.Name) == nil {
			out.Credentials = append(out.Credentials, toCredential(r))
		}
	}
	callFrom(ctx).items = len(out.Credentials)
	return out, nil
}
