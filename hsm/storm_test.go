package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// workCalls are the PKCS#11 calls that do the work of encrypt, decrypt and
// hmac: the calls TestSessionFaultsAtRate fails now and then.
var workCalls = []string{"C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt", "C_SignInit", "C_Sign"}

// injected sums the faults the module injected into the work calls.
func injected(c map[string]softhsmtest.Count) uint64 {
	var n uint64
	for _, name := range workCalls {
		n += c[name].Injected
	}
	return n
}

// work runs encrypt, decrypt and hmac from callers goroutines, rounds times
// each, and returns every error.
func work(h *HSM, callers, rounds int) []error {
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for c := range callers {
		wg.Go(func() {
			ctx := context.Background()
			fail := func(op string, i int, err error) {
				mu.Lock()
				errs = append(errs, fmt.Errorf("caller %d round %d %s: %w", c, i, op, err))
				mu.Unlock()
			}
			for i := range rounds {
				msg := []byte(fmt.Sprintf("caller %d round %d", c, i))
				nonce, ct, err := h.Encrypt(ctx, KeyID{"kek", 1}, msg, msg)
				if err != nil {
					fail("encrypt", i, err)
				} else if pt, err := h.Decrypt(ctx, KeyID{"kek", 1}, nonce, ct, msg); err != nil {
					fail("decrypt", i, err)
				} else if !bytes.Equal(pt, msg) {
					fail("decrypt", i, errors.New("the round trip changed the message"))
				}
				if _, err := h.HMACSHA256(ctx, KeyID{"mac", 1}, msg); err != nil {
					fail("hmac", i, err)
				}
			}
		})
	}
	wg.Wait()
	return errs
}

// TestSessionFaultsAtRate: while 1 % of the calls that do the work fail
// with an error that concerns one session, keyward discards that session
// and retries once on another. It never logs in again, opens no more
// sessions than it lost (plus the pool's first fill), leaks none, and a
// call fails only when both its tries met a fault.
func TestSessionFaultsAtRate(t *testing.T) {
	const pool, callers, rounds = 4, 8, 150
	for _, tc := range []struct {
		name string
		code pkcs11.Error
	}{
		{"device error", pkcs11.CKR_DEVICE_ERROR},
		{"session handle invalid", pkcs11.CKR_SESSION_HANDLE_INVALID},
		{"session closed", pkcs11.CKR_SESSION_CLOSED},
		{"operation active", pkcs11.CKR_OPERATION_ACTIVE},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, f := faultToken(t, func(c *Config) { c.Sessions = pool })
			rules := []string{"seed 12"}
			for _, name := range workCalls {
				rules = append(rules, fmt.Sprintf("%s 0x%X 1%%", name, uint(tc.code)))
			}
			exercise(t, h, 0) // every key resolved, so lookups stay out of the count
			before := f.Counts()
			f.Set(rules...)
			errs := work(h, callers, rounds)
			f.Set()
			after := f.Counts()

			faults := injected(after) - injected(before)
			if faults == 0 {
				t.Fatal("no fault was injected: the test shows nothing")
			}
			calls := 3 * callers * rounds
			checkRetried(t, errs, tc.code, calls, faults)
			delta := func(name string) uint64 { return after[name].OK - before[name].OK }
			if n := after["C_Login"].Calls; n != 1 {
				t.Errorf("C_Login called %d times; a lost session must not log in again", n)
			}
			// Each fault discards at most one session; each discarded
			// session is replaced at most once.
			if opened := delta("C_OpenSession"); opened > faults+pool {
				t.Errorf("%d sessions opened for %d faults with a pool of %d", opened, faults, pool)
			}
			if open := after["C_OpenSession"].OK - after["C_CloseSession"].OK; open > pool+1 {
				t.Errorf("%d sessions left open; the pool holds %d and the anchor 1", open, pool)
			}
			t.Logf("%d calls, %d faults injected, %d calls failed, %d sessions opened, %d logins",
				3*callers*rounds, faults, len(errs), delta("C_OpenSession"), after["C_Login"].Calls)
			exercise(t, h, 1)
		})
	}
}

