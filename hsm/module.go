package hsm

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"
)

// A PKCS#11 library has one state per process: C_Initialize and C_Finalize
// act on every user of it at once, and after a re-initialization old session
// and object handles may name new, unrelated sessions and objects. So keyward
// is the only user of a library in its process: one HSM per library, which
// initializes it on Open and finalizes it on Close, and which alone decides
// when to initialize it again. Open refuses a library that is already in use
// in the process, whether by another HSM or by other code. Share one *HSM.
var modules = struct {
	sync.Mutex
	inUse map[string]bool
}{inUse: map[string]bool{}}

type module struct {
	path string // the library's real path, symlinks resolved
	ctx  *pkcs11.Ctx
}

func openModule(path string) (*module, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("hsm: module %s: %w", path, err)
	}
	modules.Lock()
	defer modules.Unlock()
	if modules.inUse[real] {
		return nil, fmt.Errorf("hsm: module %s is already open in this process: share the one *hsm.HSM instead of opening another", path)
	}
	ctx := pkcs11.New(real)
	if ctx == nil {
		return nil, configError{fmt.Errorf("hsm: module %s could not be loaded: it is not a PKCS#11 library for this platform, or a library it needs is missing (try ldd %s)", path, real)}
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			return nil, opError("open", "", err, fmt.Sprintf("other code in this process already uses %s; keyward must be its only user", path))
		}
		return nil, opError("open", "", err, fmt.Sprintf("C_Initialize of %s failed", path))
	}
	modules.inUse[real] = true
	return &module{path: real, ctx: ctx}, nil
}

// reinitialize brings the library back after its state was lost.
func (m *module) reinitialize() error {
	err := m.ctx.Initialize()
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return err
	}
	return nil
}

func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	delete(modules.inUse, m.path)
	_ = m.ctx.Finalize()
	m.ctx.Destroy()
}
