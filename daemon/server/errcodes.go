package server

import (
	"context"
	"errors"
	"fmt"
	"iter"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/admission"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/appcrypto"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/events"
	"github.com/keyward/keyward/daemon/faults"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/limitwin"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/tokens"
)

// The server's own errors: a bad request, and a dependency that failed.
var (
	errInvalid     = errors.New("invalid argument")
	errUnavailable = errors.New("unavailable")
)

// The answers to a ciphertext that does not open, for a caller that may not
// learn why (see withhold): one for every reason, and one for an HSM that
// could not try, which the caller should retry.
var (
	errUnopened    = errors.New("the ciphertext does not open: it is damaged, was sealed under another encryption context, or names a key or version this caller cannot use (callers granted KeyService.GetKey on the key are told which)")
	errUnopenedNow = errors.New("the ciphertext could not be opened now: keywardd cannot reach its HSM; retry later")
)

// withheld is a failure to open a ciphertext answered without its reason,
// which goes to the audit record only.
type withheld struct{ answer, reason error }

func (w *withheld) Error() string { return w.answer.Error() }
func (w *withheld) Unwrap() error { return w.answer }

// withhold is the answer to a caller that may not learn why a ciphertext
// did not open: which keys exist, their versions and their states are
// KeyService.GetKey's to tell. Its code and message depend on nothing but
// whether the HSM could try (UNAVAILABLE, to be retried) or the caller gave
// up (CANCELLED, DEADLINE_EXCEEDED); every other reason, a key unknown,
// disabled, pending deletion, of another purpose, a version unknown or below
// the minimum, a malformed or altered ciphertext, another context, an
// internal fault, is the one INVALID_ARGUMENT.
func withhold(reason error) error {
	answer := errUnopened
	switch {
	case mapsTo(reason, codes.Unavailable):
		answer = errUnopenedNow
	case mapsTo(reason, codes.Canceled):
		answer = context.Canceled
	case mapsTo(reason, codes.DeadlineExceeded):
		answer = context.DeadlineExceeded
	}
	return &withheld{answer: answer, reason: reason}
}

// mapsTo says whether err, or any error it wraps, maps to code: a key not
// found whose decoy decryption found the HSM unavailable is unavailable, as
// a key found would have been.
func mapsTo(err error, code codes.Code) bool {
	for c := range codesOf(err) {
		if c == code {
			return true
		}
	}
	return false
}

// faultCodes are the codes of the infrastructure's failures (daemon/faults).
var faultCodes = map[faults.Kind]codes.Code{
	faults.Unavailable: codes.Unavailable,
	faults.Lost:        codes.DataLoss,
	faults.Invalid:     codes.InvalidArgument,
}

// auditDetail is what the audit record says of a failed call or item: the
// caller's answer, or the reason withheld from it.
func auditDetail(err error, st *status.Status) string {
	if w, ok := errors.AsType[*withheld](err); ok {
		return "withheld from the caller: " + w.reason.Error()
	}
	return st.Message()
}

