package rewrap

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// errorsIsLoop: open with O_NOFOLLOW met a symbolic link.
func errorsIsLoop(err error) bool { return errors.Is(err, syscall.ELOOP) }

// links is a file's hard link count.
func links(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Nlink)
	}
	return 1
}

// chownLike gives f like's owner and group, unless they are f's already;
// a caller who may not (not root, not the owner) is told so.
func chownLike(f *os.File, like fs.FileInfo) error {
	st, ok := like.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	mine, err := f.Stat()
	if err != nil {
		return err
	}
	if m, ok := mine.Sys().(*syscall.Stat_t); ok && m.Uid == st.Uid && m.Gid == st.Gid {
		return nil
	}
	if err := f.Chown(int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("the file is owned by uid %d, gid %d, and its replacement could not be (%w): run the job as the files' owner", st.Uid, st.Gid, err)
	}
	return nil
}
