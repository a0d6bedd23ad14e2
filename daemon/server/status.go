package server

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/credentials"
	"github.com/keyward/keyward/daemon/envelope"
	"github.com/keyward/keyward/daemon/identity"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/store"
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
	{store.ErrUnavailable, codes.Unavailable},
	{store.ErrDamaged, codes.DataLoss},
	{store.ErrRolledBack, codes.DataLoss},
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
			return status.New(m.code, err.Error())
		}
	}
	if st, ok := status.FromError(err); ok {
		return st
	}
	return status.New(codes.Internal, err.Error())
}

// itemError is a batch item's failure.
func itemError(err error) (int32, string) {
	st := toStatus(err)
	return int32(st.Code()), st.Message()
}
