package hsm

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

// pinCopiesChild, set, makes the test binary the child of TestPINCopies:
// it reads the PIN as Open does, from the file the variable names, says
// "ready" and waits for its standard input to close.
const pinCopiesChild = "KEYWARD_TEST_PIN_COPIES_CHILD"

// TestPINCopies: reading the PIN from a file (a systemd credential is read
// the same way) leaves one copy of it in the process's memory, the one kept
// for logging in again after a reconnection: the buffer it was read into is
// cleared. A process of the same user reads the child's memory through
// /proc/PID/mem, as a debugger would.
func TestPINCopies(t *testing.T) {
	if path := os.Getenv(pinCopiesChild); path != "" {
		exe, _ := os.Executable()
		s, err := Config{Module: exe, Token: "t", PINFile: path}.resolve()
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		runtime.GC()
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		runtime.KeepAlive(s)
		os.Exit(0)
	}
	b := make([]byte, 16)
	rand.Read(b)
	pin := hex.EncodeToString(b) // made here: not in the test binary
	path := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(path, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestPINCopies$")
	cmd.Env = []string{pinCopiesChild + "=" + path}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		t.Fatalf("the child said %q", line)
	}
	if n := copiesInMemory(t, cmd.Process.Pid, []byte(pin)); n != 1 {
		t.Fatalf("%d copies of the PIN in the process's memory, want 1 (the one kept for logins)", n)
	}
}

// copiesInMemory counts the occurrences of secret in the readable memory
// of process pid.
func copiesInMemory(t *testing.T, pid int, secret []byte) int {
	t.Helper()
	proc := "/proc/" + strconv.Itoa(pid)
	maps, err := os.ReadFile(proc + "/maps")
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(proc + "/mem")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	n, regions := 0, 0
	for _, l := range strings.Split(strings.TrimSpace(string(maps)), "\n") {
		f := strings.Fields(l)
		var lo, hi uint64
		if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err != nil || f[1][0] != 'r' || strings.HasSuffix(l, "[vvar]") || strings.HasSuffix(l, "[vvar_vclock]") {
			continue
		}
		buf := make([]byte, hi-lo)
		got, _ := mem.ReadAt(buf, int64(lo))
		n += bytes.Count(buf[:got], secret)
		if got > 0 {
			regions++
		}
	}
	if regions == 0 {
		t.Fatalf("nothing of %s/mem could be read", proc)
	}
	return n
}

// TestScrubPINEnv: the PIN's variable is handed to ScrubPINEnv after it is
// read and before the module is loaded (the fault module counts no
// C_Initialize yet), so no helper process the module starts inherits it;
// the PIN read logs in, and again after the login is lost, with the
// variable gone. A scrub that fails stops Open with ErrConfig before the
// module is loaded.
func TestScrubPINEnv(t *testing.T) {
	tok := softhsmtest.New(t)
	f := softhsmtest.NewFaults(t, tok)
	const name = "KEYWARD_TEST_SCRUBBED_PIN"
	t.Setenv(name, tok.PIN)
	inits := -1
	cfg := Config{Module: f.Module, Token: tok.Label, PINEnv: name, ScrubPINEnv: func(n string) error {
		if v, _ := os.LookupEnv(n); n != name || v != tok.PIN {
			t.Errorf("ScrubPINEnv(%q) with the variable %q", n, v)
		}
		inits = f.Calls("C_Initialize")
		return os.Unsetenv(n)
	}}
	h, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if inits != 0 {
		t.Errorf("ScrubPINEnv ran after %d C_Initialize, want before the module is loaded", inits)
	}
	if _, ok := os.LookupEnv(name); ok {
		t.Error("the variable is still set")
	}
	mustCreate(t, h, KeyID{"kek", 1}, AES256GCM)
	mustCreate(t, h, KeyID{"mac", 1}, HMACSHA256)
	mustCreate(t, h, KeyID{"sig", 1}, ECDSAP256)
	// CKR_USER_NOT_LOGGED_IN from a call, and the anchor session agrees: the
	// login is lost, and keyward logs in again with the PIN it read.
	f.Set("C_GenerateRandom 0x101 once", "C_GetSessionInfo 0x101 once")
	exercise(t, h, 1)
	if n := f.Calls("C_Login"); n != 2 {
		t.Errorf("%d logins, want 2: the first, and one after the login was lost", n)
	}
	h.Close()

	t.Setenv(name, tok.PIN)
	before := f.Calls("C_Initialize")
	cfg.ScrubPINEnv = func(string) error { return errors.New("the variable could not be cleared: give the PIN in a file") }
	if h, err := Open(cfg); err == nil {
		h.Close()
		t.Fatal("Open succeeded although the PIN's variable could not be cleared")
	} else if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "give the PIN in a file") {
		t.Fatalf("Open: %v, want ErrConfig with ScrubPINEnv's message", err)
	}
	if n := f.Calls("C_Initialize"); n != before {
		t.Errorf("the module was initialized %d times although the scrub failed", n-before)
	}
}

// TestPINPath: the file each way of giving the PIN reads it from.
func TestPINPath(t *testing.T) {
	t.Setenv("CREDENTIALS_DIRECTORY", "/run/credentials/keywardd.service")
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{PINFile: "/etc/keyward/hsm.pin"}, "/etc/keyward/hsm.pin"},
		{Config{PINCredential: "keyward-pin"}, "/run/credentials/keywardd.service/keyward-pin"},
		{Config{URI: "pkcs11:token=k?pin-source=file:/etc/k.pin"}, "/etc/k.pin"},
		{Config{URI: "pkcs11:token=k?pin-source=file:///etc/k.pin"}, "/etc/k.pin"},
		{Config{URI: "pkcs11:token=k?pin-source=relative.pin"}, ""},
		{Config{URI: "pkcs11:token=k"}, ""},
		{Config{PINEnv: "PIN"}, ""},
	} {
		if got := tc.cfg.PINPath(); got != tc.want {
			t.Errorf("%+v: PINPath() = %q, want %q", tc.cfg, got, tc.want)
		}
	}
	os.Unsetenv("CREDENTIALS_DIRECTORY")
	if got := (Config{PINCredential: "keyward-pin"}).PINPath(); got != "" {
		t.Errorf("a credential without $CREDENTIALS_DIRECTORY: %q", got)
	}
}
