package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// HSM is an open, logged-in token. It is safe for concurrent use. Its
// methods wait at most Config.SessionWait for a session, and reconnect by
// themselves after the token went away and came back.
type HSM struct {
	set    settings
	mod    *module
	sem    chan struct{} // one slot per session in use
	closed atomic.Bool
	// observe, if set, hears of every operation (SetObserver).
	observe atomic.Pointer[func(op string, took time.Duration, err error)]
	// softHSM: the token is SoftHSM2, which reports a failed GCM tag check
	// as CKR_GENERAL_ERROR.
	softHSM atomic.Bool

	mu      sync.Mutex // guards the fields below
	token   TokenInfo
	anchor  session // never used for operations: keeps the login alive
	gen     uint64  // bumped each time the sessions are given up
	idle    []session
	opened  uint64                          // sessions opened so far: the last one's id
	owners  map[pkcs11.SessionHandle]uint64 // the id of the session that holds each open handle
	inUse   int                             // sessions handed out and not yet released
	broken  error                           // why the token is unusable; nil while connected
	fatal   error                           // what no reconnect can fix: a wrong or locked PIN
	nextTry time.Time                       // earliest next reconnect attempt
	since   time.Time                       // when the current connection was made
	proven  bool                            // an operation succeeded on the current connection

	keysMu sync.RWMutex
	keys   map[keyRef]*keyEntry // keyward's keys on the token, checked, for the current login
	// complete: keys holds every keyward key on the token (loadKeys ran on
	// this connection), so a key it lacks is not there. False between a
	// lost connection and the next.
	complete bool

	createMu sync.Mutex // creating keys one at a time keeps the exists check true
}

// session is one of keyward's sessions on the token. Its id tells it from
// a later session the token gave the same handle number (SoftHSM2 gives
// the lowest free one), so that closing a session keyward believes lost never
// closes the one that took its number.
type session struct {
	h   pkcs11.SessionHandle
	gen uint64 // the connection it belongs to
	id  uint64
}

// TokenInfo describes the token in use, as the token reports it.
type TokenInfo struct {
	Slot         uint
	Label        string
	Manufacturer string
	Model        string
	Serial       string
	SlotDesc     string
	SlotManuf    string
	Flags        uint
}

// Open loads the PKCS#11 module, selects exactly one token, reads the PIN
// and logs in. A wrong PIN fails at once and is never tried again.
func Open(cfg Config) (*HSM, error) {
	set, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	mod, err := openModule(set.module)
	if err != nil {
		return nil, err
	}
	h := &HSM{
		set:    set,
		mod:    mod,
		sem:    make(chan struct{}, set.sessions),
		keys:   map[keyRef]*keyEntry{},
		owners: map[pkcs11.SessionHandle]uint64{},
	}
	h.mu.Lock()
	err = h.connectLocked()
	h.mu.Unlock()
	if err != nil {
		mod.release()
		return nil, err
	}
	return h, nil
}

// Token returns what the token said about itself when keyward last connected.
func (h *HSM) Token() TokenInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.token
}

// Close waits for running operations (at most the session wait time), ends
// the sessions and, with the last user of the module, finalizes it. If
// operations are still running after the wait, the module stays loaded (ending
// it under running calls could crash the process) and Close says so.
func (h *HSM) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	deadline := time.NewTimer(h.set.wait)
	defer deadline.Stop()
	for range cap(h.sem) {
		select {
		case h.sem <- struct{}{}:
		case <-deadline.C:
			return &Error{Op: "close", Err: ErrBusy, Detail: fmt.Sprintf("operations still running after %s; the module stays loaded", h.set.wait)}
		}
	}
	h.mu.Lock()
	h.dropSessionsLocked()
	h.mu.Unlock()
	h.mod.release()
	return nil
}

