// Package socket makes keywardd's listening Unix socket without the usual
// mistakes: the socket lives in a directory only the daemon can write (0750
// or stricter), is never group- or world-writable even for an instant, is not
// taken from another daemon that still listens, does not follow a symlink or
// replace a file, and is removed on Close only if it is still the daemon's own.
//
// "Never writable for an instant": bind(2) creates the socket with the
// process umask, and changing the umask is not safe in a multi-threaded
// program. So the socket is bound inside a fresh 0700 directory, given its
// final mode there, and renamed into place.
package socket

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrInUse: another keywardd holds the socket's lock, so serves the path.
var ErrInUse = errors.New("socket: another keywardd is serving")

// Options say where the socket goes and who may connect.
type Options struct {
	// Path is the socket's absolute path. Its directory is created with
	// mode 0750 if missing; if it exists it must be a directory owned by
	// this user and not accessible beyond 0750.
	Path string
	// Mode is 0600 (this user only) or 0660 (and the group, which the
	// policy then sorts out). Zero means 0660.
	Mode os.FileMode
	// GID, if not -1, is the group the socket is given (with Mode 0660,
	// the group whose members may connect). Zero means the daemon's group.
	GID int
}

// Listener is the daemon's socket.
type Listener struct {
	*net.UnixListener
	path string
	ino  uint64
	lock *os.File

	closeOnce sync.Once // gRPC's Stop and keywardd's shutdown may both close it
	closeErr  error
}

// Listen creates the socket. A second keywardd on the same path fails at once
// with an error that says so.
func Listen(o Options) (*Listener, error) {
	if !filepath.IsAbs(o.Path) {
		return nil, fmt.Errorf("socket: path %q must be absolute", o.Path)
	}
	mode := o.Mode
	if mode == 0 {
		mode = 0o660
	}
	if mode != 0o600 && mode != 0o660 {
		return nil, fmt.Errorf("socket: mode %04o is not allowed; use 0600 or 0660 (the socket is never world-accessible)", mode)
	}
	dir := filepath.Dir(o.Path)
	if err := checkDir(dir, o.GID); err != nil {
		return nil, err
	}
	lock, err := lockPath(o.Path)
	if err != nil {
		return nil, err
	}
	l, err := bind(o.Path, dir, mode, o.GID)
	if err != nil {
		lock.Close()
		return nil, err
	}
	l.lock = lock
	return l, nil
}

// checkDir creates dir with mode 0750 (group gid, if not -1, so that the
// socket's group can reach it), or checks the one that is there.
func checkDir(dir string, gid int) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(dir, 0o750); err != nil {
			return fmt.Errorf("socket: creating %s: %w", dir, err)
		}
		if gid > 0 {
			if err := os.Chown(dir, -1, gid); err != nil {
				os.Remove(dir) // not left behind with the wrong group
				return fmt.Errorf("socket: giving %s the group %d: %w (keywardd's user must be a member of socket.group; on Kubernetes, list it in supplementalGroups)", dir, gid, err)
			}
		}
		if err := os.Chmod(dir, 0o750); err != nil { // Mkdir's mode is cut by the umask
			return fmt.Errorf("socket: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("socket: directory %s is a symlink; point the socket path at the real directory", dir)
	case !fi.IsDir():
		return fmt.Errorf("socket: %s is not a directory", dir)
	case fi.Sys().(*syscall.Stat_t).Uid != uint32(os.Geteuid()):
		return fmt.Errorf("socket: directory %s belongs to uid %d, not to keywardd's uid %d: use a directory keywardd owns", dir, fi.Sys().(*syscall.Stat_t).Uid, os.Geteuid())
	case fi.Mode().Perm()&^0o750 != 0:
		return fmt.Errorf("socket: directory %s has mode %04o; it must not be writable by the group or open to others: chmod 0750 %s", dir, fi.Mode().Perm(), dir)
	}
	return nil
}

// lockPath takes an exclusive lock next to the socket for as long as the
// daemon runs, so that two daemons starting at once cannot both bind.
func lockPath(path string) (*os.File, error) {
	name := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".lock")
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("socket: lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w %s (it holds %s)", ErrInUse, path, name)
		}
		return nil, fmt.Errorf("socket: locking %s: %w", name, err)
	}
	return f, nil
}

// bind clears a stale socket at path, then binds a new one in a private
// directory, sets its mode and group, and renames it into place.
func bind(path, dir string, mode os.FileMode, gid int) (*Listener, error) {
	if err := clearStale(path); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(dir, ".bind-") // 0700
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	defer os.RemoveAll(tmp)
	tmpSock := filepath.Join(tmp, "s")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmpSock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (*Listener, error) {
		ul.Close()
		return nil, fmt.Errorf("socket: %w", err)
	}
	if err := os.Chmod(tmpSock, mode); err != nil {
		return fail(err)
	}
	if gid > 0 {
		if err := os.Chown(tmpSock, -1, gid); err != nil {
			return fail(err)
		}
	}
	if err := os.Rename(tmpSock, path); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &Listener{UnixListener: ul, path: path, ino: fi.Sys().(*syscall.Stat_t).Ino}, nil
}

// clearStale removes a socket nobody answers on. Anything else at the path
// is refused: a live socket, a symlink, a file.
func clearStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("socket: %s is a symlink; keywardd does not follow it: remove it", path)
	case fi.Mode()&os.ModeSocket == 0:
		return fmt.Errorf("socket: %s exists and is not a socket; keywardd will not replace it: remove it or choose another path", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket: something is listening on %s already; stop it or choose another path", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket: %s exists and cannot be checked (%v); remove it if no daemon uses it", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("socket: removing the stale socket %s: %w", path, err)
	}
	return nil
}

// Path is where the socket is.
func (l *Listener) Path() string { return l.path }

// Close stops listening, removes the socket if the path still names this
// listener's socket, and releases the lock. It is safe to call more than
// once and from several goroutines.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		err := l.UnixListener.Close()
		if fi, statErr := os.Lstat(l.path); statErr == nil && fi.Sys().(*syscall.Stat_t).Ino == l.ino {
			if rmErr := os.Remove(l.path); err == nil {
				err = rmErr
			}
		}
		if l.lock != nil {
			l.lock.Close() // releases the flock
		}
		l.closeErr = err
	})
	return l.closeErr
}