// checkRetried checks the failures of calls that ran with faults falling
// at random on their tries (faults of them ended a try): each failure is
// the injected code, and it took both tries of its call to meet a fault.
// So failures take two faults each, and, as faults fall independently, a
// share r of the tries meets one and about calls·r² calls fail. Every fault
// ends one try, so there were calls + faults - failures tries.
func checkRetried(t *testing.T, errs []error, code pkcs11.Error, calls int, faults uint64) {
	t.Helper()
	for _, err := range errs {
		if !errors.Is(err, code) {
			t.Errorf("%v: want the injected %s or success", err, ckrName(code))
		}
	}
	if uint64(2*len(errs)) > faults {
		t.Errorf("%d of %d calls failed with %d faults on their tries; with a retry on another session each failure takes two", len(errs), calls, faults)
	}
	r := float64(faults) / float64(uint64(calls)+faults-uint64(len(errs)))
	if limit := poissonLimit(float64(calls) * r * r); len(errs) > limit {
		t.Errorf("%d of %d calls failed; with %.1f %% of tries meeting a fault, a retry on another session leaves at most %d failures", len(errs), calls, 100*r, limit)
	}
}

// poissonLimit is the least k that a Poisson count of mean λ exceeds with
// a probability below 10⁻⁹: a bound a working retry never fails by chance.
func poissonLimit(λ float64) int {
	p := math.Exp(-λ) // P(X = k)
	tail := 1 - p     // P(X > k)
	k := 0
	for tail > 1e-9 {
		k++
		p *= λ / float64(k)
		tail -= p
	}
	return k
}

// TestWorkErrorsAnchorFine: while the token answers on the anchor session
// and says the login holds, errors on work calls, or on opening the
// replacement session, fail only the calls they hit, even errors that say
// the login or the token is gone: keyward never logs in again and opens at
// most one replacement session per try.
func TestWorkErrorsAnchorFine(t *testing.T) {
	const calls = 20
	for _, tc := range []struct {
		name  string
		code  pkcs11.Error
		rules []string
	}{
		{"every encryption fails", pkcs11.CKR_DEVICE_ERROR, []string{"C_Encrypt 0x30"}},
		{"no session can be opened", pkcs11.CKR_DEVICE_ERROR, []string{"C_EncryptInit 0x30 once", "C_OpenSession 0x30"}},
		{"every encryption says the user is not logged in", pkcs11.CKR_USER_NOT_LOGGED_IN, []string{"C_Encrypt 0x101"}},
		{"every encryption says the PIN expired", pkcs11.CKR_PIN_EXPIRED, []string{"C_Encrypt 0xA3"}},
		{"every encryption says the PIN is locked", pkcs11.CKR_PIN_LOCKED, []string{"C_Encrypt 0xA4"}},
		{"every encryption says the token is not present", pkcs11.CKR_TOKEN_NOT_PRESENT, []string{"C_Encrypt 0xE0"}},
		{"no session can be opened, the token not present", pkcs11.CKR_TOKEN_NOT_PRESENT, []string{"C_EncryptInit 0xE0 once", "C_OpenSession 0xE0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, f := faultToken(t, func(c *Config) { c.Sessions = 4 })
			exercise(t, h, 0)
			before := f.Counts()
			for i := range calls {
				f.Set(tc.rules...)
				_, _, err := h.Encrypt(context.Background(), KeyID{"kek", 1}, []byte("x"), nil)
				if !errors.Is(err, pkcs11.Error(tc.code)) {
					t.Fatalf("call %d: %v, want an error with %s", i, err, ckrName(tc.code))
				}
				f.Set()
				exercise(t, h, i) // the connection still works
			}
			after := f.Counts()
			if n := after["C_Login"].Calls; n != 1 {
				t.Errorf("C_Login called %d times; the anchor said the login held", n)
			}
			// Each failing call tries twice, each exercise runs six
			// operations; each try opens at most one session.
			if opened := after["C_OpenSession"].Calls - before["C_OpenSession"].Calls; opened > calls*(2+6) {
				t.Errorf("%d sessions opened for %d failing calls and %d exercises", opened, calls, calls)
			}
			if open := after["C_OpenSession"].OK - after["C_CloseSession"].OK; open > 4+1 {
				t.Errorf("%d sessions left open; the pool holds 4 and the anchor 1", open)
			}
		})
	}
}

