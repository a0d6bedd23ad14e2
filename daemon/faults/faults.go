// Package faults says what the failures of keywardd's infrastructure (the
// HSM, the store, the audit log) mean to a caller: retry later, the state
// is lost, or the request was too large. The gRPC layer (daemon/server)
// maps these kinds to codes without reaching into those layers; the HSM's
// own codes are mapped once, in hsm (PKCS#11 return values to its
// sentinels), and this package only sorts the sentinels.
package faults

import (
	"errors"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
)

// A Kind is what a failure means to the caller.
type Kind int

const (
	// None: not a failure of the infrastructure.
	None Kind = iota
	// Unavailable: the HSM, the store or the audit log cannot serve now;
	// the same call may succeed later.
	Unavailable
	// Lost: the store is damaged or older than the audit log says it
	// must be; keywardd serves no call that needs it until an operator
	// acts.
	Lost
	// Invalid: the request asked the store for what it cannot hold (an
	// empty or over-long key, a transaction too large).
	Invalid
)

var kinds = []struct {
	err  error
	kind Kind
}{
	{store.ErrDamaged, Lost},
	{store.ErrRolledBack, Lost},
	{store.ErrInvalidKey, Invalid},
	{store.ErrTooLarge, Invalid},
	{store.ErrUnavailable, Unavailable},
	{audit.ErrUnavailable, Unavailable},
	{hsm.ErrTokenUnavailable, Unavailable},
	{hsm.ErrBusy, Unavailable},
	{hsm.ErrPINIncorrect, Unavailable},
	{hsm.ErrPINLocked, Unavailable},
	{hsm.ErrClosed, Unavailable},
}

// Of is the kind of err (errors.Is through its chain), or None.
func Of(err error) Kind {
	if err == nil {
		return None
	}
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			return k.kind
		}
	}
	return None
}

// Damaged reports whether err says the store was found damaged: keywardd
// then reports itself unhealthy at once.
func Damaged(err error) bool { return errors.Is(err, store.ErrDamaged) }
