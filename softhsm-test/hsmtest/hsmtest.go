// Package hsmtest opens an hsm.HSM on a fresh SoftHSM2 token for tests of
// the packages above hsm. (hsm's own tests cannot use it: it imports hsm.)
package hsmtest

import (
	"testing"

	"github.com/keyward/keyward/hsm"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// Open makes a token for t, opens it, and closes it when t ends.
func Open(t testing.TB) (*hsm.HSM, *softhsmtest.Token) {
	t.Helper()
	tok := softhsmtest.New(t)
	h, err := hsm.Open(hsm.Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h, tok
}
