package softhsmtest

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Faults is a PKCS#11 module that forwards to SoftHSM2 and makes the calls a
// test names fail with the return code it names: the way to show what keyward
// does when a token reports a device error, goes away, locks the PIN, lacks
// a mechanism or loses a session now and then. It counts the calls it
// forwards (Counts), so a test can tell how often keyward logged in or opened
// sessions. Open the HSM on Faults.Module instead of Token.Module.
type Faults struct {
	Module string // path of the fault-injecting module
	file   string
	counts string
	sets   int // how often Set was called: each Set writes a new file
	t      testing.TB
}

// NewFaults builds the fault-injecting module (softhsm-test/faultmod) for t
// with the C compiler and points it at tok's SoftHSM2 library. Its control
// and counter files are set in the environment for the rest of the test, so
// a keywardd process started by the test uses them too.
func NewFaults(t testing.TB, tok *Token) *Faults {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	src := filepath.Join(filepath.Dir(self), "faultmod", "faultmod.c")
	inc, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		t.Fatalf("softhsmtest: finding the PKCS#11 headers of github.com/miekg/pkcs11: %v", err)
	}
	dir := t.TempDir()
	f := &Faults{
		Module: filepath.Join(dir, "libkeyward-fault.so"),
		file:   filepath.Join(dir, "faults"),
		counts: filepath.Join(dir, "counts"),
		t:      t,
	}
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
	t.Setenv("KEYWARD_FAULT_COUNTS", f.counts)
	f.Set()
	return f
}

// Set replaces the rules. Each is "C_Name 0xCKR" (always), "C_Name 0xCKR
// once" (the first call only) or "C_Name 0xCKR 1%" (that share of the
// calls, 0.5% and the like too); "*" as the name matches every wrapped call,
// and the first rule that fires wins. "seed N" seeds the draws of the %
// rules: every Set arms the rules again and restarts the draws, so the same
// sequence of calls meets the same faults. No rules: every call goes
// through.
func (f *Faults) Set(rules ...string) {
	f.t.Helper()
	// The module arms its rules again when the file changes; the first line
	// makes every Set a change, even to the rules already in force.
	f.sets++
	data := fmt.Sprintf("# set %d\n", f.sets)
	for _, r := range rules {
		data += r + "\n"
	}
	if err := os.WriteFile(f.file, []byte(data), 0o600); err != nil {
		f.t.Fatal(err)
	}
}

// Count is what the module saw of one PKCS#11 function.
type Count struct {
	Calls    uint64 // calls that reached the module
	Injected uint64 // calls a rule failed (the real module never saw them)
	OK       uint64 // calls that returned CKR_OK
}

// countSize is the size of one record of the counter file: the function's
// name in 32 bytes, then Calls, Injected and OK as uint64 in host order.
const countSize = 32 + 3*8

// Counts returns the counts of every wrapped function by name ("C_Login"),
// since the module was first loaded in this test. A function never called
// counts zero; before the module is loaded every count is zero.
func (f *Faults) Counts() map[string]Count {
	f.t.Helper()
	data, err := os.ReadFile(f.counts)
	if err != nil && !os.IsNotExist(err) {
		f.t.Fatal(err)
	}
	out := map[string]Count{}
	for ; len(data) >= countSize; data = data[countSize:] {
		name := strings.TrimRight(string(data[:32]), "\x00")
		if name == "" {
			break
		}
		u := func(i int) uint64 { return binary.NativeEndian.Uint64(data[32+8*i:]) }
		out[name] = Count{Calls: u(0), Injected: u(1), OK: u(2)}
	}
	return out
}

// Calls counts the calls of the PKCS#11 function name ("C_Login") that
// reached the module, faulted or not, in every process that loaded it
// since NewFaults: how a test counts login attempts of a keywardd it ran.
func (f *Faults) Calls(name string) int {
	f.t.Helper()
	return int(f.Counts()[name].Calls)
}
