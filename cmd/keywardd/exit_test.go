package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyward/keyward/daemon"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// editConfig replaces old with new in the set-up's configuration file.
func editConfig(t *testing.T, f *daemontest.Files, old, new string) {
	t.Helper()
	b, err := os.ReadFile(f.ConfigFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("the configuration has no %q:\n%s", old, b)
	}
	if err := os.WriteFile(f.ConfigFile, []byte(strings.Replace(string(b), old, new, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeAuditLog puts content in place of keywardd's audit log.
func writeAuditLog(t *testing.T, f *daemontest.Files, content []byte) {
	t.Helper()
	if err := os.MkdirAll(f.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.DataDir, "audit.log"), content, 0o600); err != nil {
		t.Fatal(err)
	}
}

// plantHMACKeys makes n HMAC keys on tok under the label of version 1 of
// keywardd's key name, as another PKCS#11 client could; extractable ones
// are weaker than keyward requires.
func plantHMACKeys(t *testing.T, tok *softhsmtest.Token, name string, n int, extractable bool) {
	t.Helper()
	p := pkcs11.New(tok.Module)
	if p == nil {
		t.Fatalf("%s could not be loaded", tok.Module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer p.Finalize()
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, slot := range slots {
		ti, err := p.GetTokenInfo(slot)
		if err != nil || strings.TrimRight(ti.Label, " ") != tok.Label {
			continue
		}
		s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer p.CloseSession(s)
		if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil {
			t.Fatal(err)
		}
		for range n {
			_, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keyward/"+name+"/v1"),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, extractable),
				pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
				pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		return
	}
	t.Fatalf("token %s not found", tok.Label)
}

// runToExit runs keywardd with args until it exits (at most a minute) and
// returns its exit code and standard error.
func runToExit(t *testing.T, bin string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, stderr.String()
	case errors.As(err, &exit) && exit.ExitCode() >= 0:
		return exit.ExitCode(), stderr.String()
	}
	t.Fatalf("keywardd %v: %v (it should have stopped by itself)\n%s", args, err, stderr.String())
	return 0, ""
}

// TestExitCodes runs the real keywardd into each kind of failure at start
// and checks the exit code that tells systemd whether to start it again
// (docs/operations.md), the message, and the number of logins it tried: a
// refused PIN is tried once and the process ends with a code the unit
// never restarts; a missing token or an unreachable HSM is never asked for
// the PIN at all.
func TestExitCodes(t *testing.T) {
	bin := daemontest.Build(t)
	const uncounted = -1
	for _, tc := range []struct {
		name   string
		faults []string // with the fault-injecting module, these rules; nil: SoftHSM2 directly
		setup  func(t *testing.T, f *daemontest.Files) []string
		code   int
		stderr string
		logins int
	}{
		{"unknown configuration field", nil, func(t *testing.T, f *daemontest.Files) []string {
			editConfig(t, f, "data_dir:", "bogus: 1\ndata_dir:")
			return nil
		}, daemon.ExitConfig, "field bogus not found", uncounted},
		{"configuration file missing", nil, func(t *testing.T, f *daemontest.Files) []string {
			return []string{"-config", filepath.Join(f.Dir, "nope.yaml")}
		}, daemon.ExitConfig, "no such file or directory", uncounted},
		{"PIN file readable by others", []string{}, func(t *testing.T, f *daemontest.Files) []string {
			os.Chmod(f.Token.PINFile, 0o644)
			return nil
		}, daemon.ExitConfig, "is accessible to other users (mode 0644): chmod o-rwx it", 0},
		{"PIN file missing", []string{}, func(t *testing.T, f *daemontest.Files) []string {
			editConfig(t, f, "pin_file: "+f.Token.PINFile, "pin_file: "+f.Token.PINFile+".gone")
			return nil
		}, daemon.ExitConfig, ".gone does not exist", 0},
		{"PIN credential outside systemd", []string{}, func(t *testing.T, f *daemontest.Files) []string {
			editConfig(t, f, "pin_file: "+f.Token.PINFile, "pin_credential: keyward-pin")
			t.Setenv("CREDENTIALS_DIRECTORY", "")
			os.Unsetenv("CREDENTIALS_DIRECTORY")
			return nil
		}, daemon.ExitConfig, "$CREDENTIALS_DIRECTORY is not set", 0},
		{"policy file missing", nil, func(t *testing.T, f *daemontest.Files) []string {
			os.Remove(filepath.Join(f.Dir, "policy.yaml"))
			return nil
		}, daemon.ExitConfig, "policy: open", uncounted},
		{"unexpected argument", nil, func(t *testing.T, f *daemontest.Files) []string {
			return []string{"-config", f.ConfigFile, "1234"}
		}, daemon.ExitUsage, "unexpected arguments", uncounted},
		{"unknown flag", nil, func(t *testing.T, f *daemontest.Files) []string {
			return []string{"-pin", "1234"}
		}, daemon.ExitUsage, "flag provided but not defined: -pin", uncounted},
		{"wrong PIN", []string{}, func(t *testing.T, f *daemontest.Files) []string {
			os.WriteFile(f.Token.PINFile, []byte("wrong-"+f.Token.PIN+"\n"), 0o600)
			return nil
		}, daemon.ExitPIN, "PIN incorrect: check the PIN file or variable; keyward does not retry a wrong PIN", 1},
		{"locked PIN", []string{"C_Login 0xA4"}, nil, daemon.ExitPIN, "PIN locked: the security officer must unlock or reset the user PIN", 1},
		{"token missing", []string{}, func(t *testing.T, f *daemontest.Files) []string {
			editConfig(t, f, "token: "+f.Token.Label, "token: no-such-token")
			return nil
		}, daemon.ExitTokenMissing, "no token matches pkcs11:token=no-such-token", 0},
		{"HSM unreachable", []string{"C_GetSlotList 0x30"}, nil, daemon.ExitTransient, "token unavailable", 0},
		{"audit log's last line damaged", nil, func(t *testing.T, f *daemontest.Files) []string {
			writeAuditLog(t, f, []byte("this is not an audit log\n"))
			return nil
		}, daemon.ExitData, "does not parse; run keyward audit verify on it", uncounted},
		{"audit log ends in a line over 1 MiB", nil, func(t *testing.T, f *daemontest.Files) []string {
			writeAuditLog(t, f, bytes.Repeat([]byte("x"), 1<<20+1))
			return nil
		}, daemon.ExitData, "ends in a line over 1048576 bytes", uncounted},
		{"weak key under keywardd's label", nil, func(t *testing.T, f *daemontest.Files) []string {
			plantHMACKeys(t, f.Token, daemon.PepperKey.Name, 1, true)
			return nil
		}, daemon.ExitConfig, "CKA_EXTRACTABLE is true", uncounted},
		{"two keys under keywardd's label", nil, func(t *testing.T, f *daemontest.Files) []string {
			plantHMACKeys(t, f.Token, daemon.CredentialsKey, 2, false)
			return nil
		}, daemon.ExitConfig, `several objects carry the label \"keyward/keyward-credentials/v1\"`, uncounted},
		{"mechanism the token lacks", []string{"C_GenerateKey 0x70"}, nil, daemon.ExitConfig, "mechanism not supported", 1},
		{"socket directory not there yet", nil, func(t *testing.T, f *daemontest.Files) []string {
			editConfig(t, f, "path: "+f.Socket, "path: "+filepath.Join(f.Dir, "not-yet", "run", "k.sock"))
			return nil
		}, daemon.ExitTransient, "no such file or directory", uncounted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := daemontest.NewFiles(t)
			var faults *softhsmtest.Faults
			if tc.faults != nil {
				faults = softhsmtest.NewFaults(t, f.Token)
				faults.Set(tc.faults...)
				editConfig(t, f, "module: "+f.Token.Module, "module: "+faults.Module)
			}
			args := []string{"-config", f.ConfigFile}
			if tc.setup != nil {
				if a := tc.setup(t, f); a != nil {
					args = a
				}
			}
			code, stderr := runToExit(t, bin, args...)
			if code != tc.code {
				t.Fatalf("exit code %d, want %d\n%s", code, tc.code, stderr)
			}
			if !strings.Contains(stderr, tc.stderr) {
				t.Errorf("the log does not say %q:\n%s", tc.stderr, stderr)
			}
			if strings.Contains(stderr, f.Token.PIN) {
				t.Errorf("the log shows the PIN:\n%s", stderr)
			}
			if tc.logins != uncounted {
				if faults == nil {
					t.Fatal("counting logins needs the fault module")
				}
				if n := faults.Calls("C_Login"); n != tc.logins {
					t.Errorf("keywardd tried %d logins, want %d", n, tc.logins)
				}
			}
		})
	}
}

// TestExitCodeSecondDaemon: a second keywardd on a socket the first serves
// exits with the transient code (it may start once the first stops), and
// the first keeps serving.
func TestExitCodeSecondDaemon(t *testing.T) {
	bin := daemontest.Build(t)
	f := daemontest.NewFiles(t)
	first := daemontest.Exec(t, bin, f)
	code, stderr := runToExit(t, bin, "-config", f.ConfigFile)
	if code != daemon.ExitTransient || !strings.Contains(stderr, "another keywardd is serving "+f.Socket) {
		t.Fatalf("second keywardd: exit code %d, want %d\n%s", code, daemon.ExitTransient, stderr)
	}
	if first.Exited() {
		t.Fatal("the first keywardd stopped")
	}
}

// TestExitCodeDamagedStore: keywardd refuses a store file that is not a
// store with ExitData (which the unit does not restart), and says to
// restore it and where the runbook is.
func TestExitCodeDamagedStore(t *testing.T) {
	bin := daemontest.Build(t)
	f := daemontest.NewFiles(t)
	garbage := []byte(strings.Repeat("this is not a bbolt file; ", 1000))
	os.Mkdir(f.DataDir, 0o700)
	if err := os.WriteFile(filepath.Join(f.DataDir, "keyward.db"), garbage, 0o600); err != nil {
		t.Fatal(err)
	}
	code, stderr := runToExit(t, bin, "-config", f.ConfigFile)
	if code != daemon.ExitData {
		t.Fatalf("exit code %d, want %d\n%s", code, daemon.ExitData, stderr)
	}
	if !strings.Contains(stderr, "restore it from a backup") || !strings.Contains(stderr, "Restoring the store") {
		t.Errorf("the log does not say to restore the store:\n%s", stderr)
	}
}
