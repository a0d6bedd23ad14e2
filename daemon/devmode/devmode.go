// Package devmode sets up keywardd --dev: the fastest way to try keyward. In
// a directory of its own it makes a throw-away SoftHSM2 token (through the
// test fixtures, the one place outside tests that uses them: a dev token is
// exactly such a fixture), a data directory, a policy that grants the
// current user everything, and a configuration file, keywardd.yaml, which
// keywardd then reads as it reads /etc/keyward/keywardd.yaml: to try
// metrics, the JWKS over HTTP or a plugin, edit it (or give -config) and
// start again with the same -dev-dir. A directory set up before is used as
// it is: its token, PIN, policy and configuration are kept. Nothing here is
// for production.
package devmode

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/keys"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// Label is the dev token's label.
const Label = "keyward-dev"

// DefaultKeys are made at the first start: a key to encrypt with, one to
// sign tokens with.
var DefaultKeys = []keys.Spec{
	{Name: "dev-kek", Purpose: keys.Encrypt},
	{Name: "dev-signing", Purpose: keys.Sign},
}

// Files are where a dev directory keeps what it is made of.
type Files struct {
	Dir, Token, Config, Policy string
}

// FilesIn names the files of the dev directory dir.
func FilesIn(dir string) Files {
	return Files{Dir: dir, Token: filepath.Join(dir, "token"), Config: filepath.Join(dir, "keywardd.yaml"), Policy: filepath.Join(dir, "policy.yaml")}
}

// Setup prepares dir (created 0700), or takes it as it is if an earlier
// Setup prepared it, and returns keywardd's configuration: config's if it is
// not empty, with the dev token as its HSM and the dev directory's socket,
// data and policy where config names none; else the directory's
// keywardd.yaml. It sets SOFTHSM2_CONF for this process, so call it before
// anything opens the SoftHSM2 library.
func Setup(dir, config string) (*daemon.Config, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	f := FilesIn(dir)
	if err := own(f); err != nil {
		return nil, err
	}
	tok, err := token(f.Token)
	if err != nil {
		return nil, err
	}
	for _, w := range []struct{ path, data string }{
		{f.Policy, policy(os.Getuid())},
		{f.Config, configFile(f, tok)},
	} {
		if err := writeNew(w.path, w.data); err != nil {
			return nil, err
		}
	}
	if config == "" {
		return daemon.LoadConfig(f.Config)
	}
	return daemon.LoadConfigWith(config, func(c *daemon.Config) {
		c.HSM.Module, c.HSM.Token, c.HSM.URI, c.HSM.PINFile, c.HSM.PINCredential, c.HSM.PINEnv = tok.Module, tok.Label, "", tok.PINFile, "", ""
		if c.Socket.Path == "" {
			c.Socket.Path, c.Socket.Mode = socketPath(f), "0600"
		}
		if c.DataDir == "" {
			c.DataDir = filepath.Join(dir, "data")
		}
		if c.PolicyFile == "" {
			c.PolicyFile = f.Policy
		}
	})
}

