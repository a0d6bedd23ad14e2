package daemon

import (
	"errors"
	"io/fs"
	"syscall"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/socket"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

// keywardd's exit codes, from sysexits.h where one fits. They tell systemd
// (RestartPreventExitStatus= in docs/systemd/keywardd.service) and the
// operator (docs/operations.md) whether trying again can help: a permanent
// failure is never restarted, since a loop of restarts with a refused PIN
// locks the HSM's PIN.
const (
	// ExitOK: keywardd was stopped (SIGTERM) and shut down cleanly.
	ExitOK = 0
	// ExitFailure: any other failure; systemd restarts it, within the
	// unit's start limit.
	ExitFailure = 1
	// ExitUsage (EX_USAGE): wrong flags or arguments. Permanent.
	ExitUsage = 64
	// ExitData (EX_DATAERR): the store is refused, damaged or rolled back,
	// or the audit log's end is damaged. Permanent: restore the store from
	// a backup; run keyward audit verify on the log.
	ExitData = 65
	// ExitTokenMissing (EX_UNAVAILABLE): no token matches the configured
	// label or URI. Restarted: the PIN was not tried, and a token that is
	// plugged in or a network HSM that comes up is found by the next start.
	ExitTokenMissing = 69
	// ExitTransient (EX_TEMPFAIL): something that may pass by itself: the
	// HSM is busy or unreachable, the socket's directory is not there yet,
	// the socket or a port is held by another process, the disk refuses a
	// write of the store or the audit log. Restarted.
	ExitTransient = 75
	// ExitPIN (EX_NOPERM): the token refused the PIN, or the PIN is locked.
	// Permanent: another try brings a real HSM closer to locking the PIN.
	ExitPIN = 77
	// ExitConfig (EX_CONFIG): the configuration, or a file it names (the
	// PIN file or credential, the policy, a certificate), is wrong; or the
	// HSM is not what keyward needs: an object under one of keywardd's
	// labels that is weaker than keyward requires, of another algorithm,
	// or one of two under one label, or a mechanism the token lacks.
	// Permanent: an operator must fix it (the configuration, or the token
	// with its vendor's tools).
	ExitConfig = 78
)

// ErrConfig is matched by the errors of keywardd's configuration: the
// configuration file, the files it names (policy, TLS certificate), and
// what they select (a group that does not exist). The HSM's own
// (hsm.ErrConfig: the module or the PIN source; hsm.ErrAmbiguous: a token
// URI that matches two tokens) are sorted by ExitCode as they are.
var ErrConfig = errors.New("daemon: configuration error")

// ErrTransient is matched by failures that may pass without anyone acting:
// the socket's directory is not there yet, a port or the socket is held by
// another process.
var ErrTransient = errors.New("daemon: transient failure")

// ExitCode is the exit code for the error that stopped Run or LoadConfig:
// the one place where errors are sorted into exit codes. The permanent
// kinds are tested first, so that an error that is also something else
// (a configuration error joined with a transient one) is never retried.
func ExitCode(err error) int {
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, hsm.ErrPINIncorrect), errors.Is(err, hsm.ErrPINLocked):
		return ExitPIN
	case errors.Is(err, store.ErrDamaged), errors.Is(err, store.ErrRolledBack), errors.Is(err, audit.ErrDamaged):
		return ExitData
	case errors.Is(err, ErrConfig), errors.Is(err, hsm.ErrConfig),
		errors.Is(err, hsm.ErrAmbiguous), errors.Is(err, hsm.ErrWeakKey), errors.Is(err, hsm.ErrWrongAlgorithm), errors.Is(err, hsm.ErrMechanismUnsupported):
		return ExitConfig
	case errors.Is(err, hsm.ErrTokenNotFound):
		return ExitTokenMissing
	case errors.Is(err, ErrTransient), errors.Is(err, hsm.ErrBusy), errors.Is(err, hsm.ErrTokenUnavailable),
		errors.Is(err, store.ErrUnavailable), errors.Is(err, audit.ErrUnavailable):
		return ExitTransient
	}
	return ExitFailure
}

// kindError marks err as being of a kind (ErrConfig, ErrTransient) and
// keeps its message, which already says what is wrong.
type kindError struct{ err, kind error }

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.err, e.kind} }

// configError marks err, if not nil, as a configuration error.
func configError(err error) error {
	if err == nil || errors.Is(err, ErrConfig) {
		return err
	}
	return &kindError{err, ErrConfig}
}

// listenError sorts out a failure to take a socket or a port: transient if
// the socket's parent directory is not there yet or another process holds
// the socket or the port, a configuration error otherwise (a directory of
// the wrong owner or mode, a symlink, a path keywardd may not write, a
// privileged port).
func listenError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, socket.ErrInUse) || errors.Is(err, syscall.EADDRINUSE) {
		return &kindError{err, ErrTransient}
	}
	return configError(err)
}

// fileError marks as a configuration error a file or directory keywardd
// may not read or write where the configuration points it: the deployment
// must change (ownership, mode, or a unit's ReadWritePaths=).
func fileError(err error) error {
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		return configError(err)
	}
	return err
}
