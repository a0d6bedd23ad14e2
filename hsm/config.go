package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Config says which PKCS#11 module and token to use and where the PIN is.
// The PIN itself is never a field: it is read from a file or an environment
// variable when the HSM is opened, so it never sits in a config file or a
// command line. Zero values of the tuning fields mean safe defaults.
type Config struct {
	// Module is the absolute path of the PKCS#11 library, for SoftHSM2 on
	// Debian /usr/lib/softhsm/libsofthsm2.so. It may instead come from the
	// URI's module-path.
	Module string

	// Token is the label of the token. Exactly one of Token and URI is set.
	Token string
	// URI is an RFC 7512 PKCS#11 URI selecting the token, for example
	// "pkcs11:token=keyward;serial=5f2c…". Every attribute given must match,
	// and exactly one token may match.
	URI string

	// PINFile is a file holding the user PIN; one trailing newline is
	// ignored. It must not be readable by others than owner and group.
	PINFile string
	// PINEnv names an environment variable holding the user PIN.
	PINEnv string
	// ScrubPINEnv, if set, is called with PINEnv once the PIN has been read
	// from it, before the PKCS#11 module is loaded, to take the variable out
	// of the process's environment: a module may start a helper process
	// when it is loaded or initialized, and that process would inherit the
	// PIN. (This package leaves the process's environment alone; keywardd
	// passes a function that also overwrites the variable where
	// /proc/PID/environ shows it.) Its error fails Open with ErrConfig; its
	// message should say what to do. The PIN read is kept for the logins
	// after a reconnection.
	ScrubPINEnv func(name string) error
	// PINCredential names a systemd credential holding the user PIN: the
	// file $CREDENTIALS_DIRECTORY/NAME that the unit's LoadCredential= or
	// LoadCredentialEncrypted= gives the service, readable by it alone.
	// Exactly one of PINFile, PINEnv, PINCredential and the URI's
	// pin-source is set.
	PINCredential string

	// Sessions is the size of the session pool, which is also the number
	// of operations that run on the token at once. Zero means 2 × GOMAXPROCS,
	// within 2 to 64. SoftHSM2 gains nothing past 2–4 concurrent
	// operations; a network HSM may want more.
	Sessions int
	// SessionWait bounds how long an operation waits for a free session
	// before it fails with ErrBusy. Zero means 5 s.
	SessionWait time.Duration
	// ReconnectInterval is the least time between a connection that served
	// no call (or a failed attempt to reconnect) and the next attempt to
	// reconnect; a connection that served a call is made again at once when
	// the token says it is lost. Operations in between fail at once with
	// ErrTokenUnavailable. Zero means 1 s.
	ReconnectInterval time.Duration

	// Shared says that other processes make keyward's keys on this token
	// too (the nodes of a fleet, which share one HSM): a key the cache
	// lacks is then looked up on the token instead of being refused as
	// absent, since the cache, complete when it was loaded, misses what
	// the others made since. The caller must ask only for keys its own
	// authenticated state says exist (keywardd's key manager does), or a
	// caller timing refusals could learn which versions are on the token.
	Shared bool
}

// settings is a Config checked and completed, with the PIN read.
type settings struct {
	module    string
	sel       *URI
	pin       secret
	sessions  int
	wait      time.Duration
	reconnect time.Duration
	shared    bool
}

// secret holds the PIN behind a pointer: fmt prints a nested pointer as an
// address, so no %v of a struct holding it shows the PIN (a String method
// would not help: fmt does not call it on unexported fields).
type secret = *struct{ pin string }

const maxPINLen = 255 // PKCS#11 PINs are at most this long in practice

// resolve checks c, applies defaults and reads the PIN. Its errors name the
// setting that is wrong and how to fix it, never the PIN, and match
// ErrConfig.
func (c Config) resolve() (settings, error) {
	s, err := c.load()
	if err != nil {
		return s, configError{err}
	}
	return s, nil
}

