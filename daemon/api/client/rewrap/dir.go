package rewrap

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
)

// Dir is a directory of files, each a whole keyward ciphertext (what
// keyward encrypt writes), in subdirectories too. Cursors are the files'
// paths relative to Root, with '/', in byte order. Symbolic links, files
// with other hard links (replacing one name would split them) and files
// over MaxSize are not touched. Every file is reached through an os.Root
// of Root: a symbolic link swapped in for a subdirectory during the job
// cannot lead it outside.
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
	root  *os.Root
	name  string
	files []string // relative paths, sorted
	err   error
}

// Prepare opens Root (following it if it is a symbolic link) and lists its
// regular files, once. Files made later are the application's, under the
// newest version already.
func (d *Dir) Prepare(context.Context) error {
	d.once.Do(func() {
		abs, err := filepath.Abs(d.Root)
		if err == nil {
			abs, err = filepath.EvalSymlinks(abs)
		}
		if err != nil {
			d.err = fmt.Errorf("rewrap: %w", err)
			return
		}
		host, _ := os.Hostname()
		d.name = "dir:" + host + ":" + abs
		if d.root, d.err = os.OpenRoot(abs); d.err != nil {
			return
		}
		d.err = fs.WalkDir(d.root.FS(), ".", func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), tempPrefix) {
				d.files = append(d.files, p)
			}
			return nil
		})
		slices.Sort(d.files)
	})
	return d.err
}

// Name is "dir:", the host's name and the directory's absolute path with
// symbolic links resolved: the same directory on two hosts is two sources.
func (d *Dir) Name() string {
	if d.Prepare(context.Background()) != nil {
		return "dir:" + d.Root
	}
	return d.name
}

// Count is how many regular files Root holds.
func (d *Dir) Count(ctx context.Context) (int64, error) {
	if err := d.Prepare(ctx); err != nil {
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

// List reads the next files after the cursor after.
func (d *Dir) List(ctx context.Context, after string, limit int) ([]Item, error) {
	if err := d.Prepare(ctx); err != nil {
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
		case errors.Is(err, fs.ErrNotExist):
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
	f, err := d.root.OpenFile(rel, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
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

// tempPrefix names the job's temporary files, which the walk leaves out.
const tempPrefix = ".keyward-rewrap-"

// Replace writes ciphertext over the file if it still holds it.Ciphertext:
// a synced new file in the same directory, with the old one's mode and
// owner, renamed over it, the directory synced.
func (d *Dir) Replace(ctx context.Context, it Item, ciphertext []byte) (err error) {
	if err := d.Prepare(ctx); err != nil {
		return err
	}
	b, fi, err := d.read(it.Cursor)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && (fi == nil || b == nil || !bytes.Equal(b, it.Ciphertext))) {
		return ErrChanged
	}
	if err != nil {
		return err
	}
	if links(fi) > 1 {
		return fmt.Errorf("%w: it has %d hard links now, which replacing it would split", ErrNotReplaced, links(fi))
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := path.Join(path.Dir(it.Cursor), tempPrefix+hex.EncodeToString(rnd[:]))
	f, err := d.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotReplaced, err)
	}
	defer func() {
		if err != nil {
			d.root.Remove(tmp)
		}
	}()
	if err := fill(f, ciphertext, fi); err != nil {
		return err
	}
	if err := d.root.Rename(tmp, it.Cursor); err != nil {
		return err
	}
	dir, err := d.root.Open(path.Dir(it.Cursor))
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}

// fill gives the new file f like's mode and owner, writes b, syncs and
// closes it.
func fill(f *os.File, b []byte, like fs.FileInfo) error {
	err := f.Chmod(0o600)
	if err == nil && like != nil {
		err = chownLike(f, like)
		if err == nil {
			err = f.Chmod(like.Mode().Perm())
		}
	}
	if err == nil {
		_, err = f.Write(b)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