// own makes the dev directory (0700), or checks that the one there is
// ours to use: a real directory of this user's, either empty or set up by
// dev mode, whose files no one else could have written. keywardd loads the
// module its keywardd.yaml names and runs the plugins it lists: a
// directory another user made (under /tmp, say) must not be taken.
func own(f Files) error {
	if err := os.MkdirAll(filepath.Dir(f.Dir), 0o700); err != nil {
		return fmt.Errorf("devmode: %w", err)
	}
	if err := os.Mkdir(f.Dir, 0o700); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("devmode: %w", err)
	}
	refuse := func(why string) error {
		return fmt.Errorf("devmode: -dev-dir %s %s; give a new directory (keywardd --dev makes it)", f.Dir, why)
	}
	fi, err := os.Lstat(f.Dir)
	if err != nil {
		return fmt.Errorf("devmode: %w", err)
	}
	if !fi.IsDir() {
		return refuse("is not a directory (or is a symbolic link)")
	}
	if !ownedSafely(fi) {
		return refuse("belongs to another user or others may write to it")
	}
	entries, err := os.ReadDir(f.Dir)
	if err != nil {
		return fmt.Errorf("devmode: %w", err)
	}
	if len(entries) == 0 {
		return os.Chmod(f.Dir, 0o700)
	}
	if _, err := os.Lstat(filepath.Join(f.Token, "user.pin")); err != nil {
		return refuse("holds files keywardd --dev did not make")
	}
	// What dev mode reads from it, and the token's directories.
	for _, p := range []string{f.Token, filepath.Join(f.Token, "tokens"), filepath.Join(f.Token, "user.pin"),
		filepath.Join(f.Token, "softhsm2.conf"), f.Config, f.Policy} {
		fi, err := os.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue // made below
		}
		if err != nil {
			return fmt.Errorf("devmode: %w", err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 || !ownedSafely(fi) {
			return refuse(fmt.Sprintf("holds %s, which is a symbolic link, another user's, or writable by others", p))
		}
	}
	return os.Chmod(f.Dir, 0o700)
}

// ownedSafely: fi is this user's, and neither its group nor others may
// write it.
func ownedSafely(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid() && fi.Mode().Perm()&0o022 == 0
}

// token makes the dev token in dir, or opens the one made there before
// (its PIN in user.pin), and points SOFTHSM2_CONF at it.
func token(dir string) (*softhsmtest.Token, error) {
	conf := filepath.Join(dir, "softhsm2.conf")
	pin, err := os.ReadFile(filepath.Join(dir, "user.pin"))
	if err == nil {
		if _, err := os.Stat(conf); err != nil {
			return nil, fmt.Errorf("devmode: %s has a PIN but no SoftHSM2 configuration: remove the directory to start afresh", dir)
		}
		mod, err := softhsmtest.Module()
		if err != nil {
			return nil, err
		}
		if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
			return nil, err
		}
		return &softhsmtest.Token{Dir: dir, Conf: conf, Module: mod, Label: Label, PIN: strings.TrimSpace(string(pin)), PINFile: filepath.Join(dir, "user.pin")}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("devmode: %w", err)
	}
	tok, err := softhsmtest.Prepare(dir, Label, "", "")
	if err != nil {
		return nil, err
	}
	if err := os.Setenv("SOFTHSM2_CONF", tok.Conf); err != nil {
		return nil, err
	}
	if err := tok.Init(); err != nil {
		// No half-made token is left to be taken for a whole one, nor to
		// sit beside the next start's as a second "keyward-dev".
		os.Remove(tok.PINFile)
		os.RemoveAll(filepath.Join(dir, "tokens"))
		return nil, err
	}
	return tok, nil
}

// writeNew writes path (0600) unless it exists: an operator's edits stay.
func writeNew(path, data string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("devmode: %w", err)
	}
	if _, err := f.WriteString(data); err != nil {
		f.Close()
		return fmt.Errorf("devmode: %w", err)
	}
	return f.Close()
}

func socketPath(f Files) string { return filepath.Join(f.Dir, "run", "keyward.sock") }

// policy grants uid everything, tokens of any audience and scope
// included.
func policy(uid int) string {
	return fmt.Sprintf(`# keywardd --dev: everything, for uid %[1]d only. docs/policy.md says
# how to write a policy; keywardd reads this one again on SIGHUP.
version: 1
roles:
  developer:
    max_batch: 100
    permissions:
      - operations: ["*"]
        keys: ["*"]
    tokens:
      audiences: ["*"]
      scopes: ["*"]
      claims: [tenant]              # custom claim names, not globs
bindings:
  - role: developer
    callers:
      - uid: %[1]d
`, uid)
}