// connectLocked finds the token, opens the anchor session, logs in and
// loads every keyward key on the token (loadKeys) before any call runs on
// the connection. If the token refuses the PIN, it records that as fatal.
func (h *HSM) connectLocked() error {
	ctx := h.mod.ctx
	slots, err := ctx.GetSlotList(true)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)) {
		if err = h.mod.reinitialize(); err == nil {
			slots, err = ctx.GetSlotList(true)
		}
	}
	if err != nil {
		return opError("open", "", err, "listing the module's slots failed")
	}
	var found []TokenInfo
	var present []string
	for _, id := range slots {
		ti, err := ctx.GetTokenInfo(id)
		if err != nil {
			continue // the slot emptied since it was listed
		}
		si, _ := ctx.GetSlotInfo(id)
		t := TokenInfo{
			Slot:         id,
			Label:        strings.TrimRight(ti.Label, " \x00"),
			Manufacturer: strings.TrimRight(ti.ManufacturerID, " \x00"),
			Model:        strings.TrimRight(ti.Model, " \x00"),
			Serial:       strings.TrimRight(ti.SerialNumber, " \x00"),
			SlotDesc:     strings.TrimRight(si.SlotDescription, " \x00"),
			SlotManuf:    strings.TrimRight(si.ManufacturerID, " \x00"),
			Flags:        ti.Flags,
		}
		if t.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			present = append(present, fmt.Sprintf("%q (serial %s)", t.Label, t.Serial))
		}
		if h.set.sel.matches(t) {
			found = append(found, t)
		}
	}
	sel := h.selector()
	switch {
	case len(found) == 0:
		if len(present) == 0 {
			present = []string{"none"}
		}
		return &Error{Op: "open", Err: ErrTokenNotFound, Detail: fmt.Sprintf("no token matches %s in %s; tokens present: %s", sel, h.set.module, strings.Join(present, ", "))}
	case len(found) > 1:
		return &Error{Op: "open", Err: ErrAmbiguous, Detail: fmt.Sprintf("%d tokens match %s; add serial= to the PKCS#11 URI to choose one", len(found), sel)}
	}
	t := found[0]
	switch {
	case t.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 || t.Flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0:
		return &Error{Op: "open", Err: ErrTokenNotFound, Detail: fmt.Sprintf("token %q is not initialized or has no user PIN", t.Label)}
	case t.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0:
		h.fatal = &Error{Op: "login", Err: ErrPINLocked, Detail: hint(ErrPINLocked)}
		return h.fatal
	}
	anchor, err := h.openLocked(t.Slot)
	if err != nil {
		return opError("open", "", err, fmt.Sprintf("opening a session on token %q failed", t.Label))
	}
	err = ctx.Login(anchor.h, pkcs11.CKU_USER, h.set.pin.pin)
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		h.closeLocked(anchor)
		err = opError("login", "", err, "")
		if errors.Is(err, ErrPINIncorrect) || errors.Is(err, ErrPINLocked) {
			h.fatal = err // never retried: each try brings the token closer to locking the PIN
		}
		return err
	}
	h.token = t
	h.softHSM.Store(t.Manufacturer == "SoftHSM project")
	// The keys are loaded on a session of the pool, which then serves
	// calls like any other.
	s, err := h.openLocked(t.Slot)
	if err != nil {
		h.closeLocked(anchor)
		return opError("open", "", err, fmt.Sprintf("opening a session on token %q failed", t.Label))
	}
	start := time.Now()
	keys, err := h.loadKeys(s.h)
	if o := h.observe.Load(); o != nil {
		(*o)("load keys", time.Since(start), err)
	}
	if err != nil {
		h.closeLocked(s)
		h.closeLocked(anchor)
		return opError("load keys", "", err, "reading keyward's keys on the token failed")
	}
	h.anchor = anchor
	h.idle = append(h.idle, s)
	h.since = time.Now()
	h.proven = false
	// Operations of the lost connection may have cached handles after it was
	// given up; they have all ended now (readyLocked waits), so this
	// replaces the last of them.
	h.keysMu.Lock()
	h.keys, h.complete = keys, true
	h.keysMu.Unlock()
	return nil
}

