package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

const unitFile = "../../docs/systemd/keywardd.service"

// exitCreds is systemd's own exit code when it cannot load a unit's
// credentials (EXIT_CREDENTIALS): with LoadCredential=, a missing PIN file.
const exitCreds = 243

// unit is a systemd unit file: section -> key -> values, in order.
type unit map[string]map[string][]string

func parseUnit(t *testing.T, b []byte) unit {
	t.Helper()
	u := unit{}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: %q is not KEY=VALUE in a section", unitFile, i+1, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// one is the single value of a key.
func (u unit) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("%s: [%s] %s is set %d times, want once", unitFile, section, key, len(v))
	}
	return v[0]
}

// TestUnitRestartPolicy: the shipped unit never restarts keywardd after a
// permanent failure (exactly the permanent exit codes stop restarts), and
// restarts the others with a start limit that can be reached, so that no
// failure becomes an endless loop of starts.
func TestUnitRestartPolicy(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	u := parseUnit(t, b)
	if r := u.one(t, "Service", "Restart"); r != "on-failure" {
		t.Errorf("Restart=%s, want on-failure", r)
	}
	var prevent []int
	for f := range strings.FieldsSeq(u.one(t, "Service", "RestartPreventExitStatus")) {
		n, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("RestartPreventExitStatus: %q is not an exit code", f)
		}
		prevent = append(prevent, n)
	}
	slices.Sort(prevent)
	permanent := []int{daemon.ExitUsage, daemon.ExitData, daemon.ExitPIN, daemon.ExitConfig, exitCreds}
	slices.Sort(permanent)
	if !slices.Equal(prevent, permanent) {
		t.Errorf("RestartPreventExitStatus=%v, want the permanent failures %v", prevent, permanent)
	}
	for _, c := range []int{daemon.ExitFailure, daemon.ExitTokenMissing, daemon.ExitTransient} {
		if slices.Contains(prevent, c) {
			t.Errorf("exit code %d is not permanent, but the unit does not restart on it", c)
		}
	}
	// The start limit is in [Unit] (systemd ignores it in [Service] since
	// 230), and reachable: burst starts, RestartSec apart, fit in the
	// interval.
	for _, k := range []string{"StartLimitIntervalSec", "StartLimitBurst"} {
		if _, ok := u["Service"][k]; ok {
			t.Errorf("%s is in [Service]; it belongs in [Unit]", k)
		}
	}
	interval := systemdDuration(t, u.one(t, "Unit", "StartLimitIntervalSec"))
	burst, err := strconv.Atoi(u.one(t, "Unit", "StartLimitBurst"))
	if err != nil || burst < 1 {
		t.Fatalf("StartLimitBurst=%s", u.one(t, "Unit", "StartLimitBurst"))
	}
	every := systemdDuration(t, u.one(t, "Service", "RestartSec"))
	if every < 10*time.Second {
		t.Errorf("RestartSec=%s: under 10 s a failing start repeats too often", every)
	}
	if time.Duration(burst-1)*every >= interval {
		t.Errorf("StartLimitBurst=%d starts %s apart never fit in StartLimitIntervalSec=%s: the limit is never reached and restarts never stop", burst, every, interval)
	}
	if c := u.one(t, "Service", "LoadCredential"); !strings.HasPrefix(c, "keyward-pin:/") {
		t.Errorf("LoadCredential=%s, want the PIN as credential keyward-pin from an absolute path", c)
	}
}

// systemdDuration parses the few forms of time span the unit uses: 30s,
// 15min, 1h.
func systemdDuration(t *testing.T, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(strings.Replace(s, "min", "m", 1))
	if err != nil {
		t.Fatalf("time span %q: %v", s, err)
	}
	return d
}