func (c Config) load() (settings, error) {
	var s settings
	switch {
	case c.Token != "" && c.URI != "":
		return s, errors.New("hsm: set either the token label or the PKCS#11 URI, not both")
	case c.Token != "":
		s.sel = &URI{Token: c.Token}
	case c.URI != "":
		u, err := ParseURI(c.URI)
		if err != nil {
			return s, err
		}
		s.sel = u
	default:
		return s, errors.New("hsm: no token selected: set the token label or a PKCS#11 URI (pkcs11:token=LABEL)")
	}

	s.module = c.Module
	if s.sel.ModulePath != "" {
		if s.module != "" && filepath.Clean(s.module) != filepath.Clean(s.sel.ModulePath) {
			return s, fmt.Errorf("hsm: module %s and the URI's module-path %s differ; set one of them", s.module, s.sel.ModulePath)
		}
		s.module = s.sel.ModulePath
	}
	if err := checkModulePath(s.module); err != nil {
		return s, err
	}

	pinFile := c.PINFile
	sources := 0
	for _, set := range []bool{c.PINFile != "", c.PINEnv != "", c.PINCredential != "", s.sel.PINSource != ""} {
		if set {
			sources++
		}
	}
	if sources != 1 {
		return s, fmt.Errorf("hsm: give the PIN in exactly one way (a PIN file, an environment variable, a systemd credential, or the URI's pin-source); %d given", sources)
	}
	if s.sel.PINSource != "" {
		var err error
		if pinFile, err = pinSourceFile(s.sel.PINSource); err != nil {
			return s, err
		}
	}
	var pin string
	var err error
	switch {
	case pinFile != "":
		pin, err = readPINFile(pinFile, "PIN file "+pinFile)
	case c.PINCredential != "":
		pin, err = readPINCredential(c.PINCredential)
	default:
		pin, err = readPINEnv(c.PINEnv)
		if err == nil && c.ScrubPINEnv != nil {
			err = c.ScrubPINEnv(c.PINEnv)
		}
	}
	if err != nil {
		return s, err
	}
	s.pin = &struct{ pin string }{pin}

	s.sessions = c.Sessions
	switch {
	case s.sessions == 0:
		s.sessions = min(max(2*runtime.GOMAXPROCS(0), 2), 64)
	case s.sessions < 1 || s.sessions > 1024:
		return s, fmt.Errorf("hsm: session pool size %d is out of range; use 1 to 1024 (0 for the default)", c.Sessions)
	}
	s.wait = c.SessionWait
	if s.wait <= 0 {
		s.wait = 5 * time.Second
	}
	s.reconnect = c.ReconnectInterval
	s.shared = c.Shared
	if s.reconnect <= 0 {
		s.reconnect = time.Second
	}
	return s, nil
}

// pinSourceFile is the file a PKCS#11 URI's pin-source names.
func pinSourceFile(src string) (string, error) {
	path := strings.TrimPrefix(src, "file:")
	if rest, ok := strings.CutPrefix(path, "//"); ok {
		path = rest // file:///path; file://host/path names another host
	}
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("hsm: the URI's pin-source must be an absolute file path (file:/path), not %q", src)
	}
	return path, nil
}

// PINPath is the file Open reads the PIN from: PINFile, the URI's
// pin-source, or the systemd credential's file; "" for a variable, or for
// a configuration Open refuses. keywardd keeps its plugins from reading it.
func (c Config) PINPath() string {
	switch {
	case c.PINFile != "":
		return c.PINFile
	case c.PINCredential != "":
		if dir := os.Getenv("CREDENTIALS_DIRECTORY"); filepath.IsAbs(dir) {
			return filepath.Join(dir, c.PINCredential)
		}
	case c.URI != "":
		if u, err := ParseURI(c.URI); err == nil && u.PINSource != "" {
			path, _ := pinSourceFile(u.PINSource)
			return path
		}
	}
	return ""
}