// selector shows which token the configuration asks for, without the PIN
// source or module path.
func (h *HSM) selector() string {
	u := *h.set.sel
	u.ModulePath, u.PINSource = "", ""
	return u.String()
}

// openLocked opens a session on slot and records it as the holder of its
// handle.
func (h *HSM) openLocked(slot uint) (session, error) {
	sh, err := h.mod.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return session{}, err
	}
	h.opened++
	h.owners[sh] = h.opened // a handle given again: its earlier holder is gone
	return session{h: sh, gen: h.gen, id: h.opened}, nil
}

// closeLocked closes s, unless the token has given its handle to a newer
// session of keyward's since (s is gone then). A session the token already
// dropped is closed all the same: the token says so and nothing else
// happens, while one it only failed (a device error, or a test's injected
// fault) is really ended, so none is left open.
func (h *HSM) closeLocked(s session) {
	if s.id == 0 || h.owners[s.h] != s.id {
		return
	}
	delete(h.owners, s.h)
	_ = h.mod.ctx.CloseSession(s.h)
}

// dropSessionsLocked ends the idle sessions and the anchor and forgets the
// cached handles: on Close, and when the connection is lost. Handles are
// closed even then, since a lost login or a device error leaves sessions open
// on the token. That is safe because keyward is the library's only user in
// the process, closeLocked never closes a handle the token gave to a newer
// session, and keyward reconnects only once every session of the lost
// connection is back (readyLocked).
func (h *HSM) dropSessionsLocked() {
	for _, s := range h.idle {
		h.closeLocked(s)
	}
	h.closeLocked(h.anchor)
	h.idle = nil
	h.anchor = session{}
	h.gen++
	h.keysMu.Lock()
	h.keys, h.complete = map[keyRef]*keyEntry{}, false
	h.keysMu.Unlock()
}

// breakLocked records that the connection is lost and says when to try the
// next. A connection that served an operation is tried again at once, so a
// token reset or a lost login costs callers one slower call. One that was
// lost before it served any (the token refuses every call, or says the
// login is gone right after keyward logged in) did not help: the next try
// comes no sooner than the reconnect interval after it was made, and calls
// in between fail at once. So every login either served an operation or
// came an interval after the one before: a token that refuses every call
// costs one login per interval, never one per call.
func (h *HSM) breakLocked(cause error) {
	h.dropSessionsLocked()
	h.broken = unavailable(cause)
	h.nextTry = time.Time{}
	if !h.proven {
		h.nextTry = h.since.Add(h.set.reconnect)
	}
}

// unavailable describes a lost token for the operations that find it so.
func unavailable(cause error) error {
	e := &Error{Err: ErrTokenUnavailable, Detail: hint(ErrTokenUnavailable)}
	errors.As(cause, &e.Code)
	var inner *Error
	if !errors.Is(cause, ErrTokenUnavailable) && errors.As(cause, &inner) {
		in := *inner
		in.Code = 0 // e says it
		e.Detail = "reconnecting failed: " + strings.TrimPrefix(in.Error(), "hsm: ")
	}
	return e
}

// readyLocked reconnects if the token went away and it is time to try.
func (h *HSM) readyLocked() error {
	if h.fatal != nil {
		return h.fatal
	}
	if h.broken == nil {
		return nil
	}
	now := time.Now()
	if now.Before(h.nextTry) {
		return h.broken
	}
	// Operations still running on the lost connection must end first: once
	// the library is initialized again their session handles could name the
	// new sessions.
	for h.inUse > 0 {
		if time.Since(now) > h.set.wait {
			h.nextTry = time.Now().Add(h.set.reconnect)
			return &Error{Err: ErrTokenUnavailable, Detail: fmt.Sprintf("%d operations on the lost connection are still running after %s", h.inUse, h.set.wait)}
		}
		h.mu.Unlock()
		time.Sleep(time.Millisecond)
		h.mu.Lock()
		if h.fatal != nil || h.broken == nil {
			return h.fatal
		}
	}
	if err := h.connectLocked(); err != nil {
		if h.fatal != nil {
			return h.fatal // the token refused the PIN
		}
		h.broken = unavailable(err)
		h.nextTry = now.Add(h.set.reconnect)
		return h.broken
	}
	h.broken = nil
	return nil
}

