package identity

import (
	"errors"
	"strings"
	"testing"
)

const (
	cid  = "3f1a6c2e9b8d7f4a5e6c1b2d3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3"
	cid2 = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d"
	uuid = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
	uidU = "1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901" // the systemd driver's spelling
	stat = "6e1a2b3c4d5e6f708192a3b4c5d6e7f8"     // a static pod's UID: a hash
)

// TestCgroupOfPath derives names from paths seen on real hosts: systemd
// services, scopes and user sessions, kubelet with either cgroup driver
// and containerd or CRI-O, Docker with either driver, Podman rootful and
// rootless; and paths a delegate could make to pass for one of them.
func TestCgroupOfPath(t *testing.T) {
	for _, tc := range []struct {
		name, path           string
		unit, pod, container string
	}{
		{"systemd service", "/system.slice/orders.service", "orders.service", "", ""},
		{"delegated service's sub-cgroup", "/system.slice/orders.service/worker", "orders.service", "", ""},
		{"systemd-run scope", "/system.slice/run-r3b2f0c1d9e8a4b7c.scope", "run-r3b2f0c1d9e8a4b7c.scope", "", ""},
		{"systemd-run scope, newer name", "/system.slice/run-p4242-i4243.scope", "run-p4242-i4243.scope", "", ""},
		{"nested slices", "/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", "", ""},
		{"user session", "/user.slice/user-1000.slice/session-3.scope", "session-3.scope", "", ""},
		{"user manager", "/user.slice/user-1000.slice/user@1000.service/init.scope", "user@1000.service", "", ""},
		{"user's own unit is the user manager's", "/user.slice/user-1000.slice/user@1000.service/app.slice/orders.service", "user@1000.service", "", ""},
		{"init", "/init.scope", "init.scope", "", ""},
		{"kubelet systemd, containerd, burstable",
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			"cri-containerd-" + cid + ".scope", uuid, cid},
		{"kubelet systemd, containerd, guaranteed",
			"/kubepods.slice/kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			"cri-containerd-" + cid + ".scope", uuid, cid},
		{"kubelet systemd, static pod",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + stat + ".slice/cri-containerd-" + cid + ".scope",
			"cri-containerd-" + cid + ".scope", stat, cid},
		{"kubelet systemd, CRI-O",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-" + cid + ".scope",
			"crio-" + cid + ".scope", uuid, cid},
		{"CRI-O, the container's own cgroup (crun)",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-" + cid + ".scope/container",
			"crio-" + cid + ".scope", uuid, cid},
		{"CRI-O conmon is no container",
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-conmon-" + cid + ".scope",
			"crio-conmon-" + cid + ".scope", uuid, ""},
		{"kind node (kubelet.slice)",
			"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			"cri-containerd-" + cid + ".scope", uuid, cid},
		{"kubelet cgroupfs, burstable", "/kubepods/burstable/pod" + uuid + "/" + cid, "", uuid, cid},
		{"kubelet cgroupfs, besteffort", "/kubepods/besteffort/pod" + uuid + "/" + cid, "", uuid, cid},
		{"kubelet cgroupfs, guaranteed", "/kubepods/pod" + uuid + "/" + cid, "", uuid, cid},
		{"kubelet cgroupfs, pod level", "/kubepods/burstable/pod" + uuid, "", uuid, ""},
		// kubelet's --cgroup-root elsewhere than /: the names are not
		// believed below the root (an LXC container or a user's subtree
		// could make the same); select such pods by a cgroup glob.
		{"kubelet cgroupfs under a cgroup root", "/k8s/kubepods/pod" + uuid + "/" + cid, "", "", ""},
		{"kubepods made in an LXC container", "/lxc.payload.c1/kubepods/pod" + uuid + "/" + cid, "", "", ""},
		{"docker made in a user's subtree", "/user/1000/docker/" + cid, "", "", ""},
		{"docker systemd driver", "/system.slice/docker-" + cid + ".scope", "docker-" + cid + ".scope", "", cid},
		{"docker cgroupfs driver", "/docker/" + cid, "", "", cid},
		{"podman rootful", "/machine.slice/libpod-" + cid + ".scope", "libpod-" + cid + ".scope", "", cid},
		{"podman rootful, container cgroup", "/machine.slice/libpod-" + cid + ".scope/container", "libpod-" + cid + ".scope", "", cid},
		{"podman conmon", "/machine.slice/libpod-conmon-" + cid + ".scope", "libpod-conmon-" + cid + ".scope", "", ""},
		{"podman cgroupfs", "/libpod_parent/libpod-" + cid, "", "", cid},
		{"podman rootless: the user's, not a container's",
			"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + cid + ".scope", "user@1000.service", "", ""},
		{"docker in a container's scope: the outer one",
			"/system.slice/docker-" + cid + ".scope/docker/" + cid2, "docker-" + cid + ".scope", "", cid},
		{"a user's kubepods is no pod",
			"/user.slice/user-1000.slice/user@1000.service/kubepods/pod" + uuid + "/" + cid, "user@1000.service", "", ""},
		{"a user's pod slice is no pod",
			"/user.slice/user-1000.slice/user@1000.service/kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope", "user@1000.service", "", ""},
		{"a container's own docker dir is not its name",
			"/system.slice/containerd.service/docker/" + cid, "containerd.service", "", ""},
		{"short container ID is none", "/docker/3f1a6c2e9b8d", "", "", ""},
		{"upper-case ID is none", "/docker/" + strings.ToUpper(cid), "", "", ""},
		{"pod UID not a UUID", "/kubepods/pod1234/" + cid, "", "", ""},
		{"outside keywardd's cgroup namespace", "/../../system.slice/orders.service", "", "", ""},
		{"root", "/", "", "", ""},
		{"empty component", "/system.slice//orders.service", "", "", ""},
		{"a bare slice", "/system.slice", "", "", ""},
		{"a test cgroup", "/keyward-test-1/allowed", "", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := CgroupOfPath(tc.path)
			want := Cgroup{Path: tc.path, Unit: tc.unit, PodUID: tc.pod, ContainerID: tc.container}
			if c != want {
				t.Errorf("CgroupOfPath(%q)\n = %+v\nwant %+v", tc.path, c, want)
			}
		})
	}
}

// TestParseCgroup reads /proc/PID/cgroup as cgroup v2, hybrid and v1-only
// hosts write it, and refuses what could be a forged line.
func TestParseCgroup(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		path     string // "" with err
		err      string
	}{
		{"cgroup v2", "0::/system.slice/orders.service\n", "/system.slice/orders.service", ""},
		{"hybrid", "12:pids:/system.slice/orders.service\n1:name=systemd:/system.slice/orders.service\n0::/system.slice/orders.service\n", "/system.slice/orders.service", ""},
		{"hybrid, unified line first", "0::/init.scope\n9:name=systemd:/\n4:memory:/a/b\n", "/init.scope", ""},
		{"path with a colon", "0::/system.slice/a:b.service\n", "/system.slice/a:b.service", ""},
		{"path with a space", "0::/x/a b\n", "/x/a b", ""},
		{"v1 only", "12:pids:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n", "", "no unified (0::) line"},
		{"two unified lines (a newline in a name)", "0::/user.slice/x\n0::/system.slice/orders.service\n", "", "more than one unified"},
		{"not ending in a newline", "0::/system.slice/orders.service", "", "does not end in a newline"},
		{"empty", "", "", "does not end in a newline"},
		{"empty line", "0::/a\n\n", "", "line 2"},
		{"not ID:CONTROLLERS:PATH", "0:/a\n", "", "line 1"},
		{"ID not a number", "x::/a\n", "", "line 1"},
		{"relative path", "0::a/b\n", "", "line 1"},
		{"control character", "0::/a\tb\n", "", "control character"},
		{"not UTF-8", "0::/a\xffb\n", "", "not UTF-8"},
		{"too long", "0::/" + strings.Repeat("a", maxCgroupLen) + "\n", "", "longer than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseCgroup([]byte(tc.in))
			if tc.err != "" {
				if !errors.Is(err, ErrCgroup) || !strings.Contains(err.Error(), tc.err) || c != (Cgroup{}) {
					t.Fatalf("ParseCgroup(%q) = %+v, %v; want an ErrCgroup saying %q", tc.in, c, err, tc.err)
				}
				return
			}
			if err != nil || c.Path != tc.path {
				t.Fatalf("ParseCgroup(%q) = %+v, %v; want path %q", tc.in, c, err, tc.path)
			}
		})
	}
}

