package rewrap

import (
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

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
		return fmt.Errorf("%w: the file is owned by uid %d, gid %d, and its replacement could not be (%w): run the job as the files' owner", ErrNotReplaced, st.Uid, st.Gid, err)
	}
	return nil
}
