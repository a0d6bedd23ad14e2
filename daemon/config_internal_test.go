package daemon

import "testing"

// TestSocketGroup: socket.group is a group's name, or a gid as digits (a
// container's /etc/group seldom names the pod's supplemental groups).
func TestSocketGroup(t *testing.T) {
	for group, want := range map[string]int{"": -1, "1500": 1500, "0": 0, "root": 0} {
		o, err := unixOptions("/run/k/k.sock", 0o660, group, "socket.group")
		if err != nil || o.GID != want {
			t.Errorf("group %q: gid %d, %v; want %d", group, o.GID, err, want)
		}
	}
	for _, bad := range []string{"no-such-group-here", "-1", "99999999999"} {
		if _, err := unixOptions("/run/k/k.sock", 0o660, bad, "socket.group"); err == nil {
			t.Errorf("group %q taken", bad)
		}
	}
}