// configFile is the dev directory's keywardd.yaml: what --dev runs with,
// and commented lines to switch on what it does not.
func configFile(f Files, tok *softhsmtest.Token) string {
	return fmt.Sprintf(`# keywardd --dev: the configuration of the dev directory %[1]s.
# Edit it and start again with "keywardd --dev -dev-dir %[1]s";
# docs/operations.md describes every field.
socket:
  path: %[2]s
  mode: "0600"
data_dir: %[3]s
hsm:                         # the throw-away SoftHSM2 token of this directory
  module: %[4]s
  token: %[5]s
  pin_file: %[6]s
policy_file: %[7]s
# tokens:
#   http:
#     address: 127.0.0.1:8642     # the JWKS at http://127.0.0.1:8642/.well-known/jwks.json
# metrics:
#   address: 127.0.0.1:9464       # Prometheus metrics at /metrics
# plugins:                        # docs/plugins.md; make build puts three in ./bin
#   - name: file
#     path: /absolute/path/to/bin/keyward-plugin-file
#     sha256: <sha256sum of that file>
rotation:                    # dev keys rotate on the moderate policy; dev API keys get reminders
  keys:
    - match: "dev-*"
      policy: moderate
  api_keys:
    - environment: dev
      policy: moderate
      action: remind
anomaly:                     # unusual use of an API key is watched
  enabled: true
  new_networks: true
`, f.Dir, socketPath(f), filepath.Join(f.Dir, "data"), tok.Module, tok.Label, tok.PINFile, f.Policy)
}

// HowTo is what keywardd --dev prints once it serves.
func HowTo(cfg *daemon.Config, config, dir string, kept bool) string {
	stop := "Stop with Ctrl-C; the directory is removed (keywardd --dev -dev-dir DIR keeps one)."
	if kept {
		stop = fmt.Sprintf("Stop with Ctrl-C; start again with: keywardd --dev -dev-dir %s", dir)
	}
	grants := fmt.Sprintf("(grants uid %d everything)", os.Getuid())
	if cfg.PolicyFile != FilesIn(dir).Policy {
		grants = "(the configuration's: the commands below need what they do granted)"
	}
	path := "  # the keyward CLI is in ./bin after make build\n"
	if exe, err := os.Executable(); err == nil {
		path = "  export PATH=" + filepath.Dir(exe) + ":$PATH   # the keyward CLI, beside keywardd\n"
	}
	return fmt.Sprintf(`
keywardd --dev is serving on %[1]s
  token %[2]q (SoftHSM2, throw-away), data and audit log in %[3]s
  configuration %[6]s, policy %[4]s %[5]s
  keys dev-kek (encrypt) and dev-signing (sign tokens)

Try, in another terminal:
%[8]s  export KEYWARD_SOCKET=%[1]s
  keyward status
  keyward key list
  keyward key create --name orders --purpose encrypt
  keyward datakey --key dev-kek --context app=demo
  echo -n 'hello' | keyward encrypt --key dev-kek --context app=demo > hello.kw
  keyward decrypt --context app=demo < hello.kw
  keyward watch                           # in a third terminal: what changes, as it happens
  keyward key rotate --name dev-kek
  mkdir -p blobs && cp hello.kw blobs/ && keyward rewrap --dir blobs --context app=demo   # hello.kw to dev-kek's new version
  keyward apikey create --owner demo --name try --env dev --perm orders:read --secret-out demo.key
  keyward apikey verify --env dev --perm orders:read --ip 127.0.0.1 < demo.key
  keyward apikey list
  keyward token mint --key dev-signing --audience orders --scope orders:read > demo.jwt
  keyward token verify --audience orders < demo.jwt
  keyward token jwks
  keyward rotation plan
  keyward panic-rotate dev-signing --dry-run
  keyward review
  keyward dashboard                       # the same, on a web page, as you
  grpcurl -plaintext -unix %[1]s list

%[7]s
`, cfg.Socket.Path, cfg.HSM.Token, cfg.DataDir, cfg.PolicyFile, grants, config, stop, path)
}
