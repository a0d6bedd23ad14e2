// Package sdk is what a keyward plugin is written with: the Go interfaces of
// a rotator and a revoker, Serve to run one under keywardd, a logger that
// keywardd shows tagged with the plugin's name and that never prints a
// Secret, and a watchdog that ends the plugin when keywardd is gone. See
// docs/plugins.md for a complete plugin; plugins/conformance checks one.
//
// A plugin's main is one call:
//
//	func main() {
//		sdk.Serve(sdk.Plugin{Name: "example", Version: "1.0.0", Rotator: &rotator{}})
//	}
//
// The SDK depends only on the protocol (plugins/proto/v1) and go-plugin.
package sdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// Plugin describes a plugin for Serve.
type Plugin struct {
	// Name is the plugin's name as operators configure it in keywardd:
	// lower case letters, digits and -. keywardd refuses a plugin that
	// calls itself otherwise.
	Name    string
	Version string
	// Rotator, if set, rotates credentials in an external system.
	Rotator Rotator
	// SecretSpec says what secrets the Rotator takes; nil means 32
	// characters of A-Z a-z 0-9, made by keywardd.
	SecretSpec *pluginv1.SecretSpec
	// Revoker, if set, receives the Events it lists.
	Revoker Revoker
	Events  []pluginv1.EventKind
	// CheckConfig, if set, validates a credential's configuration (the
	// JSON registered with it) without touching the external system.
	CheckConfig func(ctx context.Context, c Credential) error
}

// Credential is a managed credential as a plugin sees it: its name and the
// plugin's configuration for it.
type Credential struct {
	Name   string
	Config json.RawMessage
}

// Rotator rotates a credential in four steps, each idempotent for its
// OperationID (keywardd repeats a step it does not know finished):
// Create a new credential beside the current one, Test it, Activate it,
// and after the overlap Retire the previous one. A step must never leave
// the external system without a working credential.
type Rotator interface {
	Create(ctx context.Context, r CreateRequest) (CreateResult, error)
	Test(ctx context.Context, r TestRequest) error
	Activate(ctx context.Context, r ActivateRequest) error
	Retire(ctx context.Context, r RetireRequest) error
}

// CreateRequest asks for a new credential.
type CreateRequest struct {
	OperationID   string
	Credential    Credential
	Secret        Secret // empty if the plugin generates its own
	CurrentHandle string // "" on the first rotation
}

// CreateResult names the new credential: Handle is the plugin's name for it
// (a role, a key ID), not secret. Secret only if the plugin generates it.
type CreateResult struct {
	Handle string
	Secret Secret
}

// TestRequest asks to check the new credential.
type TestRequest struct {
	OperationID string
	Credential  Credential
	Handle      string
	Secret      Secret
}

// ActivateRequest asks to put the new credential in use.
type ActivateRequest struct {
	OperationID    string
	Credential     Credential
	Handle         string
	PreviousHandle string
}

// RetireRequest asks to disable a previous credential.
type RetireRequest struct {
	OperationID string
	Credential  Credential
	Handle      string
}

// Revoker acts on revocations; Revoke must be idempotent for its
// operation ID (delivery is at least once).
type Revoker interface {
	Revoke(ctx context.Context, operationID string, e Event) error
}

// Event is a revocation in keyward.
type Event struct {
	Kind    pluginv1.EventKind
	ID      string
	Subject string
	Time    time.Time
	// Detail says more about a notice (rotation due, anomaly), for a
	// person; never a secret.
	Detail string
}

// ErrPermanent marks an error that retrying will not mend (a bad
// configuration, a refusal for good): keywardd stops retrying and reports
// it. Wrap it: fmt.Errorf("role %q does not exist: %w", r, sdk.ErrPermanent).
var ErrPermanent = errors.New("permanent failure")

var nameForm = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

func (p Plugin) check() error {
	switch {
	case !nameForm.MatchString(p.Name):
		return fmt.Errorf("plugin name %q: lower case letters, digits and -, a letter first", p.Name)
	case p.Rotator == nil && p.Revoker == nil:
		return errors.New("a plugin needs a Rotator, a Revoker or both")
	case p.Revoker != nil && len(p.Events) == 0:
		return errors.New("a Revoker needs the Events it wants")
	case p.Revoker == nil && len(p.Events) > 0:
		return errors.New("a plugin lists Events but has no Revoker")
	}
	return nil
}

// Serve runs the plugin until keywardd stops it or is gone, and exits.
// Run by hand, it says it is a keyward plugin and exits 1.
func Serve(p Plugin) {
	if err := p.check(); err != nil {
		fmt.Fprintf(os.Stderr, "keyward plugin: %v\n", err)
		os.Exit(1)
	}
	if os.Getenv(pluginv1.Handshake.MagicCookieKey) == "" {
		fmt.Fprintf(os.Stderr, "%s is a keyward plugin: keywardd runs it (see docs/plugins.md)\n", p.Name)
		os.Exit(1)
	}
	watchParent()
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig:  pluginv1.Handshake,
		VersionedPlugins: pluginv1.PluginSets(&pluginv1.GRPCPlugin{Register: func(s *grpc.Server) { register(s, p) }}),
		GRPCServer:       plugin.DefaultGRPCServer,
		Logger:           goPluginLogger(),
	})
}
