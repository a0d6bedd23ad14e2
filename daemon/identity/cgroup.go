package identity

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"
)

// Cgroup is the control group the kernel put a process in (the cgroup v2
// unified hierarchy), and the names derived from its path: the systemd
// unit, the Kubernetes pod and the container it belongs to.
//
// Names are derived only from the part of the path that a process cannot
// shape itself: the slices and the first unit below them, or, where
// systemd does not manage the tree, the components above the first unit.
// systemd delegates only below a unit (user@UID.service, a unit with
// Delegate=yes, a container's scope), and a process can only move between
// cgroups below the closest one whose cgroup.procs it may write: a user's
// own session cannot make itself "orders.service" or a Kubernetes pod.
type Cgroup struct {
	// Path is the cgroup's path ("/system.slice/orders.service"), relative
	// to the root of keywardd's cgroup namespace; empty when unknown.
	Path string
	// Unit is the systemd unit ("orders.service", "session-3.scope",
	// "user@1000.service", "cri-containerd-<id>.scope"): the first
	// component of the path below its slices.
	Unit string
	// PodUID is the Kubernetes pod's UID, with dashes, from a kubepods
	// path (either kubelet cgroup driver).
	PodUID string
	// ContainerID is the container's ID (64 hex digits) from a
	// containerd, CRI-O, Docker or Podman path.
	ContainerID string
}

// ErrCgroup says /proc/PID/cgroup could not be made sense of; the caller
// then has no cgroup, and no selector naming one matches it.
var ErrCgroup = errors.New("identity: unreadable /proc/PID/cgroup")

// maxCgroupLen bounds what is kept of a path: the kernel's own limit on a
// path (PATH_MAX) is 4096.
const maxCgroupLen = 4096

// ParseCgroup reads the content of /proc/PID/cgroup and returns the
// process's cgroup in the unified hierarchy (the line "0::PATH"), the one
// hierarchy on a cgroup v2 host and the one systemd and the container
// runtimes keep as well on a hybrid host. Content with no unified line (a
// cgroup v1-only host), more than one, a line not of the form
// "ID:CONTROLLERS:PATH", or a path that is not absolute, not UTF-8, holds a
// control character or is longer than 4096 bytes, is an error matching
// ErrCgroup: a path with a newline in one of its names could pass for a
// line of its own, and a cgroup the daemon cannot name is not one a policy
// can select.
func ParseCgroup(data []byte) (Cgroup, error) {
	s := string(data)
	if !strings.HasSuffix(s, "\n") {
		return Cgroup{}, fmt.Errorf("%w: it does not end in a newline", ErrCgroup)
	}
	var unified string
	found := false
	for i, line := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		id, rest, ok1 := strings.Cut(line, ":")
		ctrls, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || id == "" || strings.Trim(id, "0123456789") != "" || !strings.HasPrefix(p, "/") {
			return Cgroup{}, fmt.Errorf("%w: line %d is not ID:CONTROLLERS:PATH", ErrCgroup, i+1)
		}
		if id != "0" || ctrls != "" {
			continue
		}
		if found {
			return Cgroup{}, fmt.Errorf("%w: more than one unified (0::) line", ErrCgroup)
		}
		unified, found = p, true
	}
	if !found {
		return Cgroup{}, fmt.Errorf("%w: no unified (0::) line; keyward reads the cgroup v2 hierarchy, which this host does not mount", ErrCgroup)
	}
	if len(unified) > maxCgroupLen || !utf8.ValidString(unified) || strings.ContainsFunc(unified, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return Cgroup{}, fmt.Errorf("%w: the path is longer than %d bytes, not UTF-8 or holds a control character", ErrCgroup, maxCgroupLen)
	}
	return CgroupOfPath(unified), nil
}

// CgroupOfPath derives the names of a cgroup from its path, as ParseCgroup
// does. A path outside keywardd's cgroup namespace ("/../..."), or not
// absolute, gets no names.
func CgroupOfPath(p string) Cgroup {
	c := Cgroup{Path: p}
	if !strings.HasPrefix(p, "/") || p == "/" {
		return c
	}
	comps := strings.Split(p[1:], "/")
	if slices.Contains(comps, "..") || slices.Contains(comps, ".") || slices.Contains(comps, "") {
		return c
	}
	// The trusted prefix: slices, then the first unit, which is the last
	// component a delegate cannot name.
	i := 0
	for i < len(comps) && strings.HasSuffix(comps[i], ".slice") {
		i++
	}
	if i < len(comps) && isUnit(comps[i]) {
		c.Unit = comps[i]
		if m := containerScope.FindStringSubmatch(c.Unit); m != nil {
			c.ContainerID = m[1]
		}
	}
	for _, s := range comps[:i] {
		if m := podSlice.FindStringSubmatch(s); m != nil {
			c.PodUID = podUID(m[1])
		}
	}
	if c.Unit != "" || i > 0 {
		return c
	}
	// No systemd: the cgroupfs layouts of kubelet and Docker, at the root
	// only. Anywhere below, the names are a delegated subtree's own (an
	// LXC container's "/lxc.payload.c1/kubepods/pod.../...", a user's
	// "/user/1000/docker/..."), which any process holding it can make.
	if len(comps) > 0 {
		rest := comps[1:]
		switch comps[0] {
		case "kubepods":
			if len(rest) > 0 && (rest[0] == "burstable" || rest[0] == "besteffort") {
				rest = rest[1:]
			}
			if len(rest) == 0 || !podDir.MatchString(rest[0]) {
				return c
			}
			c.PodUID = podUID(strings.TrimPrefix(rest[0], "pod"))
			if len(rest) > 1 && containerID.MatchString(rest[1]) {
				c.ContainerID = rest[1]
			}
			return c
		case "docker", "libpod_parent":
			if len(rest) > 0 && containerID.MatchString(strings.TrimPrefix(rest[0], "libpod-")) {
				c.ContainerID = strings.TrimPrefix(rest[0], "libpod-")
			}
			return c
		}
	}
	return c
}

var (
	containerID = regexp.MustCompile(`^[0-9a-f]{64}$`)
	// containerScope is the scope a runtime's systemd cgroup driver makes
	// per container; their "conmon" scopes are not containers.
	containerScope = regexp.MustCompile(`^(?:cri-containerd|crio|docker|libpod|containerd)-([0-9a-f]{64})\.scope$`)
	// A pod's UID is a UUID, or 32 hex digits for a static pod; the
	// systemd driver writes the UUID's dashes as underscores.
	podSlice = regexp.MustCompile(`^(?:[a-z0-9]+-)*kubepods(?:-burstable|-besteffort)?-pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}|[0-9a-f]{32})\.slice$`)
	podDir   = regexp.MustCompile(`^pod(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$`)
)

func podUID(s string) string { return strings.ReplaceAll(s, "_", "-") }

// isUnit says whether a path component names a systemd unit that holds
// processes.
func isUnit(s string) bool {
	for _, suffix := range []string{".service", ".scope", ".socket", ".mount", ".swap"} {
		if name, ok := strings.CutSuffix(s, suffix); ok && name != "" {
			return true
		}
	}
	return false
}

// String is the cgroup for logs: its path, or "?" when unknown.
func (c Cgroup) String() string {
	if c.Path == "" {
		return "?"
	}
	return c.Path
}
