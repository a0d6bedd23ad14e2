// Package identity says who is on the other end of a Unix socket connection,
// as the kernel knows it: uid and gid (SO_PEERCRED), the process (a pidfd,
// SO_PEERPIDFD), the binary it runs (/proc/PID/exe and its SHA-256) and the
// cgroup it is in (/proc/PID/cgroup: its systemd unit, Kubernetes pod or
// container; see Cgroup). A caller is never identified by anything it sends.
//
// The cgroup is read once, at connect time, as the binary is: a process
// moved to another cgroup after it connected keeps, for that connection,
// the cgroup it had. ParseCgroup and CgroupOfPath are hand-written: no
// well-kept library parses /proc/PID/cgroup into systemd, Kubernetes and
// container names without also managing cgroups (and importing much more).
//
// PID reuse: the process is pinned by a pidfd the kernel hands over with the
// connection (Linux 6.5 and later), or, on older kernels, one opened by PID and
// checked against the connection's accept time (a process started after the
// connection cannot be its peer). Everything read through /proc is checked
// against the pidfd afterwards: a process that is still alive still owns its
// PID, so what was read is its own. Alive tells before a sensitive call
// whether the caller is still the same process.
//
// A caller in a PID namespace this process cannot see into has PID 0; it is
// identified by uid and gid only, which is not an error.
package identity

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrGone says the caller's process exited, or its PID now names another
// process.
var ErrGone = errors.New("identity: the calling process is gone")

// Caller is the kernel's account of who connected.
type Caller struct {
	UID uint32
	GID uint32
	// Groups are the supplementary groups of the process (/proc/PID/status),
	// read at connect time; empty for a caller with PID 0.
	Groups []uint32
	// PID is 0 when the caller is in a PID namespace this process cannot
	// see into; then Exe and ExeSHA256 are empty.
	PID int
	// Exe is the path of the caller's binary as /proc shows it; empty when
	// it cannot be read (another user's process, without the privilege to
	// read its /proc entry).
	Exe string
	// ExeSHA256 is the hex SHA-256 of the binary the process runs (the file
	// it was started from, even if since replaced on disk).
	ExeSHA256 string
	// Cgroup is the cgroup the process was in when it connected (a process
	// moved since keeps the one read then); its Path is empty for a caller
	// with PID 0 or whose /proc/PID/cgroup could not be read or made sense
	// of (ParseCgroup).
	Cgroup Cgroup

	mu    sync.RWMutex // guards pidfd against Close while calls run Alive
	pidfd int          // -1 when there is none
	start uint64       // process start time, clock ticks since boot
}

// Resolver identifies callers and caches binary hashes by file identity
// (device, inode, size, modification time), so a binary is hashed once.
// The zero value is not usable; use NewResolver.
type Resolver struct {
	// Hashing, if set, is asked before a binary not in the cache is
	// hashed, with the caller's uid and the binary's size: a caller can
	// make keywardd hash its binary again at every connection (touching it
	// is enough), and the binary can be as large as it likes. An error
	// stops the identification: Identify returns it.
	Hashing func(uid uint32, size int64) error

	proc string // "/proc"; tests may point elsewhere

	mu     sync.Mutex
	hashes map[fileKey]string
}

// fileKey identifies a file's content without reading it. The owner of a
// file can set its size and mtime back after changing it, but not its ctime,
// which every such change moves.
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64
}

const maxCachedHashes = 4096

// NewResolver returns a Resolver reading /proc.
func NewResolver() *Resolver { return &Resolver{proc: "/proc", hashes: map[fileKey]string{}} }

