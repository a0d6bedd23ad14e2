package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// faultToken opens a fresh token through the fault-injecting module.
func faultToken(t *testing.T, tune ...func(*Config)) (*HSM, *softhsmtest.Faults) {
	t.Helper()
	tok := softhsmtest.New(t)
	f := softhsmtest.NewFaults(t, tok)
	h, err := Open(tokenConfig(tok, append(tune, func(c *Config) { c.Module = f.Module })...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	mustCreate(t, h, KeyID{"kek", 1}, AES256GCM)
	mustCreate(t, h, KeyID{"mac", 1}, HMACSHA256)
	mustCreate(t, h, KeyID{"sig", 1}, ECDSAP256)
	return h, f
}

func TestFaultUnsupportedMechanism(t *testing.T) {
	h, f := faultToken(t)
	ctx := context.Background()
	f.Set("C_GenerateKeyPair 0x70") // CKR_MECHANISM_INVALID
	err := h.CreateKey(ctx, KeyID{"ed", 1}, Ed25519)
	if !errors.Is(err, ErrMechanismUnsupported) || !errors.Is(err, pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)) ||
		!strings.Contains(err.Error(), `create key "ed" v1: mechanism not supported by the token: this token lacks a mechanism keyward needs; see docs/hsm.md for the list (CKR_MECHANISM_INVALID)`) {
		t.Fatalf("got %v", err)
	}
	f.Set("C_SignInit 0x70")
	sg, err := h.Signer(ctx, KeyID{"sig", 1})
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := sg.Sign(nil, d[:], crypto.SHA256); !errors.Is(err, ErrMechanismUnsupported) {
		t.Fatalf("sign: %v, want ErrMechanismUnsupported", err)
	}
	f.Set()
	exercise(t, h, 1) // the sessions are still good
}

func TestFaultPINLocked(t *testing.T) {
	tok := softhsmtest.New(t)
	f := softhsmtest.NewFaults(t, tok)
	f.Set("C_Login 0xA4") // CKR_PIN_LOCKED
	_, err := Open(tokenConfig(tok, func(c *Config) { c.Module = f.Module }))
	if !errors.Is(err, ErrPINLocked) || !strings.Contains(err.Error(), "the security officer must unlock or reset the user PIN") {
		t.Fatalf("got %v, want ErrPINLocked", err)
	}
}

// TestFaultOnce: one device error, removal, lost session, stale handle or
// lost login in the middle of work is invisible to callers: keyward retries
// on another session, or reconnects and retries.
func TestFaultOnce(t *testing.T) {
	h, f := faultToken(t)
	for i, tc := range []struct{ rule, want string }{
		{"C_Sign 0x30", "CKR_DEVICE_ERROR"},
		{"C_Encrypt 0x32", "CKR_DEVICE_REMOVED"},
		{"C_DecryptInit 0xB3", "CKR_SESSION_HANDLE_INVALID"},
		{"C_GetAttributeValue 0x82", "CKR_OBJECT_HANDLE_INVALID"}, // while looking up a key whose handle failed
		{"C_GenerateRandom 0x101", "CKR_USER_NOT_LOGGED_IN"},
	} {
		// The rule hits: while it always fires, the work fails with its code...
		stale(h, KeyID{"kek", 1})
		f.Set(tc.rule)
		if err := tryAll(h, i); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s always: %v, want an error with %s", tc.rule, err, tc.want)
		}
		f.Set()
		exercise(t, h, i)
		// ...and when it fires once, nobody notices.
		stale(h, KeyID{"kek", 1})
		f.Set(tc.rule + " once")
		exercise(t, h, i)
	}
}

// TestFaultSessionError: a general error drops the session, fails that call,
// and nothing after it.
func TestFaultSessionError(t *testing.T) {
	h, f := faultToken(t)
	ctx := context.Background()
	f.Set("C_Encrypt 0x5 once") // CKR_GENERAL_ERROR
	_, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil)
	if !errors.Is(err, ErrToken) || !strings.Contains(err.Error(), "CKR_GENERAL_ERROR") {
		t.Fatalf("got %v, want ErrToken", err)
	}
	exercise(t, h, 1)
}

// TestFaultTokenRemoved: while the token is gone every call fails at once
// with ErrTokenUnavailable and health says so; when it is back, calls work
// again without a restart.
func TestFaultTokenRemoved(t *testing.T) {
	const interval = 100 * time.Millisecond
	h, f := faultToken(t, func(c *Config) { c.ReconnectInterval = interval })
	ctx := context.Background()
	f.Set("* 0xE0") // CKR_TOKEN_NOT_PRESENT from every call
	for range 3 {
		if _, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil); !errors.Is(err, ErrTokenUnavailable) {
			t.Fatalf("token gone: %v, want ErrTokenUnavailable", err)
		}
		if err := h.Health(ctx); !errors.Is(err, ErrTokenUnavailable) {
			t.Fatalf("health with the token gone: %v", err)
		}
	}
	f.Set()
	time.Sleep(interval)
	exercise(t, h, 1)
}
