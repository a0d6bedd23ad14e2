package sdk

import (
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// watchParent ends the plugin when keywardd is gone: the kernel sends
// SIGTERM when the parent dies (PR_SET_PDEATHSIG), and a poll of the parent
// PID catches what that misses (a parent that died before the call, or the
// death of the thread that started us rather than of keywardd). keywardd
// asks the kernel the same from its side (SIGKILL), so that a keywardd
// killed with -9 leaves no plugin behind.
func watchParent() {
	parent := os.Getppid()
	unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGTERM), 0, 0, 0)
	if os.Getppid() != parent { // died before the call: PDEATHSIG would not come
		os.Exit(1)
	}
	go func() {
		for range time.Tick(time.Second) {
			if os.Getppid() != parent {
				logger.Error("keywardd is gone; the plugin stops")
				os.Exit(1)
			}
		}
	}()
}