// acquire takes a session of the current generation, waiting for a free
// one at most the session wait time. If no session could be opened, it says
// what that means as release does: classBroken if only that try failed (the
// token says the login held), classToken if the connection was given up.
func (h *HSM) acquire(ctx context.Context) (session, class, error) {
	if h.closed.Load() {
		return session{}, classInput, ErrClosed
	}
	select {
	case h.sem <- struct{}{}:
	default:
		t := time.NewTimer(h.set.wait)
		defer t.Stop()
		select {
		case h.sem <- struct{}{}:
		case <-ctx.Done():
			return session{}, classInput, ctx.Err()
		case <-t.C:
			return session{}, classInput, &Error{Op: "session", Err: ErrBusy, Detail: fmt.Sprintf("all %d sessions stayed busy for %s; raise the session pool size or lower the load", cap(h.sem), h.set.wait)}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed.Load() {
		<-h.sem
		return session{}, classInput, ErrClosed
	}
	if err := h.readyLocked(); err != nil {
		<-h.sem
		return session{}, classInput, err
	}
	if n := len(h.idle); n > 0 {
		s := h.idle[n-1]
		h.idle = h.idle[:n-1]
		h.inUse++
		return s, classOK, nil
	}
	s, err := h.openLocked(h.token.Slot)
	if err != nil {
		c := classify(err)
		if c == classBroken || c == classToken {
			c = h.judgeLocked()
		}
		<-h.sem
		return session{}, c, err
	}
	h.inUse++
	return s, classOK, nil
}

// tokenSaid reports whether err is the token's answer (it carries a return
// code), not keyward's own.
func tokenSaid(err error) bool {
	var ckr pkcs11.Error
	var e *Error
	return errors.As(err, &ckr) || errors.As(err, &e) && e.Code != 0
}

// release returns a session after an operation and says what the
// operation's error means: a doubtful or broken session is closed and never
// pooled again, and a session that broke or says the token or the login is
// gone is judged by the anchor (judgeLocked).
func (h *HSM) release(s session, err error) class {
	c := classify(err)
	h.mu.Lock()
	h.inUse--
	if s.gen == h.gen && (c == classOK || (c == classInput || c == classSession) && tokenSaid(err)) {
		// The token did work for a call (it answered, even a refusal, and
		// did not say the session or the login is gone); an answer from the
		// key cache (a key not found, a key refused at load) proves nothing
		// of the connection.
		h.proven = true
	}
	switch {
	case s.gen != h.gen:
		h.closeLocked(s) // its connection was given up
	case c == classBroken || c == classToken:
		h.closeLocked(s)
		c = h.judgeLocked()
	case c == classSession || h.closed.Load() || len(h.idle) >= cap(h.sem):
		h.closeLocked(s)
	default:
		// A stale key handle (classHandle) is for withKey to look up again;
		// the session is fine.
		h.idle = append(h.idle, s)
	}
	h.mu.Unlock()
	<-h.sem
	return c
}

// judgeLocked is what an operation's session failure means, when the
// session broke or the call said the token, the login or the library state
// is gone: the anchor is asked (checkLocked), and only if it agrees is the
// connection given up (classToken); otherwise only that session was lost
// (classBroken), and the call runs again on another. An operation's word
// alone never costs a login: a token that refuses one kind of call while
// the anchor holds the login would cost one per call.
func (h *HSM) judgeLocked() class {
	if h.checkLocked() {
		return classToken
	}
	return classBroken
}

// checkTries is how many times keyward asks before it acts on a doubtful
// answer: whether the login held after a session broke (checkLocked), or a
// read of the keys at connect (again). A token that fails a share p of its
// calls at random fails all of them with p^checkTries: once in a million
// at 1 %. A device that is really gone fails them all, and costs two
// quick calls more.
const checkTries = 3

// checkLocked is called when one session broke (lost, stuck, or a device
// error on it), or a call on it said the token or the login is gone. It
// asks the token, on the anchor session that no operation uses, whether the
// login survived, and returns whether the connection was given up:
//
//   - the anchor is fine and logged in: only that session was lost, and
//     the connection stays (false);
//   - the token says the login, the token or the library state is gone
//     (a logged-out state, CKR_USER_NOT_LOGGED_IN, CKR_TOKEN_NOT_PRESENT,
//     CKR_CRYPTOKI_NOT_INITIALIZED, ...): the connection is given up;
//   - the anchor fails without saying that (a device error, its handle
//     reported invalid or closed): one such answer may be the device's
//     passing fault, so keyward asks again, up to checkTries times, and
//     acts on the first clear answer. Only if every answer fails is the
//     connection given up.
//
// When the next reconnect comes is breakLocked's rule.
func (h *HSM) checkLocked() bool {
	if h.broken != nil || h.fatal != nil {
		return true
	}
	var err error
	for range checkTries {
		var info pkcs11.SessionInfo
		info, err = h.mod.ctx.GetSessionInfo(h.anchor.h)
		switch {
		case err == nil && info.State == pkcs11.CKS_RW_USER_FUNCTIONS:
			return false
		case err == nil:
			h.breakLocked(pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))
			return true
		case classify(err) == classToken:
			h.breakLocked(err)
			return true
		}
	}
	h.breakLocked(err)
	return true
}

// do runs fn on a pooled session. If the session broke, or no session
// could be opened, it runs fn once more on another session; if the token
// went away, it reconnects (when breakLocked allows) and runs fn once more;
// if a key's handle went stale, withKey looks the key up again on the
// second run. So a lost session or a token reset costs callers one slower
// call, not an error. fn must be safe to repeat.
func (h *HSM) do(ctx context.Context, op, key string, fn func(s pkcs11.SessionHandle) error) error {
	return h.attempt(ctx, op, key, 2, fn)
}

// doOnce runs fn like do, but never twice: for changes to the token that
// may have happened before the connection was lost.
func (h *HSM) doOnce(ctx context.Context, op, key string, fn func(s pkcs11.SessionHandle) error) error {
	return h.attempt(ctx, op, key, 1, fn)
}

func (h *HSM) attempt(ctx context.Context, op, key string, tries int, fn func(s pkcs11.SessionHandle) error) error {
	var err error
	if o := h.observe.Load(); o != nil {
		start := time.Now()
		defer func() { (*o)(op, time.Since(start), err) }()
	}
	for range tries {
		s, c, aerr := h.acquire(ctx)
		if err = aerr; err == nil {
			err = fn(s.h)
			c = h.release(s, err)
		}
		if c != classBroken && c != classToken && c != classHandle {
			break
		}
	}
	err = opError(op, key, err, "")
	return err
}

// SetObserver has fn told of every operation: its name (encrypt, decrypt,
// hmac, sign, random, health, ...), how long it took, session wait and a
// reconnection included, and its error. fn must be quick: it runs on the
// caller's goroutine. For metrics and load measures.
func (h *HSM) SetObserver(fn func(op string, took time.Duration, err error)) {
	h.observe.Store(&fn)
}

// Health checks that the token answers and the login holds. If the token
// went away it tries to reconnect (no more often than the reconnect
// interval) and reports what stands in the way.
func (h *HSM) Health(ctx context.Context) error {
	return h.do(ctx, "health", "", func(s pkcs11.SessionHandle) error {
		if _, err := h.mod.ctx.GetTokenInfo(h.tokenSlot()); err != nil {
			return err
		}
		info, err := h.mod.ctx.GetSessionInfo(s)
		if err != nil {
			return err
		}
		if info.State != pkcs11.CKS_RW_USER_FUNCTIONS {
			return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
		}
		return nil
	})
}

func (h *HSM) tokenSlot() uint {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.token.Slot
}