// TestUnitVerifies runs systemd-analyze verify on the shipped unit, which
// works without a running systemd. It checks that ExecStart names an
// executable, so it verifies a copy whose ExecStart names the keywardd just
// built, the only line changed. Any warning fails the test: systemd
// ignores a key it does not know (RestartSteps= before systemd 254) with
// nothing but a warning and exit status 0.
func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze is missing: install systemd (make deps does)")
	}
	version, _ := exec.Command(analyze, "--version").Output()
	t.Logf("%s", bytes.SplitN(version, []byte("\n"), 2)[0])
	orig, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	bin := daemontest.Build(t)
	const shipped = "ExecStart=/usr/local/bin/keywardd "
	if bytes.Count(orig, []byte(shipped)) != 1 {
		t.Fatalf("%s has no single %q line", unitFile, shipped)
	}
	copy := bytes.Replace(orig, []byte(shipped), []byte("ExecStart="+bin+" "), 1)
	if a, b := strings.Split(string(orig), "\n"), strings.Split(string(copy), "\n"); len(a) != len(b) {
		t.Fatal("the copy has other lines than the unit")
	} else {
		diff := 0
		for i := range a {
			if a[i] != b[i] {
				diff++
			}
		}
		if diff != 1 {
			t.Fatalf("the copy differs from the unit in %d lines, want 1", diff)
		}
	}
	path := filepath.Join(t.TempDir(), "keywardd.service")
	if err := os.WriteFile(path, copy, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", path)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}

	// A key systemd does not know is only a warning, with exit status 0:
	// the check above sees it.
	bad := bytes.Replace(copy, []byte("RestartSec="), []byte("KeywardNoSuchSetting=5\nRestartSec="), 1)
	os.WriteFile(path, bad, 0o644)
	out, err = exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("Unknown key")) {
		t.Fatalf("systemd-analyze verify on an unknown key: %v, %q; want a warning and status 0", err, out)
	}
}

// TestExitCodesDocumented: docs/operations.md has a row for every exit
// code, naming each kind of failure daemon.ExitCode sorts into it, and the
// unit's comment names each code it does not restart on.
func TestExitCodesDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		code   int
		causes []string // what the row must say, one phrase per kind ExitCode sorts there
	}{
		{daemon.ExitOK, []string{"SIGTERM"}},
		{daemon.ExitFailure, []string{"any other failure"}},
		{daemon.ExitUsage, []string{"wrong flags"}},
		{daemon.ExitData, []string{"the store is damaged", "rolled back", "the audit log's last line does not parse", "over 1 MiB"}},
		{daemon.ExitTokenMissing, []string{"no token matches"}},
		{daemon.ExitTransient, []string{"busy or unreachable", "socket's directory", "held by another process", "disk refuses writes"}},
		{daemon.ExitPIN, []string{"refused the PIN", "PIN is locked"}},
		{daemon.ExitConfig, []string{"configuration file", "PIN file or credential", "matches two tokens", "weaker than keyward requires", "of another algorithm", "twice under one label", "lacks a mechanism"}},
		{exitCreds, []string{"could not load the credential"}},
	} {
		_, row, ok := bytes.Cut(doc, []byte(fmt.Sprintf("\n| %d |", c.code)))
		if !ok {
			t.Errorf("docs/operations.md has no row for exit code %d", c.code)
			continue
		}
		row, _, _ = bytes.Cut(row, []byte("\n"))
		for _, p := range c.causes {
			if !bytes.Contains(row, []byte(p)) {
				t.Errorf("docs/operations.md's row for exit code %d does not say %q", c.code, p)
			}
		}
	}
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	var comment []byte
	for line := range bytes.Lines(unit) {
		if bytes.HasPrefix(line, []byte("#")) {
			comment = append(comment, line...)
		}
	}
	for _, c := range []int{daemon.ExitUsage, daemon.ExitData, daemon.ExitPIN, daemon.ExitConfig, exitCreds} {
		if !regexp.MustCompile(fmt.Sprintf(`\b%d\b`, c)).Match(comment) {
			t.Errorf("the comments of %s do not name exit code %d, which it does not restart on", unitFile, c)
		}
	}
}
