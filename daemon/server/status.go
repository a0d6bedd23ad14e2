package server

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon/admission"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/tokens"
	"github.com/keyward/keyward/hsm"
)

// The server's own errors: a bad request, and a dependency that failed.
var (
	errInvalid     = errors.New("invalid argument")
	errUnavailable = errors.New("unavailable")
)

// codeOf maps every domain error to its status code: the one place where
// that happens. Anything not listed is INTERNAL.
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
	{envelope.ErrDecrypt, codes.InvalidArgument},
	{envelope.ErrFormat, codes.InvalidArgument},
	{envelope.ErrContext, codes.InvalidArgument},
	{envelope.ErrInvalid, codes.InvalidArgument},
	{envelope.ErrTooLarge, codes.ResourceExhausted},
	{errInvalid, codes.InvalidArgument},
	{errUnavailable, codes.Unavailable},
	{apikeys.ErrNotFound, codes.NotFound},
	{apikeys.ErrInvalid, codes.InvalidArgument},
	{apikeys.ErrWidens, codes.PermissionDenied},
	{credentials.ErrNotFound, codes.NotFound},
	{credentials.ErrExists, codes.AlreadyExists},
	{credentials.ErrInvalid, codes.InvalidArgument},
	{credentials.ErrRevoked, codes.FailedPrecondition},
	{credentials.ErrNoSecret, codes.FailedPrecondition},
	{credentials.ErrPermanent, codes.FailedPrecondition},
	{credentials.ErrUnavailable, codes.Unavailable},
	{credentials.ErrNoPlugin, codes.FailedPrecondition},
	{tokens.ErrInvalid, codes.InvalidArgument},
	{audit.ErrUnavailable, codes.Unavailable},
	{hsm.ErrTokenUnavailable, codes.Unavailable},
	{hsm.ErrBusy, codes.Unavailable},
	{hsm.ErrPINIncorrect, codes.Unavailable},
	{hsm.ErrPINLocked, codes.Unavailable},
	{hsm.ErrClosed, codes.Unavailable},
	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
}

// toStatus turns an error into the status the caller gets; nil for nil.
// Messages are the domain's, which never hold secrets.
func toStatus(err error) *status.Status {
	if err == nil {
		return nil
	}
	// Domain errors first: one may wrap a plugin's status, whose code is
	// the plugin's business, not the caller's.
	for _, m := range codeOf {
		if errors.Is(err, m.err) {
			return withDetails(status.New(m.code, err.Error()), err)
		}
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

// itemError is a batch item's failure.
func itemError(err error) (int32, string) {
	st := toStatus(err)
	return int32(st.Code()), st.Message()
}
