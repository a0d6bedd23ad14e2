package sdk_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/keyward/keyward/plugins/sdk"
)

// motd is a complete plugin: it keeps a credential's secret in a file the
// configuration names (the bundled file plugin does this properly: atomic
// replacement, mode 0600, idempotent steps).
type motd struct{}

func path(c sdk.Credential) (string, error) {
	var cfg struct{ Path string }
	if err := json.Unmarshal(c.Config, &cfg); err != nil || cfg.Path == "" {
		return "", fmt.Errorf("configuration %s: want {\"path\": ...}: %w", c.Config, sdk.ErrPermanent)
	}
	return cfg.Path, nil
}

func (motd) Create(ctx context.Context, r sdk.CreateRequest) (sdk.CreateResult, error) {
	p, err := path(r.Credential)
	if err != nil {
		return sdk.CreateResult{}, err
	}
	sdk.Logger().Info("staging a new secret", "credential", r.Credential.Name, "secret", r.Secret) // prints [redacted]
	return sdk.CreateResult{Handle: r.OperationID}, os.WriteFile(p+".new", r.Secret.Reveal(), 0o600)
}

func (motd) Test(ctx context.Context, r sdk.TestRequest) error { return nil }

func (motd) Activate(ctx context.Context, r sdk.ActivateRequest) error {
	p, err := path(r.Credential)
	if err != nil {
		return err
	}
	if err := os.Rename(p+".new", p); err != nil && !os.IsNotExist(err) {
		return err // retried by keywardd; a missing .new means it was done
	}
	return nil
}

func (motd) Retire(ctx context.Context, r sdk.RetireRequest) error { return nil }

func Example() {
	sdk.Serve(sdk.Plugin{Name: "motd", Version: "1.0.0", Rotator: motd{}})
}
