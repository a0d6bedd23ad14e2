package sdk

import (
	"bytes"
	"context"
	"errors"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// register serves p's services on s: the gRPC side of the interfaces.
func register(s *grpc.Server, p Plugin) {
	pluginv1.RegisterPluginServiceServer(s, &pluginServer{p: p})
	if p.Rotator != nil {
		pluginv1.RegisterRotatorServiceServer(s, &rotatorServer{r: p.Rotator})
	}
	if p.Revoker != nil {
		pluginv1.RegisterRevokerServiceServer(s, &revokerServer{r: p.Revoker})
	}
}

type pluginServer struct {
	pluginv1.UnimplementedPluginServiceServer
	p Plugin
}

func (s *pluginServer) Describe(context.Context, *pluginv1.DescribeRequest) (*pluginv1.DescribeResponse, error) {
	d := &pluginv1.DescribeResponse{Name: s.p.Name, Version: s.p.Version, Events: s.p.Events, Secret: s.p.SecretSpec}
	if s.p.Rotator != nil {
		d.Capabilities = append(d.Capabilities, pluginv1.Capability_CAPABILITY_ROTATOR)
	}
	if s.p.Revoker != nil {
		d.Capabilities = append(d.Capabilities, pluginv1.Capability_CAPABILITY_REVOKER)
	}
	return d, nil
}

func (s *pluginServer) CheckConfig(ctx context.Context, r *pluginv1.CheckConfigRequest) (*pluginv1.CheckConfigResponse, error) {
	c, err := credential(r.GetCredential())
	if err != nil {
		return nil, err
	}
	if s.p.CheckConfig != nil {
		if err := s.p.CheckConfig(ctx, c); err != nil {
			return nil, toStatus(err, nil)
		}
	}
	return &pluginv1.CheckConfigResponse{}, nil
}

type rotatorServer struct {
	pluginv1.UnimplementedRotatorServiceServer
	r Rotator
}

func (s *rotatorServer) Create(ctx context.Context, r *pluginv1.CreateRequest) (*pluginv1.CreateResponse, error) {
	c, err := request(r.GetOperationId(), r.GetCredential())
	if err != nil {
		return nil, err
	}
	res, err := s.r.Create(ctx, CreateRequest{OperationID: r.GetOperationId(), Credential: c, Secret: NewSecret(r.GetSecret()), CurrentHandle: r.GetCurrentHandle()})
	if err != nil {
		return nil, toStatus(err, r.GetSecret())
	}
	if res.Handle == "" {
		return nil, status.Error(codes.Internal, "the plugin's Create returned no handle")
	}
	return &pluginv1.CreateResponse{Handle: res.Handle, Secret: res.Secret.Reveal()}, nil
}

func (s *rotatorServer) Test(ctx context.Context, r *pluginv1.TestRequest) (*pluginv1.TestResponse, error) {
	c, err := request(r.GetOperationId(), r.GetCredential())
	if err != nil {
		return nil, err
	}
	if err := s.r.Test(ctx, TestRequest{OperationID: r.GetOperationId(), Credential: c, Handle: r.GetHandle(), Secret: NewSecret(r.GetSecret())}); err != nil {
		return nil, toStatus(err, r.GetSecret())
	}
	return &pluginv1.TestResponse{}, nil
}

func (s *rotatorServer) Activate(ctx context.Context, r *pluginv1.ActivateRequest) (*pluginv1.ActivateResponse, error) {
	c, err := request(r.GetOperationId(), r.GetCredential())
	if err != nil {
		return nil, err
	}
	if err := s.r.Activate(ctx, ActivateRequest{OperationID: r.GetOperationId(), Credential: c, Handle: r.GetHandle(), PreviousHandle: r.GetPreviousHandle()}); err != nil {
		return nil, toStatus(err, nil)
	}
	return &pluginv1.ActivateResponse{}, nil
}

func (s *rotatorServer) Retire(ctx context.Context, r *pluginv1.RetireRequest) (*pluginv1.RetireResponse, error) {
	c, err := request(r.GetOperationId(), r.GetCredential())
	if err != nil {
		return nil, err
	}
	if err := s.r.Retire(ctx, RetireRequest{OperationID: r.GetOperationId(), Credential: c, Handle: r.GetHandle()}); err != nil {
		return nil, toStatus(err, nil)
	}
	return &pluginv1.RetireResponse{}, nil
}

type revokerServer struct {
	pluginv1.UnimplementedRevokerServiceServer
	r Revoker
}

func (s *revokerServer) Revoke(ctx context.Context, r *pluginv1.RevokeRequest) (*pluginv1.RevokeResponse, error) {
	e := r.GetEvent()
	if r.GetOperationId() == "" || e == nil || e.GetKind() == pluginv1.EventKind_EVENT_KIND_UNSPECIFIED {
		return nil, status.Error(codes.InvalidArgument, "a revocation needs an operation_id and an event")
	}
	if err := s.r.Revoke(ctx, r.GetOperationId(), Event{Kind: e.GetKind(), ID: e.GetId(), Subject: e.GetSubject(), Time: e.GetTime().AsTime(), Detail: e.GetDetail()}); err != nil {
		return nil, toStatus(err, nil)
	}
	return &pluginv1.RevokeResponse{}, nil
}

func credential(c *pluginv1.Credential) (Credential, error) {
	if c.GetName() == "" {
		return Credential{}, status.Error(codes.InvalidArgument, "a request needs the credential's name")
	}
	return Credential{Name: c.GetName(), Config: c.GetConfig()}, nil
}

func request(opID string, c *pluginv1.Credential) (Credential, error) {
	if opID == "" {
		return Credential{}, status.Error(codes.InvalidArgument, "a request needs an operation_id")
	}
	return credential(c)
}

// toStatus is the status a plugin's error goes back as: ErrPermanent is
// FAILED_PRECONDITION (not retried), a context's end is itself, a status is
// kept, anything else is UNAVAILABLE (retried). The request's secret is cut
// out of the message, should the plugin's error quote it.
func toStatus(err error, secret []byte) error {
	code := codes.Unavailable
	var se interface{ GRPCStatus() *status.Status }
	switch {
	case errors.Is(err, ErrPermanent):
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.As(err, &se):
		code = se.GRPCStatus().Code()
	}
	msg := err.Error()
	if len(secret) > 0 && bytes.Contains([]byte(msg), secret) {
		msg = strings.ReplaceAll(msg, string(secret), redacted)
	}
	return status.Error(code, msg)
}
