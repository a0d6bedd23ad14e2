package host

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/outbox"
	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// Set is keywardd's plugins by name. It is what the credentials manager
// rotates through.
type Set map[string]*Plugin

var _ credentials.Rotator = Set(nil)

// rotator returns the named plugin if it rotates.
func (s Set) rotator(name string) (*Plugin, error) {
	p := s[name]
	if p == nil {
		return nil, fmt.Errorf("%w: no plugin %q is configured", credentials.ErrNoPlugin, name)
	}
	if d := p.Describe(); d != nil && !slices.Contains(d.GetCapabilities(), pluginv1.Capability_CAPABILITY_ROTATOR) {
		return nil, fmt.Errorf("%w: plugin %q does not rotate credentials", credentials.ErrPermanent, name)
	}
	return p, nil
}

// permanent marks the statuses retrying will not mend, and a plugin that
// cannot be reached now.
func permanent(err error) error {
	switch c := status.Code(err); {
	case err == nil:
		return nil
	case c == codes.FailedPrecondition || c == codes.InvalidArgument || c == codes.Unimplemented:
		return fmt.Errorf("%w: %w", credentials.ErrPermanent, err)
	case errors.Is(err, ErrUnavailable) || c == codes.Unavailable || c == codes.DeadlineExceeded || errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: %w", credentials.ErrUnavailable, err)
	}
	return err
}

func toCred(c credentials.Credential) *pluginv1.Credential {
	return &pluginv1.Credential{Name: c.Name, Config: c.Config}
}

// SecretSpec is what secrets the plugin takes.
func (s Set) SecretSpec(plugin string) (credentials.SecretSpec, error) {
	p, err := s.rotator(plugin)
	if err != nil {
		return credentials.SecretSpec{}, err
	}
	d := p.Describe()
	if d == nil {
		return credentials.SecretSpec{}, fmt.Errorf("%w: %s has not started yet", credentials.ErrUnavailable, plugin)
	}
	sp := d.GetSecret()
	return credentials.SecretSpec{Length: int(sp.GetLength()), Alphabet: sp.GetAlphabet(), PluginGenerates: sp.GetPluginGenerates()}, nil
}

// CheckConfig asks the plugin whether a configuration is good.
func (s Set) CheckConfig(ctx context.Context, plugin string, c credentials.Credential) error {
	p, err := s.rotator(plugin)
	if err != nil {
		return err
	}
	return permanent(p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		_, err := api.Plugin.CheckConfig(ctx, &pluginv1.CheckConfigRequest{Credential: toCred(c)})
		return err
	}))
}

func (s Set) Create(ctx context.Context, plugin, op string, c credentials.Credential, secret []byte, current string) (string, []byte, error) {
	p, err := s.rotator(plugin)
	if err != nil {
		return "", nil, err
	}
	var r *pluginv1.CreateResponse
	err = p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		r, err = api.Rotator.Create(ctx, &pluginv1.CreateRequest{OperationId: op, Credential: toCred(c), Secret: secret, CurrentHandle: current})
		return err
	})
	if err != nil {
		return "", nil, permanent(err)
	}
	if r.GetHandle() == "" || len(r.GetHandle()) > 256 || len(r.GetSecret()) > 4096 {
		return "", nil, fmt.Errorf("%w: plugin %s returned a handle of %d bytes (1 to 256) and a secret of %d (at most 4096)", credentials.ErrPermanent, plugin, len(r.GetHandle()), len(r.GetSecret()))
	}
	return r.GetHandle(), r.GetSecret(), nil
}

func (s Set) Test(ctx context.Context, plugin, op string, c credentials.Credential, handle string, secret []byte) error {
	p, err := s.rotator(plugin)
	if err != nil {
		return err
	}
	return permanent(p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		_, err := api.Rotator.Test(ctx, &pluginv1.TestRequest{OperationId: op, Credential: toCred(c), Handle: handle, Secret: secret})
		return err
	}))
}

func (s Set) Activate(ctx context.Context, plugin, op string, c credentials.Credential, handle, previous string) error {
	p, err := s.rotator(plugin)
	if err != nil {
		return err
	}
	return permanent(p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		_, err := api.Rotator.Activate(ctx, &pluginv1.ActivateRequest{OperationId: op, Credential: toCred(c), Handle: handle, PreviousHandle: previous})
		return err
	}))
}

func (s Set) Retire(ctx context.Context, plugin, op string, c credentials.Credential, handle string) error {
	p, err := s.rotator(plugin)
	if err != nil {
		return err
	}
	return permanent(p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		_, err := api.Rotator.Retire(ctx, &pluginv1.RetireRequest{OperationId: op, Credential: toCred(c), Handle: handle})
		return err
	}))
}

// The Set delivers revocations for the outbox.
var _ outbox.Deliverer = Set(nil)

var eventKinds = map[pluginv1.EventKind]string{
	pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED:     outbox.APIKeyRevoked,
	pluginv1.EventKind_EVENT_KIND_TOKEN_REVOKED:       outbox.TokenRevoked,
	pluginv1.EventKind_EVENT_KIND_KEY_VERSION_REVOKED: outbox.KeyVersionRevoked,
	pluginv1.EventKind_EVENT_KIND_CREDENTIAL_REVOKED:  outbox.CredentialRevoked,
	pluginv1.EventKind_EVENT_KIND_ROTATION_DUE:        outbox.RotationDue,
	pluginv1.EventKind_EVENT_KIND_ANOMALY:             outbox.Anomaly,
	pluginv1.EventKind_EVENT_KIND_KEY_VERSION_RETIRED: outbox.KeyVersionRetired,
	pluginv1.EventKind_EVENT_KIND_API_KEY_LEAKED:      outbox.APIKeyLeaked,
}

// Plugins are the plugins' names, sorted.
func (s Set) Plugins() []string { return slices.Sorted(maps.Keys(s)) }

// Subscribed is what a plugin said it wants; not known until it started.
func (s Set) Subscribed(plugin string) ([]string, bool) {
	p := s[plugin]
	if p == nil {
		return nil, true // gone from the configuration: nothing to wait for
	}
	d := p.Describe()
	if d == nil {
		return nil, false
	}
	if !slices.Contains(d.GetCapabilities(), pluginv1.Capability_CAPABILITY_REVOKER) {
		return nil, true
	}
	var out []string
	for _, k := range d.GetEvents() {
		if kind, ok := eventKinds[k]; ok {
			out = append(out, kind)
		}
	}
	return out, true
}

// Deliver hands a revocation to a plugin's Revoker.
func (s Set) Deliver(ctx context.Context, plugin, op string, e outbox.Event) error {
	p := s[plugin]
	if p == nil {
		return fmt.Errorf("no plugin %q", plugin)
	}
	var kind pluginv1.EventKind
	for k, v := range eventKinds {
		if v == e.Kind {
			kind = k
		}
	}
	return p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
		_, err := api.Revoker.Revoke(ctx, &pluginv1.RevokeRequest{OperationId: op,
			Event: &pluginv1.Event{Kind: kind, Id: e.ID, Subject: e.Subject, Time: timestamppb.New(e.Time), Detail: e.Detail}})
		return err
	})
}