// Identify returns the caller on the other end of conn. accepted is when the
// connection was accepted. Close the Caller when the connection closes.
func (r *Resolver) Identify(conn *net.UnixConn, accepted time.Time) (*Caller, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	var cred *unix.Ucred
	pidfd := -1
	var credErr, pidfdErr error
	err = raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	})
	if err == nil {
		err = credErr
	}
	if err != nil {
		return nil, fmt.Errorf("identity: reading SO_PEERCRED: %w", err)
	}
	c := &Caller{UID: cred.Uid, GID: cred.Gid, PID: int(cred.Pid), pidfd: -1}
	if c.PID == 0 {
		if pidfdErr == nil {
			unix.Close(pidfd)
		}
		return c, nil
	}
	if pidfdErr == nil {
		c.pidfd = pidfd
	} else {
		// Kernels before 6.5: open one by PID, and make sure the process
		// behind it existed when the connection was accepted.
		if c.pidfd, err = unix.PidfdOpen(c.PID, 0); err != nil {
			return nil, fmt.Errorf("%w: pidfd_open(%d): %v", ErrGone, c.PID, err)
		}
	}
	if err := r.inspect(c, accepted, pidfdErr != nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// PeerUID is the uid of the process on the other end of conn
// (SO_PEERCRED): one system call, so that a caller can be refused on its
// uid alone before Identify reads anything about it from /proc.
func PeerUID(conn *net.UnixConn) (uint32, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("identity: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) { cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return 0, fmt.Errorf("identity: %w", err)
	}
	if credErr != nil {
		return 0, fmt.Errorf("identity: reading SO_PEERCRED: %w", credErr)
	}
	return cred.Uid, nil
}

// inspect reads the caller's start time and binary from /proc and checks
// that the process is still the one the pidfd names.
func (r *Resolver) inspect(c *Caller, accepted time.Time, byPID bool) error {
	var err error
	if c.start, err = r.startTime(c.PID); err != nil {
		return fmt.Errorf("%w: %v", ErrGone, err)
	}
	if byPID {
		uptime, err := bootTime()
		if err != nil {
			return err
		}
		acceptedTicks := int64((uptime - time.Since(accepted)).Seconds() * clockTicks)
		if int64(c.start) > acceptedTicks+1 {
			return fmt.Errorf("%w: PID %d was reused after the connection was made", ErrGone, c.PID)
		}
	}
	if c.Groups, err = r.groups(c.PID); err != nil {
		return fmt.Errorf("%w: %v", ErrGone, err)
	}
	// Unreadable: identified by uid and gid only.
	if c.Exe, c.ExeSHA256, err = r.binary(c.PID, c.UID); err != nil {
		return err
	}
	// Unreadable or senseless: no cgroup, which no selector naming one
	// matches.
	if b, err := os.ReadFile(fmt.Sprintf("%s/%d/cgroup", r.proc, c.PID)); err == nil {
		c.Cgroup, _ = ParseCgroup(b)
	}
	return c.Alive()
}

// Alive reports whether the caller's process still runs; ErrGone if not.
// Call it before acting on a sensitive request, so that a reply cannot go
// to a process that took over a dead caller's PID.
func (c *Caller) Alive() error {
	c.mu.RLock() // the calls of a connection check at once
	defer c.mu.RUnlock()
	switch {
	case c.pidfd == -2:
		return fmt.Errorf("%w: its connection is closed", ErrGone)
	case c.pidfd < 0 || c.PID == 0:
		return nil // PID 0: nothing to check beyond the connection itself
	}
	if err := unix.PidfdSendSignal(c.pidfd, 0, nil, 0); err != nil {
		return fmt.Errorf("%w: PID %d: %v", ErrGone, c.PID, err)
	}
	return nil
}

// Close releases the pidfd. Alive fails after it.
func (c *Caller) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var err error
	if c.pidfd >= 0 {
		err = unix.Close(c.pidfd)
	}
	c.pidfd = -2
	return err
}

// String describes the caller for logs and audit records.
func (c *Caller) String() string {
	if c.PID == 0 {
		return fmt.Sprintf("uid=%d gid=%d pid=? (other PID namespace)", c.UID, c.GID)
	}
	exe := c.Exe
	if exe == "" {
		exe = "?"
	}
	if c.Cgroup.Path == "" {
		return fmt.Sprintf("uid=%d gid=%d pid=%d exe=%s", c.UID, c.GID, c.PID, exe)
	}
	return fmt.Sprintf("uid=%d gid=%d pid=%d exe=%s cgroup=%s", c.UID, c.GID, c.PID, exe, c.Cgroup.Path)
}

// binary returns the path and SHA-256 of the process's executable, or
// empty strings when /proc does not let this process read them; an error
// only from r.Hashing.
func (r *Resolver) binary(pid int, uid uint32) (path, sum string, err error) {
	link := fmt.Sprintf("%s/%d/exe", r.proc, pid)
	path, err = os.Readlink(link)
	if err != nil {
		return "", "", nil
	}
	f, err := os.Open(link) // the file the process runs, even if replaced since
	if err != nil {
		return path, "", nil
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return path, "", nil
	}
	key := fileKey{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
	r.mu.Lock()
	sum, ok := r.hashes[key]
	r.mu.Unlock()
	if ok {
		return path, sum, nil
	}
	if r.Hashing != nil {
		if err := r.Hashing(uid, st.Size); err != nil {
			return path, "", err
		}
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return path, "", nil
	}
	sum = hex.EncodeToString(h.Sum(nil))
	r.mu.Lock()
	if len(r.hashes) >= maxCachedHashes {
		clear(r.hashes)
	}
	r.hashes[key] = sum
	r.mu.Unlock()
	return path, sum, nil
}

// groups reads the supplementary groups from /proc/PID/status.
func (r *Resolver) groups(pid int) ([]uint32, error) {
	b, err := os.ReadFile(fmt.Sprintf("%s/%d/status", r.proc, pid))
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, f := range strings.Fields(rest) {
			n, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("unreadable Groups line in /proc/%d/status", pid)
			}
			out = append(out, uint32(n))
		}
		return out, nil
	}
	return nil, fmt.Errorf("no Groups line in /proc/%d/status", pid)
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's start time; 100 on
// every Linux architecture keyward builds for.
const clockTicks = 100

// startTime reads field 22 of /proc/PID/stat.
func (r *Resolver) startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("%s/%d/stat", r.proc, pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold anything;
	// the fields after the last ')' start at field 3.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("unreadable /proc stat")
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return 0, errors.New("short /proc stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// bootTime is the time since boot (CLOCK_BOOTTIME, which /proc's start
// times count from).
func bootTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("identity: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}
