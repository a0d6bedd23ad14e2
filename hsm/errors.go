package hsm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// Errors returned by this package. Callers match them with errors.Is; an
// error that came from the token also matches its pkcs11.Error code with
// errors.As.
var (
	// ErrKeyNotFound: no key with that name and version is on the token.
	ErrKeyNotFound = errors.New("hsm: key not found")
	// ErrKeyExists: a key with that name and version is already on the token.
	ErrKeyExists = errors.New("hsm: key already exists")
	// ErrAmbiguous: more than one object or token matches where one is
	// expected. keyward never picks one of them.
	ErrAmbiguous = errors.New("hsm: more than one match")
	// ErrWeakKey: a key on the token has attributes weaker than keyward
	// requires (extractable, not sensitive, more than one purpose, ...).
	ErrWeakKey = errors.New("hsm: key attributes weaker than required")
	// ErrWrongAlgorithm: the key exists but is not of the kind the operation needs.
	ErrWrongAlgorithm = errors.New("hsm: key has the wrong algorithm for this operation")
	// ErrTokenNotFound: no token matches the configured label or URI.
	ErrTokenNotFound = errors.New("hsm: token not found")
	// ErrTokenUnavailable: the token or its sessions went away; keyward
	// reconnects by itself when it comes back.
	ErrTokenUnavailable = errors.New("hsm: token unavailable")
	// ErrPINIncorrect: the token refused the PIN. keyward never retries it.
	ErrPINIncorrect = errors.New("hsm: PIN incorrect")
	// ErrPINLocked: the token locked the PIN or it expired.
	ErrPINLocked = errors.New("hsm: PIN locked")
	// ErrMechanismUnsupported: the token does not implement a mechanism or
	// curve keyward needs.
	ErrMechanismUnsupported = errors.New("hsm: mechanism not supported by the token")
	// ErrDecrypt: the ciphertext, nonce or additional data do not
	// authenticate under the key.
	ErrDecrypt = errors.New("hsm: message authentication failed")
	// ErrInvalidInput: the token refused the input (length or form).
	ErrInvalidInput = errors.New("hsm: invalid input")
	// ErrBusy: every session stayed in use for the whole wait time.
	ErrBusy = errors.New("hsm: all sessions busy")
	// ErrClosed: the HSM was closed.
	ErrClosed = errors.New("hsm: closed")
	// ErrToken: any other failure reported by the token.
	ErrToken = errors.New("hsm: token error")
	// ErrConfig: the configuration is wrong before the token is asked
	// anything: no or two token selections, a module that is missing or not
	// a PKCS#11 library, a PIN source that is missing, empty, unsafe or
	// given twice. Fixing it takes an operator; trying again does not help.
	ErrConfig = errors.New("hsm: invalid configuration")
)

// configError marks an error of the configuration with ErrConfig and keeps
// its message, which already says what to fix.
type configError struct{ err error }

func (e configError) Error() string   { return e.err.Error() }
func (e configError) Unwrap() []error { return []error{e.err, ErrConfig} }

// ckrAEADDecryptFailed is PKCS#11 3.0's code for a failed tag check, which
// github.com/miekg/pkcs11 v1.1 lacks.
const ckrAEADDecryptFailed = pkcs11.Error(0x35)

// class says what a failed call means for the session and the connection.
type class int

const (
	classOK      class = iota
	classInput         // the call failed on its input; the session is fine
	classSession       // the session's state is in doubt: close it; the call is not repeated
	classBroken        // this session is lost or stuck: discard it, check the login, retry on another
	classHandle        // a cached key handle is stale: look the key up again, retry
	classToken         // the token, the login or the library state is gone: if the anchor agrees, reconnect
)