// TestDeviceErrorsOnEveryCall: the scenario. 1 % of every call
// keyward makes fails, the anchor's checks, opening and closing sessions
// and the work alike. A check that meets a fault asks again, up to
// checkTries times, and acts only on a clear answer, so one fault on the
// check no longer gives the connection up: keyward discards only the
// sessions that failed, never logs in again (a check fails all its answers
// with p³, once in 10⁶ checks at 1 %: about 10⁻⁴ for this test's few
// hundred), and a call fails only when both its tries meet a fault.
// TestCheckAsksAgain shows a fault on a check alone.
func TestDeviceErrorsOnEveryCall(t *testing.T) {
	const pool, callers, rounds = 4, 8, 400
	for _, tc := range []struct {
		name string
		code pkcs11.Error
	}{
		{"device error", pkcs11.CKR_DEVICE_ERROR},
		{"session handle invalid", pkcs11.CKR_SESSION_HANDLE_INVALID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, f := faultToken(t, func(c *Config) { c.Sessions = pool })
			exercise(t, h, 0)
			before := f.Counts()
			f.Set("seed 7", fmt.Sprintf("* 0x%X 1%%", uint(tc.code)))
			errs := work(h, callers, rounds)
			f.Set()
			after := f.Counts()

			delta := func(name string, n func(softhsmtest.Count) uint64) uint64 { return n(after[name]) - n(before[name]) }
			faulted := func(c softhsmtest.Count) uint64 { return c.Injected }
			// A fault ends the try it hits when it hits the work or the
			// opening of the try's session; one on a check is asked again,
			// one on closing a session changes nothing for the call.
			tryFaults := injected(after) - injected(before) + delta("C_OpenSession", faulted)
			if tryFaults == 0 {
				t.Fatal("no fault hit a try: the test shows nothing")
			}
			calls := 3 * callers * rounds
			checkRetried(t, errs, tc.code, calls, tryFaults)
			if n := after["C_Login"].Calls; n != 1 {
				t.Errorf("C_Login called %d times; a fault on a check must not give the connection up", n)
			}
			// A close that failed leaves its session to the token.
			if open := after["C_OpenSession"].OK - after["C_CloseSession"].OK; open > pool+1+delta("C_CloseSession", faulted) {
				t.Errorf("%d sessions left open; the pool holds %d, the anchor 1, and %d closes failed", open, pool, delta("C_CloseSession", faulted))
			}
			t.Logf("%d calls, %d faults (%d on tries, %d on checks), %d calls failed, %d logins",
				calls, delta("C_GetSessionInfo", faulted)+tryFaults+delta("C_CloseSession", faulted), tryFaults, delta("C_GetSessionInfo", faulted), len(errs), after["C_Login"].Calls)
			exercise(t, h, 1)
		})
	}
}

