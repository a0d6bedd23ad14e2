package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// resetToken does to the process what a token reset does: every session,
// login and object handle is gone (C_Finalize, then C_Initialize again
// unless gone is set, leaving the library uninitialized).
func resetToken(t *testing.T, h *HSM) {
	t.Helper()
	if err := h.mod.ctx.Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := h.mod.ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
}

// reconnect resets the token and has keyward notice it: keyward reconnects
// and loads its keys again, as at start.
func reconnect(t *testing.T, h *HSM) {
	t.Helper()
	resetToken(t, h)
	if err := h.Health(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// exercise runs one of each operation and fails the test on any error.
func exercise(t *testing.T, h *HSM, round int) {
	t.Helper()
	if err := tryAll(h, round); err != nil {
		t.Fatal(err)
	}
}

// tryAll runs one of each operation and returns the first error.
func tryAll(h *HSM, round int) error {
	ctx := context.Background()
	msg := []byte(fmt.Sprint("round ", round))
	nonce, ct, err := h.Encrypt(ctx, KeyID{"kek", 1}, msg, msg)
	if err != nil {
		return fmt.Errorf("round %d encrypt: %w", round, err)
	}
	if pt, err := h.Decrypt(ctx, KeyID{"kek", 1}, nonce, ct, msg); err != nil || !bytes.Equal(pt, msg) {
		return fmt.Errorf("round %d decrypt: %w", round, err)
	}
	if _, err := h.HMACSHA256(ctx, KeyID{"mac", 1}, msg); err != nil {
		return fmt.Errorf("round %d hmac: %w", round, err)
	}
	sg, err := h.Signer(ctx, KeyID{"sig", 1})
	if err != nil {
		return fmt.Errorf("round %d signer: %w", round, err)
	}
	d := sha256.Sum256(msg)
	if _, err := sg.Sign(nil, d[:], crypto.SHA256); err != nil {
		return fmt.Errorf("round %d sign: %w", round, err)
	}
	if _, err := h.Random(ctx, 16); err != nil {
		return fmt.Errorf("round %d random: %w", round, err)
	}
	if err := h.Health(ctx); err != nil {
		return fmt.Errorf("round %d health: %w", round, err)
	}
	return nil
}

func recoveryToken(t *testing.T, tune ...func(*Config)) *HSM {
	h, _ := openToken(t, tune...)
	mustCreate(t, h, KeyID{"kek", 1}, AES256GCM)
	mustCreate(t, h, KeyID{"mac", 1}, HMACSHA256)
	mustCreate(t, h, KeyID{"sig", 1}, ECDSAP256)
	return h
}

// TestRecoverAfterReset: after a token reset, the next call of every kind
// succeeds (the package reconnects, logs in, finds the handles again and
// retries once); no caller sees the reset.
func TestRecoverAfterReset(t *testing.T) {
	h := recoveryToken(t)
	exercise(t, h, 0)
	gen := h.gen
	for round := 1; round <= 3; round++ {
		resetToken(t, h)
		exercise(t, h, round)
	}
	if h.gen <= gen {
		t.Fatal("the resets did not renew the sessions")
	}

	// Library state lost and not brought back by anyone: keyward
	// initializes it again itself.
	if err := h.mod.ctx.Finalize(); err != nil {
		t.Fatal(err)
	}
	exercise(t, h, 4)

	// Logged out under keyward's feet: private objects vanish from its
	// sessions; that is a lost login, not a missing key.
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error { return p.Logout(s) })
	stale(h, KeyID{"kek", 1}) // its next use looks it up by label
	exercise(t, h, 5)

	// Creating a key is not retried behind the caller's back: it may have
	// happened before the connection was lost. The next call reconnects.
	resetToken(t, h)
	ctx := context.Background()
	if err := h.CreateKey(ctx, KeyID{"new", 1}, AES256GCM); !errors.Is(err, ErrTokenUnavailable) {
		t.Fatalf("create across a reset: %v, want ErrTokenUnavailable", err)
	}
	mustCreate(t, h, KeyID{"new", 1}, AES256GCM)
	exercise(t, h, 6)
}

// TestConcurrentRecovery: many callers meet a reset at once; one of them
// reconnects, and every call still succeeds. Run with -race.
func TestConcurrentRecovery(t *testing.T) {
	h := recoveryToken(t, func(c *Config) { c.Sessions = 4 })
	const callers, calls = 8, 25
	for round := range 3 {
		var wg sync.WaitGroup
		errs := make(chan error, callers*calls)
		for c := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx := context.Background()
				for i := range calls {
					msg := []byte(fmt.Sprintf("%d/%d/%d", round, c, i))
					var err error
					switch (c + i) % 4 {
					case 0:
						var nonce, ct, pt []byte
						if nonce, ct, err = h.Encrypt(ctx, KeyID{"kek", 1}, msg, nil); err == nil {
							if pt, err = h.Decrypt(ctx, KeyID{"kek", 1}, nonce, ct, nil); err == nil && !bytes.Equal(pt, msg) {
								err = errors.New("round trip changed the message")
							}
						}
					case 1:
						_, err = h.HMACSHA256(ctx, KeyID{"mac", 1}, msg)
					case 2:
						var sg *Signer
						if sg, err = h.Signer(ctx, KeyID{"sig", 1}); err == nil {
							d := sha256.Sum256(msg)
							_, err = sg.Sign(nil, d[:], crypto.SHA256)
						}
					case 3:
						_, err = h.Random(ctx, 32)
					}
					if err != nil {
						errs <- fmt.Errorf("round %d caller %d call %d: %w", round, c, i, err)
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		resetToken(t, h)
	}
}

// TestTokenGoneAndBack: while the token is missing, calls fail at once with
// ErrTokenUnavailable and keyward tries to reconnect no more often than the
// reconnect interval; when the token is back, calls succeed again.
func TestTokenGoneAndBack(t *testing.T) {
	const interval = 200 * time.Millisecond
	h := recoveryToken(t, func(c *Config) { c.ReconnectInterval = interval })
	ctx := context.Background()
	conf, _ := os.ReadFile(os.Getenv("SOFTHSM2_CONF"))
	tokens := strings.TrimSpace(strings.TrimPrefix(strings.Split(string(conf), "\n")[1], "directories.tokendir ="))
	if err := os.Rename(tokens, tokens+".away"); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(tokens, 0o700)
	if err := h.mod.ctx.Finalize(); err != nil {
		t.Fatal(err)
	}

	_, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil)
	if !errors.Is(err, ErrTokenUnavailable) || !strings.Contains(err.Error(), "token not found") {
		t.Fatalf("token gone: %v, want ErrTokenUnavailable saying the token is not found", err)
	}
	if err := h.Health(ctx); !errors.Is(err, ErrTokenUnavailable) {
		t.Fatalf("health with the token gone: %v", err)
	}
	// Within the interval nothing is tried: bring the token back and the
	// next call still fails at once.
	os.Remove(tokens)
	if err := os.Rename(tokens+".away", tokens); err != nil {
		t.Fatal(err)
	}
	h.mod.ctx.Finalize() // so that SoftHSM2 reads the token directory again
	start := time.Now()
	if _, err := h.Random(ctx, 8); !errors.Is(err, ErrTokenUnavailable) {
		t.Fatalf("within the reconnect interval: %v, want ErrTokenUnavailable", err)
	}
	if d := time.Since(start); d > interval/2 {
		t.Fatalf("a failing call took %v; it should fail at once", d)
	}
	time.Sleep(interval)
	exercise(t, h, 1)
}

// TestPINChangedIsNotRetried: when the PIN no longer works at reconnect,
// keyward stops: every later call fails with ErrPINIncorrect without trying
// the PIN again, even once the old PIN would work again.
func TestPINChangedIsNotRetried(t *testing.T) {
	h, tok := openToken(t)
	mustCreate(t, h, KeyID{"kek", 1}, AES256GCM)
	ctx := context.Background()
	setPIN := func(pin string) {
		t.Helper()
		resetToken(t, h)
		p := h.mod.ctx
		s, err := p.OpenSession(h.token.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer p.CloseSession(s)
		if err := p.Login(s, pkcs11.CKU_SO, tok.SOPIN); err != nil {
			t.Fatal(err)
		}
		if err := p.InitPIN(s, pin); err != nil {
			t.Fatal(err)
		}
		if err := p.Logout(s); err != nil {
			t.Fatal(err)
		}
	}
	setPIN("a-new-pin-1234")
	_, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil)
	if !errors.Is(err, ErrPINIncorrect) {
		t.Fatalf("after the PIN changed: %v, want ErrPINIncorrect", err)
	}
	if strings.Contains(err.Error(), tok.PIN) {
		t.Fatalf("the error shows the PIN: %v", err)
	}
	setPIN(tok.PIN) // the configured PIN would work again...
	for range 3 {
		if err := h.Health(ctx); !errors.Is(err, ErrPINIncorrect) {
			t.Fatalf("health: %v, want ErrPINIncorrect: keyward must not try the PIN again", err)
		}
	}
	// ...and a new Open (an operator's restart) uses it.
	h.Close()
	h2, err := Open(tokenConfig(tok))
	if err != nil {
		t.Fatal(err)
	}
	h2.Close()
}

// TestNoSessionLeak: losing the login (not the library) again and again
// leaves no sessions open beyond the pool and the anchor.
func TestNoSessionLeak(t *testing.T) {
	const pool = 4
	h, _ := openToken(t, func(c *Config) { c.Sessions = pool })
	ctx := context.Background()
	for range 20 {
		var held []session
		for range pool {
			s, _, err := h.acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, s)
		}
		for _, s := range held {
			h.release(s, nil)
		}
		raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error { return p.Logout(s) })
		if err := h.Health(ctx); err != nil {
			t.Fatal(err)
		}
	}
	open := 0
	for sh := pkcs11.SessionHandle(1); sh < 500; sh++ {
		if _, err := h.mod.ctx.GetSessionInfo(sh); err == nil {
			open++
		}
	}
	if open > pool+1 {
		t.Fatalf("%d sessions open after 20 lost logins; the pool holds at most %d and the anchor", open, pool)
	}
}