// ckrTable maps each PKCS#11 return code keyward treats specially to the
// package's error and to what it means for sessions. It is the one place
// where CKR_* codes are interpreted.
var ckrTable = map[pkcs11.Error]struct {
	err error
	cls class
}{
	pkcs11.CKR_PIN_INCORRECT: {ErrPINIncorrect, classToken},
	pkcs11.CKR_PIN_INVALID:   {ErrPINIncorrect, classToken},
	pkcs11.CKR_PIN_LEN_RANGE: {ErrPINIncorrect, classToken},
	pkcs11.CKR_PIN_LOCKED:    {ErrPINLocked, classToken},
	pkcs11.CKR_PIN_EXPIRED:   {ErrPINLocked, classToken},

	pkcs11.CKR_MECHANISM_INVALID:       {ErrMechanismUnsupported, classInput},
	pkcs11.CKR_MECHANISM_PARAM_INVALID: {ErrMechanismUnsupported, classInput},
	pkcs11.CKR_CURVE_NOT_SUPPORTED:     {ErrMechanismUnsupported, classInput},
	pkcs11.CKR_DOMAIN_PARAMS_INVALID:   {ErrMechanismUnsupported, classInput},
	pkcs11.CKR_KEY_SIZE_RANGE:          {ErrMechanismUnsupported, classInput},

	pkcs11.CKR_ENCRYPTED_DATA_INVALID:   {ErrDecrypt, classInput},
	pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE: {ErrDecrypt, classInput},
	ckrAEADDecryptFailed:                {ErrDecrypt, classInput},
	pkcs11.CKR_DATA_INVALID:             {ErrInvalidInput, classInput},
	pkcs11.CKR_DATA_LEN_RANGE:           {ErrInvalidInput, classInput},
	pkcs11.CKR_ARGUMENTS_BAD:            {ErrInvalidInput, classInput},

	pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED: {ErrWrongAlgorithm, classInput},
	pkcs11.CKR_KEY_TYPE_INCONSISTENT:      {ErrWrongAlgorithm, classInput},

	pkcs11.CKR_OBJECT_HANDLE_INVALID: {ErrKeyNotFound, classHandle},
	pkcs11.CKR_KEY_HANDLE_INVALID:    {ErrKeyNotFound, classHandle},

	// One session is lost or stuck; whether the login and the token
	// survived is asked of the token (HSM.checkLocked), not assumed. A
	// device error is here too: a real device that is gone fails the check
	// as well.
	pkcs11.CKR_OPERATION_ACTIVE:          {ErrToken, classBroken},
	pkcs11.CKR_OPERATION_NOT_INITIALIZED: {ErrToken, classBroken},
	pkcs11.CKR_SESSION_HANDLE_INVALID:    {ErrTokenUnavailable, classBroken},
	pkcs11.CKR_SESSION_CLOSED:            {ErrTokenUnavailable, classBroken},
	pkcs11.CKR_DEVICE_ERROR:              {ErrTokenUnavailable, classBroken},

	// The token, the login or the library state is gone. From the anchor
	// session that is the answer (HSM.checkLocked); from an operation it
	// is asked of the anchor first, like a lost session.
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED: {ErrTokenUnavailable, classToken},
	pkcs11.CKR_USER_NOT_LOGGED_IN:       {ErrTokenUnavailable, classToken},
	pkcs11.CKR_DEVICE_REMOVED:           {ErrTokenUnavailable, classToken},
	pkcs11.CKR_TOKEN_NOT_PRESENT:        {ErrTokenUnavailable, classToken},
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:     {ErrTokenUnavailable, classToken},
	pkcs11.CKR_SLOT_ID_INVALID:          {ErrTokenUnavailable, classToken},
}

// classify tells what err means for the session it happened on. Errors that
// did not come from the token (this package's own checks) leave the session
// usable.
func classify(err error) class {
	if err == nil {
		return classOK
	}
	var ckr pkcs11.Error
	if !errors.As(err, &ckr) {
		return classInput
	}
	if e, ok := ckrTable[ckr]; ok {
		return e.cls
	}
	return classSession
}

// Error is the error type of this package: which operation on which key
// failed, the package's sentinel error, and the token's return code if the
// token reported one. It never holds key material, plaintext or the PIN.
type Error struct {
	Op     string       // "encrypt", "open", ...
	Key    string       // key name and version, when the operation has one
	Err    error        // one of this package's sentinel errors
	Code   pkcs11.Error // the token's return code; 0 if the error is keyward's own
	Detail string       // what to do about it, or more about what happened
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("hsm: ")
	b.WriteString(e.Op)
	if e.Key != "" {
		fmt.Fprintf(&b, " %s", e.Key)
	}
	b.WriteString(": ")
	b.WriteString(strings.TrimPrefix(e.Err.Error(), "hsm: "))
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	}
	if e.Code != 0 {
		fmt.Fprintf(&b, " (%s)", ckrName(e.Code))
	}
	return b.String()
}

// Unwrap returns the sentinel error and, when there is one, the token's code.
func (e *Error) Unwrap() []error {
	if e.Code != 0 {
		return []error{e.Err, e.Code}
	}
	return []error{e.Err}
}

// ckrName gives the CKR_ name of a return code: "CKR_PIN_INCORRECT".
func ckrName(code pkcs11.Error) string {
	s := code.Error() // "pkcs11: 0xA0: CKR_PIN_INCORRECT"
	if i := strings.LastIndex(s, ": "); i >= 0 {
		return s[i+2:]
	}
	return s
}

// opError builds the error for a failed operation. err is either a
// pkcs11.Error from the token, an *Error made deeper down (it gains the
// operation and key if it lacks them) or a sentinel of this package.
func opError(op, key string, err error, detail string) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		out := *e
		if out.Op == "" {
			out.Op = op
		}
		if out.Key == "" {
			out.Key = key
		}
		if out.Detail == "" {
			out.Detail = detail
		}
		return &out
	}
	var ckr pkcs11.Error
	if errors.As(err, &ckr) {
		sentinel := ErrToken
		if m, ok := ckrTable[ckr]; ok {
			sentinel = m.err
		}
		if detail == "" {
			detail = hint(sentinel)
		}
		return &Error{Op: op, Key: key, Err: sentinel, Code: ckr, Detail: detail}
	}
	if detail == "" {
		detail = hint(err)
	}
	return &Error{Op: op, Key: key, Err: err, Detail: detail}
}

// hint says how to fix the common failures.
func hint(sentinel error) string {
	switch sentinel {
	case ErrPINIncorrect:
		return "check the PIN file or variable; keyward does not retry a wrong PIN, to keep the token from locking it"
	case ErrPINLocked:
		return "the security officer must unlock or reset the user PIN on the token"
	case ErrMechanismUnsupported:
		return "this token lacks a mechanism keyward needs; see docs/hsm.md for the list"
	case ErrTokenUnavailable:
		return "keyward reconnects when the token is back"
	case ErrBusy:
		return "raise the session pool size or lower the load"
	}
	return ""
}