// TestCheckAsksAgain: after a session breaks, one failed answer of the
// anchor (a device error, or its handle said invalid) may be the device's
// passing fault: keyward asks again, and a clear answer that the login held
// keeps the connection. The call succeeds on its retry; nobody logs in.
func TestCheckAsksAgain(t *testing.T) {
	for _, code := range []pkcs11.Error{pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_SESSION_HANDLE_INVALID} {
		t.Run(ckrName(code), func(t *testing.T) {
			h, f := faultToken(t)
			exercise(t, h, 0)
			before := f.Counts()
			f.Set(fmt.Sprintf("C_Encrypt 0x%X once", uint(code)), fmt.Sprintf("C_GetSessionInfo 0x%X once", uint(code)))
			if _, _, err := h.Encrypt(context.Background(), KeyID{"kek", 1}, []byte("x"), nil); err != nil {
				t.Fatalf("encrypt: %v; the retry should have run on another session", err)
			}
			after := f.Counts()
			if n := after["C_GetSessionInfo"].Calls - before["C_GetSessionInfo"].Calls; n != 2 {
				t.Errorf("the check asked %d times; want twice: the failed answer, then the clear one", n)
			}
			if n := after["C_Login"].Calls - before["C_Login"].Calls; n != 0 {
				t.Errorf("%d logins; the anchor said the login held", n)
			}
			f.Set()
			exercise(t, h, 1)
		})
	}
}

// TestReconnectStorms: when the anchor agrees that the login or the token
// is gone (it says so, or fails every answer), keyward gives the connection
// up, and a token that keeps refusing costs one login at once and then at
// most one per reconnect interval, never one (or two: a call and its retry)
// per call; calls in between fail at once. Here the token refuses the
// reconnect's own check of the login too, and a reconnect that fails waits
// the interval; TestReconnectAtOnceAfterServedCall shows a reconnect that
// works and a connection that then serves no call. TestWorkErrorsAnchorFine
// has the same errors with the anchor fine.
func TestReconnectStorms(t *testing.T) {
	const interval = 50 * time.Millisecond
	for _, tc := range []struct {
		name  string
		code  pkcs11.Error
		rules []string
	}{
		{"user not logged in", pkcs11.CKR_USER_NOT_LOGGED_IN, []string{"C_Encrypt 0x101", "C_GetSessionInfo 0x101"}},
		{"PIN expired", pkcs11.CKR_PIN_EXPIRED, []string{"C_Encrypt 0xA3", "C_GetSessionInfo 0xA3"}},
		{"PIN locked", pkcs11.CKR_PIN_LOCKED, []string{"C_Encrypt 0xA4", "C_GetSessionInfo 0xA4"}},
		{"token not present", pkcs11.CKR_TOKEN_NOT_PRESENT, []string{"C_Encrypt 0xE0", "C_GetSessionInfo 0xE0"}},
		{"session handle invalid on the anchor too", pkcs11.CKR_SESSION_HANDLE_INVALID, []string{"C_Encrypt 0xB3", "C_GetSessionInfo 0xB3"}},
		{"device error on the anchor too", pkcs11.CKR_DEVICE_ERROR, []string{"C_Encrypt 0x30", "C_GetSessionInfo 0x30"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, f := faultToken(t, func(c *Config) { c.ReconnectInterval = interval; c.Sessions = 4 })
			exercise(t, h, 0)
			before := f.Counts()
			f.Set(tc.rules...)
			start := time.Now()
			calls := 0
			for time.Since(start) < 6*interval {
				_, _, err := h.Encrypt(context.Background(), KeyID{"kek", 1}, []byte("x"), nil)
				if !errors.Is(err, pkcs11.Error(tc.code)) {
					t.Fatalf("encrypt with the token refusing: %v, want an error with %s", err, ckrName(tc.code))
				}
				calls++
			}
			elapsed := time.Since(start)
			after := f.Counts()
			f.Set()
			logins := after["C_Login"].Calls - before["C_Login"].Calls
			if max := 1 + uint64(elapsed/interval); logins > max {
				t.Errorf("%d logins in %v for %d calls; at most %d (one at once, then one per %v)", logins, elapsed, calls, max, interval)
			}
			// A connection opens the anchor and the session its keys are
			// read on, which serves the next call; calls in between open none.
			if opened := after["C_OpenSession"].Calls - before["C_OpenSession"].Calls; opened > 2*logins {
				t.Errorf("%d sessions opened for %d logins", opened, logins)
			}
			t.Logf("%d calls in %v, %d logins", calls, elapsed, logins)
			time.Sleep(interval)
			exercise(t, h, 1)
		})
	}
}

