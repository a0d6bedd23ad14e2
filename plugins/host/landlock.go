package host

// Keeping plugins from reading the HSM PIN's source (Config.Unreadable).
//
// A plugin runs as keywardd's user, so it may read what that user may read,
// the file the PIN comes from among it. A systemd credential is given to
// the service's user in a directory systemd mounts read-only, so keywardd
// cannot take its own access away; and it cannot run a plugin as another
// user or in another mount namespace without what the unit withholds
// (capabilities, namespaces: RestrictNamespaces=yes). What an unprivileged
// process can do is Landlock (Linux 5.13 and later): rules that a thread
// enforces on itself and on every process it starts from then on, and that
// nothing can lift.
//
// Landlock allows; it does not deny. A ruleset names the access rights it
// handles (here: reading a file; from ABI 2 also linking or renaming a file
// into another directory, which is otherwise refused everywhere), grants
// them beneath the files and directories its rules name, and refuses them
// everywhere else. So to refuse a path P alone, the rules grant them
// beneath every entry of each directory on the way from / to P but the one
// that leads to P. A plugin then reads all it could read before, except P
// (all beneath it, for a directory) and entries made in those directories
// after it started. Symlinks among the entries get no rule (what they point
// to is judged by its own path), and each entry is opened with O_NOFOLLOW,
// so one swapped for a symlink after the listing gains nothing. What has
// another name (a hard link, a bind mount) can still be read by that name.
// Should the plugin's temporary directory be one of those on the way (a
// PIN file under /tmp), the plugin gets a directory of its own in it for
// the launch, as TMPDIR (privateTemp).
//
// Go 1.26 cannot give a ruleset to a child process alone (SysProcAttr has no
// Landlock field yet), so each launch starts the plugin from an OS thread
// of its own (runtime.LockOSThread, never unlocked) that restricts itself
// first. The thread lives as long as the plugin: the kernel sends the
// plugin its Pdeathsig when the thread that started it ends. The three
// system calls are made here with x/sys/unix rather than through
// go-landlock, whose rules are paths it opens following symlinks and whose
// system-call package is marked unstable; the structures are those of
// linux/landlock.h.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// errNoLandlock: the kernel cannot enforce Landlock rules here: it has no
// Landlock (before Linux 5.13, or not in its lsm= list), or a system-call
// filter refuses the calls (a unit without them in SystemCallFilter=).
var errNoLandlock = errors.New("host: Landlock is not available")

// landlockABI is the kernel's Landlock ABI version. A variable, so that a
// test can be a kernel without Landlock.
var landlockABI = func() (int, error) {
	v, _, e := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	if e != 0 {
		return 0, e
	}
	return int(v), nil
}

// restrictThread keeps the calling OS thread, and every process it starts
// from now on, from reading the files in hide and what lies beneath the
// directories in hide. The caller has locked the goroutine to its thread
// and never unlocks it, so that the thread ends with the goroutine.
func restrictThread(hide []string) error {
	hidden, err := realPaths(hide)
	if err != nil || len(hidden) == 0 {
		return err // nothing there to hide: a ruleset would hide all
	}
	abi, err := landlockABI()
	if err != nil {
		return fmt.Errorf("%w: %w", errNoLandlock, err)
	}
	handled := uint64(unix.LANDLOCK_ACCESS_FS_READ_FILE)
	if abi >= 2 {
		handled |= unix.LANDLOCK_ACCESS_FS_REFER
	}
	attr := struct{ handledAccessFS uint64 }{handled} // the first field of struct landlock_ruleset_attr
	fd, _, e := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr), 0)
	if e != 0 {
		return fmt.Errorf("host: creating a Landlock ruleset: %w", e)
	}
	defer unix.Close(int(fd))
	if err := allowAllBut(int(fd), handled, hidden); err != nil {
		return err
	}
	// Landlock requires no_new_privs (the unit's NoNewPrivileges=yes sets
	// it for the whole service; this sets it for this thread).
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("host: no_new_privs: %w", err)
	}
	if _, _, e := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, fd, 0, 0); e != 0 {
		return fmt.Errorf("host: enforcing the Landlock ruleset: %w", e)
	}
	return nil
}

