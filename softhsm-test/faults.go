package softhsmtest

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Faults is a PKCS#11 module that forwards to SoftHSM2 and makes the calls a
// test names fail with the return code it names: the way to show what keyward
// does when a token reports a device error, goes away, locks the PIN or lacks
// a mechanism. Open the HSM on Faults.Module instead of Token.Module.
type Faults struct {
	Module string // path of the fault-injecting module
	file   string
	log    string
	t      testing.TB
}

// NewFaults builds the fault-injecting module (softhsm-test/faultmod) for t
// with the C compiler and points it at tok's SoftHSM2 library.
func NewFaults(t testing.TB, tok *Token) *Faults {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	src := filepath.Join(filepath.Dir(self), "faultmod", "faultmod.c")
	inc, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		t.Fatalf("softhsmtest: finding the PKCS#11 headers of github.com/miekg/pkcs11: %v", err)
	}
	dir := t.TempDir()
	f := &Faults{Module: filepath.Join(dir, "libkeyward-fault.so"), file: filepath.Join(dir, "faults"), log: filepath.Join(dir, "calls"), t: t}
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "gcc"
	}
	out, err := exec.Command(cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I", strings.TrimSpace(string(inc)), "-o", f.Module, src, "-ldl", "-lpthread").CombinedOutput()
	if err != nil {
		t.Fatalf("softhsmtest: building the fault module (install gcc): %v\n%s", err, out)
	}
	t.Setenv("KEYWARD_FAULT_REAL", tok.Module)
	t.Setenv("KEYWARD_FAULT_FILE", f.file)
	t.Setenv("KEYWARD_FAULT_LOG", f.log)
	f.Set()
	return f
}

// Calls counts the calls of the PKCS#11 function name ("C_Login") that
// reached the module, faulted or not, in every process that loaded it
// since NewFaults: how a test counts login attempts of a keywardd it ran.
func (f *Faults) Calls(name string) int {
	f.t.Helper()
	b, err := os.ReadFile(f.log)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		f.t.Fatal(err)
	}
	n := 0
	for l := range strings.SplitSeq(string(b), "\n") {
		if l == name {
			n++
		}
	}
	return n
}

// Set replaces the rules. Each is "C_Name 0xCKR" (always) or
// "C_Name 0xCKR once"; "*" as the name matches every wrapped call. No rules:
// every call goes through.
func (f *Faults) Set(rules ...string) {
	f.t.Helper()
	data := strings.Join(rules, "\n")
	if len(rules) > 0 {
		data += "\n"
	}
	if err := os.WriteFile(f.file, []byte(data), 0o600); err != nil {
		f.t.Fatal(err)
	}
}
