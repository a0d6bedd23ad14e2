package hsm

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"
)

// A PKCS#11 library has one state per process: C_Initialize and C_Finalize
// act on every user of it at once. So a library is loaded and initialized once
// per path, shared by every HSM that uses it, and finalized when the last one
// closes. If something else in the process initialized it first, keyward uses
// it as it is and leaves finalizing to that owner.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

type module struct {
	path   string
	ctx    *pkcs11.Ctx
	refs   int
	ownsIt bool // keyward called C_Initialize, so keyward calls C_Finalize
}

func openModule(path string) (*module, error) {
	path = filepath.Clean(path)
	modules.Lock()
	defer modules.Unlock()
	if m, ok := modules.m[path]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("hsm: module %s could not be loaded: it is not a PKCS#11 library for this platform, or a library it needs is missing (try ldd %s)", path, path)
	}
	m := &module{path: path, ctx: ctx, refs: 1, ownsIt: true}
	if err := ctx.Initialize(); err != nil {
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			ctx.Destroy()
			return nil, opError("open", "", err, fmt.Sprintf("C_Initialize of %s failed", path))
		}
		m.ownsIt = false
	}
	modules.m[path] = m
	return m, nil
}

// reinitialize brings the library back after its state was lost (a token
// reset, or C_Finalize by another user in the process).
func (m *module) reinitialize() error {
	modules.Lock()
	defer modules.Unlock()
	err := m.ctx.Initialize()
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return err
	}
	return nil
}

func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules.m, m.path)
	if m.ownsIt {
		_ = m.ctx.Finalize()
	}
	m.ctx.Destroy()
}
