package audit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// backward reads a file's lines from an end towards its start, a chunk at
// a time: what List reads of a log that may be gigabytes, newest line
// first, never more of it than the lines it hands out (and the chunk they
// are in). It is written here rather than taken from a library because
// what List needs of it is particular: each line's offset (a page token is
// one), the bytes read so far (a call's bound), a line longer than any
// record refused rather than buffered, and a last line without its newline
// (a write in progress, or one a crash tore) never handed out.
//
// The lines it returns are the '\n'-terminated lines of the file's bytes
// [0, end), without their '\n', last first: the same lines, in reverse,
// as a forward read that drops what follows the last '\n'
// (FuzzBackward holds them equal).
type backward struct {
	r     io.ReaderAt
	start int64  // the file offset of buf[0]
	buf   []byte // the bytes [start, ...) not yet handed out
	// whole: buf is whole lines (it is empty, or ends in '\n'): what
	// followed the last '\n' before end was dropped.
	whole bool
	read  int64 // bytes read so far
	chunk int   // bytes read at a time
}

// backChunk is how much backward reads at a time.
const backChunk = 64 << 10

// maxLine is the longest line backward takes: keywardd cuts a record's
// fields to 1 KiB each (a batch of 100 items stays far below it), and Open
// refuses a log that ends in a longer line.
const maxLine = 1 << 20

// errLongLine: a line over maxLine bytes, which keywardd never writes.
var errLongLine = errors.New("a line over 1 MiB, longer than any record")

// newBackward reads the lines of r's bytes [0, end) backward.
func newBackward(r io.ReaderAt, end int64) *backward {
	return &backward{r: r, start: end, chunk: backChunk}
}

// prev returns the line before those returned so far (without its '\n')
// and the offset where it starts, or io.EOF once every line was returned.
// The line stays valid: backward never writes over what it handed out.
func (b *backward) prev() ([]byte, int64, error) {
	for {
		if !b.whole {
			// Drop what follows the last '\n': a line not yet whole.
			if i := bytes.LastIndexByte(b.buf, '\n'); i >= 0 {
				b.buf, b.whole = b.buf[:i+1], true
				continue
			}
			if b.start == 0 {
				b.buf, b.whole = nil, true
				continue
			}
		} else if len(b.buf) > 0 {
			// buf ends in '\n': the line is what follows the '\n' before
			// it, or all of buf at the file's start.
			if i := bytes.LastIndexByte(b.buf[:len(b.buf)-1], '\n'); i >= 0 || b.start == 0 {
				line, off := b.buf[i+1:len(b.buf)-1], b.start+int64(i+1)
				if len(line) > maxLine {
					return nil, 0, b.long(off + int64(len(line)))
				}
				b.buf = b.buf[:i+1]
				return line, off, nil
			}
		} else if b.start == 0 {
			return nil, 0, io.EOF
		}
		if err := b.more(); err != nil {
			return nil, 0, err
		}
	}
}

// long is the error of a line over maxLine that ends at byte end.
func (b *backward) long(end int64) error {
	return fmt.Errorf("%w: %w, ends at byte %d", ErrDamaged, errLongLine, end)
}

// more reads the chunk before buf.
func (b *backward) more() error {
	if len(b.buf) > maxLine {
		return b.long(b.start + int64(len(b.buf)))
	}
	n := min(int64(b.chunk), b.start)
	nb := make([]byte, n+int64(len(b.buf)))
	if got, err := b.r.ReadAt(nb[:n], b.start-n); err != nil && (got < int(n) || !errors.Is(err, io.EOF)) {
		return fmt.Errorf("audit: reading bytes %d to %d: %w", b.start-n, b.start, err)
	}
	copy(nb[n:], b.buf)
	b.buf, b.start = nb, b.start-n
	b.read += n
	return nil
}
