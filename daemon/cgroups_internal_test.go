package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCgroupsUnreadable: keywardd warns, at start and at each reload, when
// its policy names callers by cgroup and the host has no cgroup v2
// hierarchy to read them from (those selectors would match nobody), and
// says nothing otherwise.
func TestCgroupsUnreadable(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	policyWith := func(selector string) string {
		return write("policy-"+fmt.Sprint(len(selector))+".yaml", fmt.Sprintf(`version: 1
roles:
  r:
    permissions:
      - operations: [StatusService.Ping]
        keys: ["*"]
bindings:
  - role: r
    callers:
      - %s
`, selector))
	}
	v1Only := write("v1", "12:pids:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n")
	v2 := write("v2", "0::/system.slice/keywardd.service\n")
	byUnit, byUID := policyWith("systemd_unit: orders.service"), policyWith("uid: 1000")
	for _, c := range []struct {
		policy, cgroup string
		warns          bool
	}{
		{byUnit, v1Only, true},
		{byUnit, v2, false},
		{byUnit, filepath.Join(dir, "missing"), true},
		{byUID, v1Only, false},
	} {
		p, err := loadPolicy(c.policy)
		if err != nil {
			t.Fatal(err)
		}
		why := cgroupsUnreadable(p, c.cgroup)
		if (why != "") != c.warns || c.warns && !strings.Contains(why, "match no caller") {
			t.Errorf("policy %s, cgroup file %s: %q; want a warning: %v", filepath.Base(c.policy), filepath.Base(c.cgroup), why, c.warns)
		}
	}
}
