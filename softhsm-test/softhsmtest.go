// Package softhsmtest makes SoftHSM2 tokens for tests and for trying
// keyward: each in a directory of its own, with its own SOFTHSM2_CONF, a
// random user PIN in a file, and nothing in the system token store.
//
// SoftHSM2 reads SOFTHSM2_CONF when the library is initialized, once per
// process. So a process uses one token directory at a time: New sets
// SOFTHSM2_CONF with t.Setenv (which also keeps such tests from running in
// parallel), and every hsm.HSM opened on the previous token must be closed
// before the next token is made.
package softhsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// Token is a SoftHSM2 token in a directory of its own.
type Token struct {
	Dir     string // holds softhsm2.conf, tokens/, user.pin and so.pin
	Conf    string // the SOFTHSM2_CONF that finds this token
	Module  string // path of libsofthsm2.so
	Label   string
	Serial  string
	PIN     string // the user PIN
	PINFile string // a 0600 file holding the user PIN
	SOPIN   string // the security officer's PIN
}

// modulePaths are where Debian and other distributions put libsofthsm2.so.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// Module returns the path of libsofthsm2.so: $SOFTHSM2_MODULE if set, else
// the first of the usual places that has it.
func Module() (string, error) {
	if p := os.Getenv("SOFTHSM2_MODULE"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("softhsmtest: SOFTHSM2_MODULE=%s: %w", p, err)
		}
		return p, nil
	}
	for _, p := range modulePaths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("softhsmtest: libsofthsm2.so not found in %s: install the Debian package softhsm2 (apt-get install softhsm2), or set SOFTHSM2_MODULE to its path", strings.Join(modulePaths, ", "))
}

// Prepare lays out a token directory: DIR/softhsm2.conf pointing at
// DIR/tokens, and the PIN files. PINs come from soPIN and userPIN, or are
// random when empty. The token itself is made by Init.
func Prepare(dir, label, soPIN, userPIN string) (*Token, error) {
	mod, err := Module()
	if err != nil {
		return nil, err
	}
	if label == "" {
		return nil, errors.New("softhsmtest: empty token label")
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "tokens"), 0o700); err != nil {
		return nil, fmt.Errorf("softhsmtest: %w", err)
	}
	if soPIN == "" {
		soPIN = randomPIN()
	}
	if userPIN == "" {
		userPIN = randomPIN()
	}
	tok := &Token{
		Dir:     dir,
		Conf:    filepath.Join(dir, "softhsm2.conf"),
		Module:  mod,
		Label:   label,
		PIN:     userPIN,
		PINFile: filepath.Join(dir, "user.pin"),
		SOPIN:   soPIN,
	}
	conf := fmt.Sprintf("# SoftHSM2 configuration of one keyward test or dev token\ndirectories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", filepath.Join(dir, "tokens"))
	files := []struct{ path, data string }{
		{tok.Conf, conf},
		{tok.PINFile, userPIN + "\n"},
		{filepath.Join(dir, "so.pin"), soPIN + "\n"},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, []byte(f.data), 0o600); err != nil {
			return nil, fmt.Errorf("softhsmtest: %w", err)
		}
	}
	return tok, nil
}

func randomPIN() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Init initializes the token through PKCS#11 (C_InitToken, C_InitPIN), so
// no PIN appears on a command line. SOFTHSM2_CONF must be tok.Conf, and the
// library must not be initialized in this process yet: Init initializes and
// finalizes it.
func (tok *Token) Init() error {
	if got := os.Getenv("SOFTHSM2_CONF"); got != tok.Conf {
		return fmt.Errorf("softhsmtest: SOFTHSM2_CONF is %q, not %q", got, tok.Conf)
	}
	p := pkcs11.New(tok.Module)
	if p == nil {
		return fmt.Errorf("softhsmtest: %s could not be loaded", tok.Module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			return errors.New("softhsmtest: SoftHSM2 is already initialized in this process: close every hsm.HSM before making a new token (SoftHSM2 reads SOFTHSM2_CONF only at initialization)")
		}
		return fmt.Errorf("softhsmtest: C_Initialize: %w", err)
	}
	defer p.Finalize()

	slots, err := p.GetSlotList(false)
	if err != nil {
		return fmt.Errorf("softhsmtest: C_GetSlotList: %w", err)
	}
	free := -1
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			free = int(s)
			break
		}
	}
	if free < 0 {
		return errors.New("softhsmtest: SoftHSM2 offers no free slot")
	}
	if err := p.InitToken(uint(free), tok.SOPIN, tok.Label); err != nil {
		return fmt.Errorf("softhsmtest: C_InitToken: %w", err)
	}
	// SoftHSM2 moves an initialized token to a slot derived from its serial.
	slots, err = p.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("softhsmtest: C_GetSlotList: %w", err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil || strings.TrimRight(ti.Label, " ") != tok.Label {
			continue
		}
		tok.Serial = strings.TrimRight(ti.SerialNumber, " ")
		sh, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("softhsmtest: C_OpenSession: %w", err)
		}
		defer p.CloseSession(sh)
		if err := p.Login(sh, pkcs11.CKU_SO, tok.SOPIN); err != nil {
			return fmt.Errorf("softhsmtest: C_Login as SO: %w", err)
		}
		if err := p.InitPIN(sh, tok.PIN); err != nil {
			return fmt.Errorf("softhsmtest: C_InitPIN: %w", err)
		}
		return p.Logout(sh)
	}
	return fmt.Errorf("softhsmtest: token %q not found after C_InitToken", tok.Label)
}

// New makes a fresh token for t under t.TempDir() and points SOFTHSM2_CONF
// at it for the rest of the test. It fails the test, never skips it, when
// SoftHSM2 is not installed.
func New(t testing.TB) *Token {
	t.Helper()
	label := "keyward-test-" + randomPIN()[:8]
	tok, err := Prepare(t.TempDir(), label, "", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", tok.Conf)
	if err := tok.Init(); err != nil {
		t.Fatal(err)
	}
	return tok
}

// String describes the token without its PINs, so that printing a Token in
// a failure message shows none.
func (tok *Token) String() string {
	return fmt.Sprintf("token %q (serial %s) in %s", tok.Label, tok.Serial, tok.Dir)
}

// RequireRoot is for tests that need root (another user's process, a PID
// namespace, a mount): in CI, which runs as root, a missing privilege fails
// the test; elsewhere it skips, saying why.
func RequireRoot(t testing.TB, what string) {
	t.Helper()
	if os.Getuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("this test %s and needs root, as CI has", what)
	}
	t.Skipf("needs root: it %s", what)
}