// realPaths are the paths of hide that exist, symlinks resolved.
func realPaths(hide []string) (map[string]bool, error) {
	hidden := map[string]bool{}
	for _, p := range hide {
		real, err := filepath.EvalSymlinks(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue // nothing there to hide
		}
		if err != nil {
			return nil, fmt.Errorf("host: %w", err)
		}
		hidden[real] = true
	}
	return hidden, nil
}

// allowAllBut adds to ruleset a rule granting handled beneath every entry
// of each directory on the way to a path of hidden (real paths), but the
// entries that lead to one.
func allowAllBut(ruleset int, handled uint64, hidden map[string]bool) error {
	beneathHidden := func(p string) bool {
		for ; ; p = filepath.Dir(p) {
			if hidden[p] {
				return true
			}
			if p == "/" {
				return false
			}
		}
	}
	onTheWay := map[string]bool{} // directories above a hidden path
	for p := range hidden {
		for d := filepath.Dir(p); !onTheWay[d]; d = filepath.Dir(d) {
			onTheWay[d] = true
			if d == "/" {
				break
			}
		}
	}
	for dir := range onTheWay {
		if beneathHidden(dir) {
			continue // all of it is hidden
		}
		entries, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrPermission) {
			continue // keywardd cannot list it: none of its entries is granted
		}
		if err != nil {
			return fmt.Errorf("host: %w", err)
		}
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			if onTheWay[p] || hidden[p] {
				continue
			}
			if err := allowBeneath(ruleset, p, handled); err != nil {
				return err
			}
		}
	}
	return nil
}

// allowBeneath grants handled beneath path (for a file, the rights of
// files among them), unless it is a symlink or is gone.
func allowBeneath(ruleset int, path string, handled uint64) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil // gone since the listing
	}
	if err != nil {
		return fmt.Errorf("host: %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("host: %s: %w", path, err)
	}
	access := handled
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		return nil
	case unix.S_IFDIR:
	default:
		access &= unix.LANDLOCK_ACCESS_FS_READ_FILE // REFER is for directories
	}
	rule := unix.LandlockPathBeneathAttr{Allowed_access: access, Parent_fd: int32(fd)}
	if _, _, e := unix.Syscall6(unix.SYS_LANDLOCK_ADD_RULE, uintptr(ruleset), unix.LANDLOCK_RULE_PATH_BENEATH, uintptr(unsafe.Pointer(&rule)), 0, 0, 0); e != 0 {
		return fmt.Errorf("host: a Landlock rule for %s: %w", path, e)
	}
	return nil
}

// privateTemp makes a directory of the plugin's own in its temporary
// directory (tmpdir, or /tmp) when that lies on the way to a path of hide:
// the plugin could read no file made there after its start, those of
// go-plugin's start-up among them. It returns "" when there is no need.
func privateTemp(name, tmpdir string, hide []string) (string, error) {
	if len(hide) == 0 {
		return "", nil
	}
	if tmpdir == "" {
		tmpdir = "/tmp"
	}
	real, err := filepath.EvalSymlinks(tmpdir)
	if err != nil {
		return "", nil // the plugin finds out for itself
	}
	hidden, err := realPaths(hide)
	if err != nil {
		return "", err
	}
	for rh := range hidden {
		if strings.HasPrefix(rh, strings.TrimSuffix(real, "/")+"/") {
			dir, err := os.MkdirTemp(tmpdir, "keyward-plugin-"+name+"-")
			if err != nil {
				return "", fmt.Errorf("plugin %s: a temporary directory of its own: %w", name, err)
			}
			return dir, nil
		}
	}
	return "", nil
}

// hiddenList is hide for a log line.
func hiddenList(hide []string) string { return strings.Join(hide, ", ") }
