package ship

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
)

// fileSender appends lines to a newline-JSON file, fsynced after each
// batch unless no_fsync. A file moved away (logrotate without
// copytruncate) is noticed at the next batch, which goes to a new file at
// the path.
type fileSender struct {
	path  string
	fsync bool
	f     *os.File
	buf   []byte
}

func newFile(c SinkConfig) *fileSender { return &fileSender{path: c.Path, fsync: !c.NoFsync} }

// Send implements sender.
func (s *fileSender) Send(_ context.Context, b batch) error {
	if s.f != nil && moved(s.f, s.path) {
		s.f.Close()
		s.f = nil
	}
	if s.f == nil {
		f, err := openAppend(s.path)
		if err != nil {
			return err
		}
		s.f = f
	}
	s.buf = s.buf[:0]
	for _, ln := range b.lines {
		s.buf = append(append(s.buf, ln...), '\n')
	}
	_, err := s.f.Write(s.buf)
	if err == nil && s.fsync {
		err = s.f.Sync()
	}
	if cap(s.buf) > 4<<20 {
		s.buf = nil
	}
	if err != nil {
		// A short write leaves part of a line: the batch is written again
		// whole, after a newline, so that the part stands on a line of its
		// own (VerifyReceived reports it as malformed, not the line after).
		s.f.Write([]byte("\n"))
		s.f.Close()
		s.f = nil
		return fmt.Errorf("ship: %w", err)
	}
	return nil
}

// openAppend opens path to append to, created 0600 and made 0600 if it
// was not (the lines name callers, keys and operations). It does not
// follow a symbolic link at path: one could send the lines where others
// can read them.
func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("ship: %s is a symbolic link, which the file sink does not follow: set path to the file itself", path)
	}
	if err != nil {
		return nil, fmt.Errorf("ship: %w", err)
	}
	fi, err := f.Stat()
	if err == nil && fi.Mode().Perm() != 0o600 {
		err = f.Chmod(0o600)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ship: making %s 0600: %w", path, err)
	}
	return f, nil
}

// moved says whether path no longer names f's file.
func moved(f *os.File, path string) bool {
	a, err1 := f.Stat()
	b, err2 := os.Stat(path)
	if err1 != nil || err2 != nil {
		return true
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && (sa.Ino != sb.Ino || sa.Dev != sb.Dev)
}

// Close implements sender.
func (s *fileSender) Close() error {
	if s.f != nil {
		return s.f.Close()
	}
	return nil
}
