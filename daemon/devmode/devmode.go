// Package devmode sets up keywardd --dev: the fastest way to try keyward. In
// a directory of its own it makes a throw-away SoftHSM2 token (through the
// test fixtures, the one place outside tests that uses them: a dev token is
// exactly such a fixture), a data directory, a policy that grants the
// current user everything, and default keys. Nothing here is for production.
package devmode

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/anomaly"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/schedule"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// DefaultKeys are made at the first start.
var DefaultKeys = []keys.Spec{
	{Name: "dev-kek", Purpose: keys.Encrypt},
	{Name: "dev-signing", Purpose: keys.Sign},
	{Name: "dev-hmac", Purpose: keys.MAC},
}

// Setup prepares dir (created 0700) and returns keywardd's configuration.
// It sets SOFTHSM2_CONF for this process, so call it before anything opens
// the SoftHSM2 library.
func Setup(dir string) (*daemon.Config, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	tok, err := softhsmtest.Prepare(filepath.Join(dir, "token"), "keyward-dev", "", "")
	if err != nil {
		return nil, err
	}
	if err := os.Setenv("SOFTHSM2_CONF", tok.Conf); err != nil {
		return nil, err
	}
	if err := tok.Init(); err != nil {
		return nil, err
	}
	cfg := &daemon.Config{DataDir: filepath.Join(dir, "data"), PolicyFile: filepath.Join(dir, "policy.yaml")}
	cfg.Socket.Path = filepath.Join(dir, "run", "keyward.sock")
	cfg.Socket.Mode = "0600"
	cfg.HSM.Module, cfg.HSM.Token, cfg.HSM.PINFile = tok.Module, tok.Label, tok.PINFile
	// The operating side switched on, to show it: dev keys rotate on the
	// moderate policy, dev API keys get reminders, use is watched.
	cfg.Rotation = schedule.Rules{Keys: []schedule.KeyRule{{Match: "dev-*", Policy: "moderate"}},
		APIKeys: []schedule.APIKeyRule{{Environment: "dev", Policy: "moderate", Action: schedule.Remind}}}
	cfg.Anomaly = anomaly.Config{Enabled: true, NewNetworks: true}
	policy := fmt.Sprintf(`# keywardd --dev: everything, for uid %d only.
version: 1
roles:
  developer:
    max_batch: 100
    permissions:
      - operations: ["*"]
        keys: ["*"]
bindings:
  - role: developer
    callers:
      - uid: %d
`, os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.PolicyFile, []byte(policy), 0o600); err != nil {
		return nil, err
	}
	return cfg, nil
}

// HowTo is what keywardd --dev prints once it serves.
func HowTo(cfg *daemon.Config) string {
	return fmt.Sprintf(`
keywardd --dev is serving on %[1]s
  token %q (SoftHSM2, throw-away), data and audit log in %[3]s
  policy %[4]s grants uid %[5]d everything; keys dev-kek, dev-signing, dev-hmac exist

Try, in another terminal (the keyward CLI is in ./bin after make build):
  export KEYWARD_SOCKET=%[1]s
  keyward status
  keyward key list
  keyward key create --name orders --purpose encrypt
  keyward datakey --key dev-kek --context app=demo
  echo -n 'hello' | keyward encrypt --key dev-kek --context app=demo > hello.kw
  keyward decrypt --context app=demo < hello.kw
  keyward key rotate --name dev-kek
  keyward apikey create --owner demo --name try --env dev --perm orders:read --secret-out demo.key
  keyward apikey verify --env dev --perm orders:read --ip 127.0.0.1 < demo.key
  keyward apikey list
  keyward rotation plan
  keyward panic-rotate dev-signing --dry-run
  keyward review
  grpcurl -plaintext -unix %[1]s list

Stop with Ctrl-C; the directory is removed unless -dev-dir was given.
`, cfg.Socket.Path, cfg.HSM.Token, cfg.DataDir, cfg.PolicyFile, os.Getuid())
}
