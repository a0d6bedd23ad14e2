package dkcache

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// keySize is the size of a keyward data key (AES-256).
const keySize = 32

// ErrMemoryLock: the cache could not lock its memory (mlock refused,
// usually RLIMIT_MEMLOCK); New returns it unless Options.AllowUnlocked.
var ErrMemoryLock = errors.New("dkcache: cannot lock memory for data keys")

// arena is the memory every plaintext data key of a cache lives in: one
// anonymous mapping made at New, locked (never swapped), left out of core
// dumps and zeroed in a forked child, cut into 32-byte slots. One mapping
// rather than one a key: the cache's locked memory is a page or two, not a
// page a key, and if it cannot be locked New says so at once instead of
// the hundredth Seal. A slot is cleared as soon as its key expires or is
// evicted; the mapping is cleared, unlocked and unmapped at Close.
type arena struct {
	mem    []byte
	free   []int // slot numbers not in use
	locked bool
}

// beforeUnmap, if set (tests), sees the arena's memory right before it
// is unmapped, after it was cleared.
var beforeUnmap func(mem []byte)

// newArena maps room for slots keys. If mlock fails it unmaps and
// returns ErrMemoryLock, unless allowUnlocked: then it keeps the memory
// unlocked and says so in locked.
func newArena(slots int, allowUnlocked bool) (*arena, error) {
	page := os.Getpagesize()
	size := (slots*keySize + page - 1) / page * page
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("dkcache: mapping memory for data keys: %w", err)
	}
	// Out of core dumps (Linux 3.4); zeroed in a child after fork (Linux
	// 4.14: an older kernel refuses it with EINVAL, and a child there
	// inherits a copy, as it does of the rest of the heap).
	if err := unix.Madvise(mem, unix.MADV_DONTDUMP); err != nil {
		unix.Munmap(mem)
		return nil, fmt.Errorf("dkcache: madvise(MADV_DONTDUMP): %w", err)
	}
	if err := unix.Madvise(mem, unix.MADV_WIPEONFORK); err != nil && !errors.Is(err, unix.EINVAL) {
		unix.Munmap(mem)
		return nil, fmt.Errorf("dkcache: madvise(MADV_WIPEONFORK): %w", err)
	}
	a := &arena{mem: mem, locked: true}
	if err := unix.Mlock(mem); err != nil {
		if !allowUnlocked {
			unix.Munmap(mem)
			return nil, fmt.Errorf("%w: mlock of %d bytes: %v; raise the process's RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=, docker: --ulimit memlock=, shell: ulimit -l) or set Options.AllowUnlocked to keep data keys in memory that can be swapped",
				ErrMemoryLock, size, err)
		}
		a.locked = false
	}
	for i := slots - 1; i >= 0; i-- {
		a.free = append(a.free, i)
	}
	return a, nil
}

// take returns a free slot and its memory; the caller holds the cache's
// lock and has made sure one is free.
func (a *arena) take() (int, []byte) {
	i := a.free[len(a.free)-1]
	a.free = a.free[:len(a.free)-1]
	return i, a.mem[i*keySize : (i+1)*keySize : (i+1)*keySize]
}

// give clears slot i and makes it free again.
func (a *arena) give(i int) {
	clear(a.mem[i*keySize : (i+1)*keySize])
	a.free = append(a.free, i)
}

// close clears, unlocks and unmaps the whole arena.
func (a *arena) close() error {
	clear(a.mem)
	if beforeUnmap != nil {
		beforeUnmap(a.mem)
	}
	if a.locked {
		unix.Munlock(a.mem)
	}
	err := unix.Munmap(a.mem)
	a.mem = nil
	if err != nil {
		return fmt.Errorf("dkcache: unmapping the data keys' memory: %w", err)
	}
	return nil
}