// codeOf maps every domain error to its status code: the one place where
// that happens, with faultCodes for the infrastructure's failures and the
// context's errors after those. Anything not listed is INTERNAL.
var codeOf = []struct {
	err  error
	code codes.Code
}{
	{policy.ErrDenied, codes.PermissionDenied},
	{admission.ErrOverBudget, codes.ResourceExhausted},
	{identity.ErrGone, codes.PermissionDenied},
	{keys.ErrNotFound, codes.NotFound},
	{keys.ErrExists, codes.AlreadyExists},
	{keys.ErrInvalid, codes.InvalidArgument},
	{keys.ErrDisabled, codes.FailedPrecondition},
	{keys.ErrPendingDeletion, codes.FailedPrecondition},
	{keys.ErrWrongPurpose, codes.FailedPrecondition},
	{keys.ErrVersion, codes.FailedPrecondition},
	{keys.ErrUnknownHSMKey, codes.FailedPrecondition},
	{errUnopened, codes.InvalidArgument},
	{errUnopenedNow, codes.Unavailable},
	{envelope.ErrDecrypt, codes.InvalidArgument},
	{envelope.ErrFormat, codes.InvalidArgument},
	{envelope.ErrContext, codes.InvalidArgument},
	{envelope.ErrInvalid, codes.InvalidArgument},
	{envelope.ErrTooLarge, codes.ResourceExhausted},
	{appcrypto.ErrInvalid, codes.InvalidArgument},
	{appcrypto.ErrTooLarge, codes.ResourceExhausted},
	{errInvalid, codes.InvalidArgument},
	{errUnavailable, codes.Unavailable},
	{apikeys.ErrNotFound, codes.NotFound},
	{apikeys.ErrInvalid, codes.InvalidArgument},
	{apikeys.ErrWidens, codes.PermissionDenied},
	{limitwin.ErrInvalid, codes.InvalidArgument},
	{limitwin.ErrOverlap, codes.FailedPrecondition},
	{limitwin.ErrNotFound, codes.NotFound},
	{limitwin.ErrEnded, codes.FailedPrecondition},
	{credentials.ErrNotFound, codes.NotFound},
	{credentials.ErrExists, codes.AlreadyExists},
	{credentials.ErrInvalid, codes.InvalidArgument},
	{credentials.ErrRevoked, codes.FailedPrecondition},
	{credentials.ErrNoSecret, codes.FailedPrecondition},
	{credentials.ErrPermanent, codes.FailedPrecondition},
	{credentials.ErrUnavailable, codes.Unavailable},
	{credentials.ErrNoPlugin, codes.FailedPrecondition},
	{credentials.ErrChanged, codes.Aborted},
	{tokens.ErrInvalid, codes.InvalidArgument},
	{audit.ErrInvalid, codes.InvalidArgument},
	{audit.ErrDamaged, codes.DataLoss},
	{events.ErrTooMany, codes.ResourceExhausted},
	{events.ErrCursor, codes.InvalidArgument},
}

// contextCodes come last: a call cut short by an HSM that did not answer
// is UNAVAILABLE, whatever its context says.
var contextCodes = []struct {
	err  error
	code codes.Code
}{
	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
}

// codesOf yields the code of every known error err is or wraps, in the
// order they count: the domain's table, the infrastructure's failure, the
// context's.
func codesOf(err error) iter.Seq[codes.Code] {
	return func(yield func(codes.Code) bool) {
		for _, m := range codeOf {
			if errors.Is(err, m.err) && !yield(m.code) {
				return
			}
		}
		if k := faults.Of(err); k != faults.None && !yield(faultCodes[k]) {
			return
		}
		for _, m := range contextCodes {
			if errors.Is(err, m.err) && !yield(m.code) {
				return
			}
		}
	}
}

// codeFor is err's code, if it is one keywardd knows: the first of codesOf.
func codeFor(err error) (codes.Code, bool) {
	for c := range codesOf(err) {
		return c, true
	}
	return 0, false
}

// toStatus turns an error into the status the caller gets; nil for nil.
// Messages are the domain's, which never hold secrets.
func toStatus(err error) *status.Status {
	if err == nil {
		return nil
	}
	// Domain errors first: one may wrap a plugin's status, whose code is
	// the plugin's business, not the caller's.
	if code, ok := codeFor(err); ok {
		return withDetails(status.New(code, err.Error()), err)
	}
	if st, ok := status.FromError(err); ok {
		return st
	}
	return status.New(codes.Internal, err.Error())
}

// withDetails adds to a refusal for the caller's budget what a client can
// act on: the budget it reached (google.rpc.QuotaFailure); for its call
// rate, each layer's state (keyward.v1.RateLimitState, as VerifyAPIKey
// gives an API key's: limit, remaining, reset time); and for its call
// rate, its binaries hashed and what its refusals cost, when to retry
// (google.rpc.RetryInfo).
func withDetails(st *status.Status, err error) *status.Status {
	r, ok := errors.AsType[*admission.Refusal](err)
	if !ok {
		return st
	}
	subject := fmt.Sprintf("uid:%d", r.UID)
	details := []protoadapt.MessageV1{&errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{{Subject: subject, Description: string(r.Budget)}}}}
	switch r.Budget {
	case admission.Hashing:
		if !r.Rate.TooLarge {
			details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(r.Rate.RetryAfter)})
		}
	case admission.Rate:
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(r.Rate.RetryAfter)})
		for _, l := range toLimitStates(r.Rate.Layers) {
			details = append(details, l)
		}
	case admission.Refusals:
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(r.Wait)})
	}
	if d, err := st.WithDetails(details...); err == nil {
		return d
	}
	return st
}

// itemError is a batch item's failure, as the caller gets it.
func itemError(err error) (int32, string) {
	st := toStatus(err)
	return int32(st.Code()), st.Message()
}