// checkModulePath refuses what cannot be a PKCS#11 library before dlopen
// sees it, with a message that says what to install or fix.
func checkModulePath(path string) error {
	if path == "" {
		return errors.New("hsm: no PKCS#11 module given: set the module path (SoftHSM2 on Debian: /usr/lib/softhsm/libsofthsm2.so)")
	}
	if !filepath.IsAbs(path) {
		return fmt.Errorf("hsm: module path %q must be absolute, so that the library loaded does not depend on the working directory", path)
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("hsm: module %s does not exist: install the HSM vendor's PKCS#11 library (for tests: the softhsm2 package) or correct the path", path)
	}
	if err != nil {
		return fmt.Errorf("hsm: module %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("hsm: module %s is not a regular file", path)
	}
	return nil
}

// readPINFile reads a PIN file; what names it in errors ("PIN file PATH").
// It refuses a file that others can read, and never puts the file's content
// into an error.
func readPINFile(path, what string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("hsm: %s does not exist", what)
		}
		if errors.Is(err, os.ErrPermission) {
			return "", fmt.Errorf("hsm: %s is not readable by this user (uid %d): fix its owner or mode", what, os.Getuid())
		}
		return "", fmt.Errorf("hsm: %s: %w", what, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("hsm: %s: %w", what, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("hsm: %s is not a regular file", what)
	}
	if fi.Mode().Perm()&0o007 != 0 {
		return "", fmt.Errorf("hsm: %s is accessible to other users (mode %04o): chmod o-rwx it", what, fi.Mode().Perm())
	}
	buf := make([]byte, maxPINLen+3)
	defer clear(buf)
	return readPIN(f, buf, what)
}

// readPIN reads a PIN of at most maxPINLen bytes from r into buf (of more
// than maxPINLen+2 bytes, so that a longer one is caught), without copying
// it anywhere but buf and the string returned: the caller clears buf,
// which it owns. The string is what logs in, now and after a reconnection;
// Go strings cannot be cleared.
func readPIN(r io.Reader, buf []byte, what string) (string, error) {
	n, err := io.ReadFull(r, buf)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("hsm: %s: read failed", what)
	}
	pin := bytes.TrimSuffix(buf[:n], []byte("\n"))
	pin = bytes.TrimSuffix(pin, []byte("\r"))
	return checkPIN(string(pin), what)
}

// readPINCredential reads the PIN from the systemd credential name: the
// file of that name in $CREDENTIALS_DIRECTORY, which systemd makes for the
// service alone (a read-only directory and a 0400 file of its user), with a
// PIN file's checks. Its errors say how to give the unit the credential.
func readPINCredential(name string) (string, error) {
	if name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 255 {
		return "", fmt.Errorf("hsm: PIN credential name %q: a file name, as in LoadCredential=NAME:PATH (keyward-pin)", name)
	}
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return "", fmt.Errorf("hsm: PIN credential %s: $CREDENTIALS_DIRECTORY is not set: start keywardd from its systemd unit with LoadCredential=%s:/etc/keyward/hsm.pin (systemd 247 or newer)", name, name)
	}
	if !filepath.IsAbs(dir) {
		return "", fmt.Errorf("hsm: PIN credential %s: $CREDENTIALS_DIRECTORY %q is not an absolute path", name, dir)
	}
	path := filepath.Join(dir, name)
	what := fmt.Sprintf("PIN credential %s (%s)", name, path)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("hsm: %s does not exist: the unit must load it, with LoadCredential=%s:PATH or LoadCredentialEncrypted=%s:PATH", what, name, name)
	}
	return readPINFile(path, what)
}

// readPINEnv reads the PIN from an environment variable.
func readPINEnv(name string) (string, error) {
	pin, ok := os.LookupEnv(name)
	if !ok {
		return "", fmt.Errorf("hsm: PIN variable %s is not set", name)
	}
	return checkPIN(pin, "PIN variable "+name)
}

func checkPIN(pin, from string) (string, error) {
	switch {
	case pin == "":
		return "", fmt.Errorf("hsm: %s is empty", from)
	case len(pin) > maxPINLen:
		return "", fmt.Errorf("hsm: %s holds more than %d bytes; is it the right file?", from, maxPINLen)
	case strings.ContainsAny(pin, "\x00\n"):
		return "", fmt.Errorf("hsm: %s holds more than one line or a NUL byte", from)
	}
	return pin, nil
}
