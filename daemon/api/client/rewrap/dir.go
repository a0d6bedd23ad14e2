package rewrap

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
)

// Dir is a directory of files, each a whole keyward ciphertext (what
// keyward encrypt writes), in subdirectories too. Cursors are the files'
// paths relative to Root, in byte order. Symbolic links, files with other
// hard links (replacing one would split them) and files over MaxSize are
// not touched.
//
// A file is replaced by renaming a synced new file over it, with the old
// one's mode and owner, after checking it still holds what the job read.
// An application that rewrites a file in place while the job runs can lose
// that write: run the job while nothing writes the files, or have the
// application write by renaming too (the check then sees its write, unless
// it lands in the moment between the check and the rename).
type Dir struct {
	Root string
	// Context gives a file's encryption context from its path relative to
	// Root; nil means the empty context.
	Context func(rel string) map[string]string
	// MaxSize is the largest file read; default 1 MiB (keywardd seals at
	// most 64 KiB at once).
	MaxSize int64

	once  sync.Once
	files []string // relative paths, sorted
	err   error
}

// Name is "dir:" and the absolute root.
func (d *Dir) Name() string {
	abs, err := filepath.Abs(d.Root)
	if err != nil {
		abs = d.Root
	}
	return "dir:" + abs
}

// walk lists the regular files under Root once, the first time they are
// needed. Files made later are the application's, under the newest version
// already.
func (d *Dir) walk() error {
	d.once.Do(func() {
		d.err = filepath.WalkDir(d.Root, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), ".keyward-rewrap-") {
				return nil
			}
			rel, err := filepath.Rel(d.Root, p)
			if err != nil {
				return err
			}
			d.files = append(d.files, filepath.ToSlash(rel))
			return nil
		})
		slices.Sort(d.files)
	})
	return d.err
}

// Count is how many regular files Root holds.
func (d *Dir) Count(context.Context) (int64, error) {
	if err := d.walk(); err != nil {
		return 0, err
	}
	return int64(len(d.files)), nil
}

func (d *Dir) maxSize() int64 {
	if d.MaxSize > 0 {
		return d.MaxSize
	}
	return 1 << 20
}

// List reads the next files after the cursor after. A file too large, or
// gone since the walk, comes with no ciphertext (counted as not a
// ciphertext).
func (d *Dir) List(ctx context.Context, after string, limit int) ([]Item, error) {
	if err := d.walk(); err != nil {
		return nil, err
	}
	i := sort.SearchStrings(d.files, after)
	if i < len(d.files) && d.files[i] == after {
		i++
	}
	var out []Item
	for ; i < len(d.files) && len(out) < limit; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rel := d.files[i]
		it := Item{Cursor: rel}
		b, fi, err := d.read(rel)
		switch {
		case os.IsNotExist(err):
			// Gone since the walk: nothing to do.
		case err != nil:
			return nil, err
		case fi == nil:
			it.Skip = "a symbolic link now"
		case links(fi) > 1:
			it.Skip = fmt.Sprintf("it has %d hard links, which replacing it would split", links(fi))
		case b == nil:
			it.Skip = fmt.Sprintf("over %d bytes, or not a regular file", d.maxSize())
		}
		it.Ciphertext = b
		if d.Context != nil {
			it.Context = d.Context(rel)
		}
		out = append(out, it)
	}
	return out, nil
}

// read returns a regular file's bytes (nil if it is too large) and its
// information (nil for a symbolic link).
func (d *Dir) read(rel string) ([]byte, fs.FileInfo, error) {
	f, err := os.OpenFile(filepath.Join(d.Root, filepath.FromSlash(rel)), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errorsIsLoop(err) {
			return nil, nil, nil
		}
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > d.maxSize() {
		return nil, fi, nil
	}
	b, err := io.ReadAll(io.LimitReader(f, d.maxSize()+1))
	if err != nil {
		return nil, nil, err
	}
	if int64(len(b)) > d.maxSize() {
		return nil, fi, nil
	}
	return b, fi, nil
}

// Replace writes ciphertext over the file if it still holds it.Ciphertext.
func (d *Dir) Replace(_ context.Context, it Item, ciphertext []byte) error {
	if !filepath.IsLocal(filepath.FromSlash(it.Cursor)) {
		return fmt.Errorf("rewrap: %q is not a path under %s", it.Cursor, d.Root)
	}
	b, fi, err := d.read(it.Cursor)
	if os.IsNotExist(err) || (err == nil && (fi == nil || b == nil || !bytes.Equal(b, it.Ciphertext))) {
		return ErrChanged
	}
	if err != nil {
		return err
	}
	if links(fi) > 1 {
		return fmt.Errorf("rewrap: %s has %d hard links now, which replacing it would split", it.Cursor, links(fi))
	}
	return writeFile(filepath.Join(d.Root, filepath.FromSlash(it.Cursor)), ciphertext, fi)
}