// FuzzParseCgroup: any content either is refused with ErrCgroup or gives a
// clean absolute path, and names only drawn from that path, as
// CgroupOfPath derives them.
func FuzzParseCgroup(f *testing.F) {
	for _, s := range []string{
		"0::/system.slice/orders.service\n",
		"12:pids:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope\n",
		"0::/kubepods/burstable/pod" + uuid + "/" + cid + "\n",
		"0::/docker/" + cid + "\n",
		"0::/../../x.service\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCgroup(b)
		if err != nil {
			if !errors.Is(err, ErrCgroup) || c != (Cgroup{}) {
				t.Fatalf("error %v with %+v", err, c)
			}
			return
		}
		if !strings.HasPrefix(c.Path, "/") || strings.ContainsAny(c.Path, "\n\x00") || len(c.Path) > maxCgroupLen {
			t.Fatalf("path %q", c.Path)
		}
		if c != CgroupOfPath(c.Path) {
			t.Fatalf("%+v is not what CgroupOfPath derives", c)
		}
		for _, name := range []string{c.Unit, c.ContainerID} {
			if name != "" && !strings.Contains(c.Path, name) {
				t.Fatalf("name %q not in path %q", name, c.Path)
			}
		}
		if c.PodUID != "" && !strings.Contains(c.Path, c.PodUID) && !strings.Contains(c.Path, strings.ReplaceAll(c.PodUID, "-", "_")) {
			t.Fatalf("pod %q not in path %q", c.PodUID, c.Path)
		}
	})
}