// TestPINLockedAtReconnect: a PIN the token refuses when keyward reconnects
// stops keyward for good: later calls fail with ErrPINLocked without
// another login, even once the token would take the PIN again.
func TestPINLockedAtReconnect(t *testing.T) {
	const interval = 20 * time.Millisecond
	h, f := faultToken(t, func(c *Config) { c.ReconnectInterval = interval })
	exercise(t, h, 0)
	before := f.Counts()
	f.Set("C_Encrypt 0x101", "C_GetSessionInfo 0x101", "C_Login 0xA4") // the login lost, and the PIN locked when keyward logs in again
	ctx := context.Background()
	if _, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil); !errors.Is(err, ErrPINLocked) {
		t.Fatalf("encrypt: %v, want ErrPINLocked", err)
	}
	f.Set()
	time.Sleep(2 * interval)
	for range 3 {
		if _, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil); !errors.Is(err, ErrPINLocked) {
			t.Fatalf("encrypt after the PIN was locked: %v, want ErrPINLocked", err)
		}
		if err := h.Health(ctx); !errors.Is(err, ErrPINLocked) {
			t.Fatalf("health after the PIN was locked: %v, want ErrPINLocked", err)
		}
	}
	if logins := f.Counts()["C_Login"].Calls - before["C_Login"].Calls; logins != 1 {
		t.Fatalf("%d logins; keyward must try a locked PIN once and never again", logins)
	}
}

// TestReconnectAtOnceAfterServedCall: a lost connection that had served a
// call is reconnected at once (a token reset or a lost login costs callers
// one slower call, however often); one lost before it served any did not
// help, so the next try comes no sooner than the reconnect interval after
// it was made, and calls in between fail at once without a login.
func TestReconnectAtOnceAfterServedCall(t *testing.T) {
	const interval = time.Second // far longer than the 20 calls that fail at once take
	h, f := faultToken(t, func(c *Config) { c.ReconnectInterval = interval })
	ctx := context.Background()
	exercise(t, h, 0)
	encrypt := func() error { _, _, err := h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil); return err }
	logins := func() int { return f.Calls("C_Login") }
	n := logins()

	// The login is lost once, the anchor says so: keyward reconnects at
	// once, the retry works.
	f.Set("C_Encrypt 0x101 once", "C_GetSessionInfo 0x101 once")
	if err := encrypt(); err != nil {
		t.Fatalf("encrypt across a lost login: %v", err)
	}
	if logins() != n+1 {
		t.Fatalf("%d logins for a lost login; want 1, at once", logins()-n)
	}
	// The work fails again after that reconnect, which serves no call...
	f.Set("C_Encrypt 0x101", "C_GetSessionInfo 0x101 once")
	if err := encrypt(); !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)) {
		t.Fatalf("encrypt with the work refused: %v", err)
	}
	if logins() != n+2 {
		t.Fatalf("%d logins; want 2", logins()-n)
	}
	// ...and then the anchor agrees: the connection is given up, and as it
	// served no call, nobody logs in until the interval has passed.
	f.Set("C_Encrypt 0x101", "C_GetSessionInfo 0x101")
	for range 20 {
		if err := encrypt(); !errors.Is(err, ErrTokenUnavailable) {
			t.Fatalf("encrypt with the login lost again: %v, want ErrTokenUnavailable", err)
		}
	}
	if logins() != n+2 {
		t.Fatalf("%d logins within the interval after a connection that served no call; want none", logins()-n-2)
	}
	f.Set()
	time.Sleep(interval)
	exercise(t, h, 1)
	if logins() != n+3 {
		t.Fatalf("%d logins after the interval; want 1", logins()-n-2)
	}
}
