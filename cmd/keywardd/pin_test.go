package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestPINSources starts the real keywardd with the PIN in each place it
// may be: a systemd credential, a file, a variable. Each serves, and the
// PIN is in none of its command line, its environment as the kernel shows
// it (/proc/PID/environ, where a variable stays after os.Unsetenv unless
// keywardd overwrites it) and its log; SIGTERM stops it with exit code 0.
func TestPINSources(t *testing.T) {
	bin := daemontest.Build(t)
	const pinVar, canary = "KEYWARD_TEST_HSM_PIN", "KEYWARD_TEST_CANARY=still-here"
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, f *daemontest.Files) string // the hsm.pin_* line
	}{
		{"credential", func(t *testing.T, f *daemontest.Files) string {
			// As systemd makes it: a directory and a 0400 file of the
			// service's user.
			dir := filepath.Join(t.TempDir(), "credentials")
			os.Mkdir(dir, 0o700)
			os.WriteFile(filepath.Join(dir, "keyward-pin"), []byte(f.Token.PIN), 0o400)
			os.Chmod(dir, 0o500)
			t.Setenv("CREDENTIALS_DIRECTORY", dir)
			return "pin_credential: keyward-pin"
		}},
		{"file", func(t *testing.T, f *daemontest.Files) string { return "pin_file: " + f.Token.PINFile }},
		{"variable", func(t *testing.T, f *daemontest.Files) string {
			softhsmtest.RequireRoot(t, "reads /proc/PID/environ of keywardd, which is not dumpable: that takes CAP_SYS_PTRACE")
			t.Setenv(pinVar, f.Token.PIN)
			return "pin_env: " + pinVar
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := daemontest.NewFiles(t)
			editConfig(t, f, "pin_file: "+f.Token.PINFile, tc.setup(t, f))
			k, v, _ := strings.Cut(canary, "=")
			t.Setenv(k, v)
			cmd := daemontest.Exec(t, bin, f)
			proc := "/proc/" + strconv.Itoa(cmd.Pid())

			argv, err := os.ReadFile(proc + "/cmdline")
			if err != nil || !strings.Contains(string(argv), f.ConfigFile) {
				t.Fatalf("%s/cmdline: %q, %v", proc, argv, err)
			}
			if strings.Contains(string(argv), f.Token.PIN) {
				t.Errorf("the command line shows the PIN: %q", argv)
			}
			env, err := os.ReadFile(proc + "/environ")
			switch {
			case err == nil:
				// The canary shows that the read sees the environment keywardd
				// was started with.
				if !strings.Contains(string(env), canary+"\x00") {
					t.Fatalf("%s/environ lacks the canary %s: %q", proc, canary, env)
				}
				if strings.Contains(string(env), f.Token.PIN) || strings.Contains(string(env), pinVar+"=") {
					t.Errorf("%s/environ shows the PIN's variable", proc)
				} else {
					t.Logf("%s/environ: %d bytes, no PIN", proc, len(env))
				}
			case os.Getuid() == 0:
				t.Fatalf("root cannot read %s/environ: %v (CAP_SYS_PTRACE missing?)", proc, err)
			default:
				t.Logf("%s/environ is closed to the same user without CAP_SYS_PTRACE (keywardd is not dumpable): %v", proc, err)
			}

			if err := cmd.Stop(); err != nil {
				t.Fatalf("%v, want exit code 0", err)
			}
			logs := cmd.Log()
			if !strings.Contains(logs, `"msg":"keywardd serving"`) {
				t.Fatalf("no serving in the log:\n%s", logs)
			}
			if strings.Contains(logs, f.Token.PIN) {
				t.Errorf("the log shows the PIN:\n%s", logs)
			}
		})
	}
}
