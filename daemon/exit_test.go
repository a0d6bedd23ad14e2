package daemon_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

// TestExitCode: each kind of error gets its exit code, however deeply it is
// wrapped, and an error of two kinds gets the permanent one (cmd/keywardd's
// tests run the binary into each of them).
func TestExitCode(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("socket: {path: relative}\n"), 0o600)
	_, cfgErr := daemon.LoadConfig(bad)
	_, missingErr := daemon.LoadConfig(filepath.Join(dir, "nope.yaml"))
	hsmErr := func(sentinel error) error {
		return fmt.Errorf("creating key %q: %w", "k", &hsm.Error{Op: "login", Err: sentinel})
	}
	transient := fmt.Errorf("socket: %w", daemon.ErrTransient)
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"none", nil, daemon.ExitOK},
		{"unsorted", errors.New("something else"), daemon.ExitFailure},
		{"invalid configuration", cfgErr, daemon.ExitConfig},
		{"configuration file missing", missingErr, daemon.ExitConfig},
		{"PIN incorrect", hsmErr(hsm.ErrPINIncorrect), daemon.ExitPIN},
		{"PIN locked", hsmErr(hsm.ErrPINLocked), daemon.ExitPIN},
		{"token missing", hsmErr(hsm.ErrTokenNotFound), daemon.ExitTokenMissing},
		{"token unavailable", hsmErr(hsm.ErrTokenUnavailable), daemon.ExitTransient},
		{"HSM busy", hsmErr(hsm.ErrBusy), daemon.ExitTransient},
		{"store damaged", fmt.Errorf("store: page 7: %w", store.ErrDamaged), daemon.ExitData},
		{"store rolled back", fmt.Errorf("store: %w", store.ErrRolledBack), daemon.ExitData},
		{"disk full", fmt.Errorf("store: %w", store.ErrUnavailable), daemon.ExitTransient},
		{"audit log unwritable", fmt.Errorf("x: %w", audit.ErrUnavailable), daemon.ExitTransient},
		{"transient", transient, daemon.ExitTransient},
		{"PIN and transient", errors.Join(transient, hsmErr(hsm.ErrPINIncorrect)), daemon.ExitPIN},
		{"configuration and transient", errors.Join(transient, cfgErr), daemon.ExitConfig},
		{"damaged store and configuration", errors.Join(cfgErr, store.ErrDamaged), daemon.ExitData},
		{"audit log damaged", fmt.Errorf("x: %w", audit.ErrDamaged), daemon.ExitData},
		{"audit log damaged and unwritable", errors.Join(audit.ErrUnavailable, audit.ErrDamaged), daemon.ExitData},
		{"HSM configuration", fmt.Errorf("x: %w", hsm.ErrConfig), daemon.ExitConfig},
		{"two tokens or two keys match", hsmErr(hsm.ErrAmbiguous), daemon.ExitConfig},
		{"weak key", hsmErr(hsm.ErrWeakKey), daemon.ExitConfig},
		{"key of another algorithm", hsmErr(hsm.ErrWrongAlgorithm), daemon.ExitConfig},
		{"mechanism unsupported", hsmErr(hsm.ErrMechanismUnsupported), daemon.ExitConfig},
		{"weak key and token unavailable", errors.Join(hsmErr(hsm.ErrTokenUnavailable), hsmErr(hsm.ErrWeakKey)), daemon.ExitConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := daemon.ExitCode(tc.err); got != tc.want {
				t.Errorf("ExitCode(%v) = %d, want %d", tc.err, got, tc.want)
			}
		})
	}
	if !errors.Is(cfgErr, daemon.ErrConfig) || !errors.Is(missingErr, daemon.ErrConfig) {
		t.Errorf("LoadConfig's errors do not match ErrConfig: %v; %v", cfgErr, missingErr)
	}
	if want := "config: socket.path must be an absolute path"; len(cfgErr.Error()) < len(want) || cfgErr.Error()[:len(want)] != want {
		t.Errorf("marking changed the message: %q", cfgErr)
	}
}
