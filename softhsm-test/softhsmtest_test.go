package softhsmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	tok := New(t)
	if got := os.Getenv("SOFTHSM2_CONF"); got != tok.Conf {
		t.Fatalf("SOFTHSM2_CONF = %q, want %q", got, tok.Conf)
	}
	if !strings.HasPrefix(tok.Dir, os.TempDir()) || !strings.HasPrefix(tok.Conf, tok.Dir) {
		t.Fatalf("token outside the test's temp dir: %+v", tok)
	}
	conf, _ := os.ReadFile(tok.Conf)
	if !strings.Contains(string(conf), "directories.tokendir = "+filepath.Join(tok.Dir, "tokens")) {
		t.Fatalf("conf does not point into the token dir:\n%s", conf)
	}
	fi, err := os.Stat(tok.PINFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("PIN file: %v, mode %v", err, fi.Mode())
	}
	pin, _ := os.ReadFile(tok.PINFile)
	if string(pin) != tok.PIN+"\n" || len(tok.PIN) < 16 || tok.Serial == "" {
		t.Fatalf("token %+v", tok)
	}
	// The token works for another program: softhsm2-util lists it.
	out, err := exec.Command("softhsm2-util", "--show-slots").CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), tok.Label) || !strings.Contains(string(out), "User PIN init.:   yes") {
		t.Fatalf("softhsm2-util does not show an initialized %s:\n%s", tok.Label, out)
	}
	// A second token in the same process gets its own directory.
	other := New(t)
	if other.Dir == tok.Dir || other.Label == tok.Label || other.PIN == tok.PIN {
		t.Fatal("two tokens share a directory, label or PIN")
	}
}

func TestModuleMissing(t *testing.T) {
	t.Setenv("SOFTHSM2_MODULE", "/nonexistent/libsofthsm2.so")
	if _, err := Module(); err == nil || !strings.Contains(err.Error(), "SOFTHSM2_MODULE") {
		t.Fatalf("Module() with a wrong SOFTHSM2_MODULE: %v", err)
	}
	saved := modulePaths
	t.Cleanup(func() { modulePaths = saved })
	modulePaths = []string{"/nonexistent/a.so"}
	t.Setenv("SOFTHSM2_MODULE", "")
	_, err := Module()
	if err == nil || !strings.Contains(err.Error(), "apt-get install softhsm2") {
		t.Fatalf("Module() without SoftHSM2: %v, want it to name the package", err)
	}
}

// TestCreateTokenScript runs the script people and make run use.
func TestCreateTokenScript(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tok")
	cmd := exec.Command("./create-token", dir, "script-token")
	cmd.Env = append(os.Environ(), "KEYWARD_USER_PIN=user-pin-from-env")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("create-token: %v\n%s", err, out)
	}
	for _, want := range []string{"SOFTHSM2_CONF=" + dir + "/softhsm2.conf", "token=script-token", "pin_file=" + dir + "/user.pin"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "user-pin-from-env") {
		t.Error("the script printed the PIN")
	}
	if pin, _ := os.ReadFile(filepath.Join(dir, "user.pin")); string(pin) != "user-pin-from-env\n" {
		t.Errorf("user.pin holds %q", pin)
	}
	if out, err := exec.Command("./create-token").CombinedOutput(); err == nil || !strings.Contains(string(out), "create-token DIR [LABEL]") {
		t.Errorf("no arguments: %v\n%s", err, out)
	}
}
