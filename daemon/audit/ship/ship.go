// Package ship ships keywardd's audit log to where security teams read it:
// syslog (RFC 5424 on a local unixgram socket, or over TCP with RFC 6587
// octet counting, or TLS as RFC 5425), a newline-JSON file, or HTTP POSTs
// of newline-JSON batches for a SIEM.
//
// The local log stays the source of truth: written, synced and fail
// closed before a call's answer goes out (package audit). Shipping reads
// it afterwards, up to what the log has synced, and each sink keeps its
// own cursor (byte offset, sequence number and hash of the last line
// shipped), written and fsynced after every acknowledged batch, so that a
// restart resumes where the sink was: at least once, a batch not
// acknowledged being shipped again (receivers drop duplicates by sequence
// number). The local log is the spool: a sink that cannot deliver only
// lags. Each sink's failure policy says what its lag does past its bound:
// spool alerts and goes on lagging (nothing dropped, no call waits);
// block makes keywardd refuse calls until the sink catches up.
//
// Every line is shipped exactly as it stands in the local log, so its
// hash still verifies at the receiver, checkpoints included; a record a
// sink's filter leaves out is shipped as a stub (seq, prev, hash, no
// content), so that `keyward audit verify -received` (audit.VerifyReceived)
// tells what is missing, altered or reordered from what was filtered.
//
// The syslog framing is written here (some twenty lines) rather than taken
// from a library: the standard library's log/syslog writes RFC 3164
// headers without octet counting, and what a sink needs (one message per
// line, a batch in one write, a reconnect after an error, the line's bytes
// untouched) is less than any syslog library's surface.
package ship

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/daemon/audit"
)

// ErrBlocked: a sink whose failure policy is block lags past its bound;
// keywardd refuses calls until it catches up.
var ErrBlocked = errors.New("ship: an audit sink with on_failure: block is too far behind")

// batch is what one delivery carries: lines as the sink ships them
// (without newlines) and their kinds.
type batch struct {
	lines [][]byte
	kinds []string
}

// sender delivers batches to one receiver. Send returns nil once the
// receiver has the batch (as far as the transport can say); an error
// means it is sent again.
type sender interface {
	Send(ctx context.Context, b batch) error
	Close() error
}

// Options are what a Shipper needs besides its sinks.
type Options struct {
	// LogPath is the local audit log; Size is the length of it that is
	// written and synced (audit.Log.State().Size): shipping never reads
	// past it.
	LogPath string
	Size    func() int64
	// StateDir holds each sink's cursor, NAME.cursor.
	StateDir string
	Log      *slog.Logger
	// Poll is how often a sink that has caught up looks for new lines;
	// default 100ms. MaxBackoff bounds the wait between failed
	// deliveries (from 100ms, doubling); default 30s.
	Poll       time.Duration
	MaxBackoff time.Duration
	// BatchBytes bounds the log bytes of one batch; default 256 KiB (a
	// longer line goes alone).
	BatchBytes int
}

// Shipper ships the local log to every sink configured.
type Shipper struct {
	o      Options
	sinks  []*sink
	notify atomic.Pointer[func()]
}

// sink is one sink and its cursor.
type sink struct {
	cfg  SinkConfig
	send sender
	log  *slog.Logger

	mu       sync.Mutex // guards below
	cur      cursor
	state    string // "shipping", "failing", "caught up"
	lastErr  string
	failSeen time.Time // when the current failure began
	shipped  uint64    // records shipped since start
	filtered uint64
	failures uint64
	over     bool // lag past the bound: alerted (spool) or blocking (block)
}

// cursor is where a sink is in the local log: the byte offset after the
// last line it shipped, that line's seq and hash.
type cursor struct {
	Offset int64  `json:"offset"`
	Seq    uint64 `json:"seq"`
	Hash   string `json:"hash"`
}

// New makes a Shipper for sinks (checked with Check), reading each
// sink's cursor.
func New(sinks []SinkConfig, o Options) (*Shipper, error) {
	if err := Check(sinks); err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Poll <= 0 {
		o.Poll = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 30 * time.Second
	}
	if o.BatchBytes <= 0 {
		o.BatchBytes = 256 << 10
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("ship: %w", err)
	}
	s := &Shipper{o: o}
	for _, c := range sinks {
		var snd sender
		var err error
		switch c.Type {
		case TypeSyslog:
			snd, err = newSyslog(c)
		case TypeFile:
			snd = newFile(c)
		case TypeHTTP:
			snd, err = newHTTP(c)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("audit_sinks (%s): %w", c.Name, err)
		}
		k := &sink{cfg: c, send: snd, log: o.Log.With("sink", c.Name), state: "shipping"}
		if k.cur, err = s.readCursor(c.Name); err != nil {
			s.Close()
			return nil, err
		}
		s.sinks = append(s.sinks, k)
	}
	return s, nil
}

// SetNotify sets a function called (on a goroutine of its own) whenever
// Blocked may have changed.
func (s *Shipper) SetNotify(fn func()) { s.notify.Store(&fn) }

func (s *Shipper) changed() {
	if fn := s.notify.Load(); fn != nil {
		go (*fn)()
	}
}

// Run ships to every sink until ctx ends.
func (s *Shipper) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, k := range s.sinks {
		wg.Go(func() { s.run(ctx, k) })
	}
	wg.Wait()
}

// Close closes the sinks' connections and files.
func (s *Shipper) Close() error {
	var errs []error
	for _, k := range s.sinks {
		errs = append(errs, k.send.Close())
	}
	return errors.Join(errs...)
}

// Blocked says why keywardd must refuse calls: a sink with on_failure:
// block lags past its bound. nil otherwise.
func (s *Shipper) Blocked() error {
	for _, k := range s.sinks {
		if k.cfg.OnFailure != Block {
			continue
		}
		lag := s.o.Size() - k.offset()
		if lag > k.cfg.maxLag() {
			k.mu.Lock()
			why := k.lastErr
			k.mu.Unlock()
			if why == "" {
				why = "it is slower than the log grows"
			}
			return fmt.Errorf("%w: sink %q is %d bytes behind the audit log, past its max_lag_bytes %d (%s); calls are refused until it catches up", ErrBlocked, k.cfg.Name, lag, k.cfg.maxLag(), why)
		}
	}
	return nil
}

func (k *sink) offset() int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.cur.Offset
}

// Status is a sink's state, for metrics and status.
type Status struct {
	Name, Type, OnFailure string
	// LagBytes is how far behind the local log the sink is; MaxLagBytes
	// its bound, and OverBound whether it is past it.
	LagBytes, MaxLagBytes int64
	OverBound             bool
	// Seq is the last line shipped and acknowledged.
	Seq uint64
	// Shipped and Filtered count records since keywardd started (stubs
	// in Filtered); Failures counts failed deliveries.
	Shipped, Filtered, Failures uint64
	// State is "shipping", "caught up" or "failing"; LastError says why
	// the last delivery failed (empty once one succeeds).
	State     string
	LastError string
}

// Status is every sink's state, in the configuration's order.
func (s *Shipper) Status() []Status {
	size := s.o.Size()
	out := make([]Status, 0, len(s.sinks))
	for _, k := range s.sinks {
		k.mu.Lock()
		lag := max(0, size-k.cur.Offset)
		out = append(out, Status{Name: k.cfg.Name, Type: k.cfg.Type, OnFailure: onFailure(k.cfg), LagBytes: lag, MaxLagBytes: k.cfg.maxLag(),
			OverBound: lag > k.cfg.maxLag(), Seq: k.cur.Seq, Shipped: k.shipped, Filtered: k.filtered, Failures: k.failures, State: k.state, LastError: k.lastErr})
		k.mu.Unlock()
	}
	return out
}

func onFailure(c SinkConfig) string {
	if c.OnFailure == "" {
		return Spool
	}
	return c.OnFailure
}

// run ships to one sink until ctx ends: it reads what the log has synced
// past the cursor, delivers it as a batch, and moves the cursor once the
// batch is acknowledged; a failed delivery is tried again, the wait
// doubling from 100ms up to MaxBackoff.
func (s *Shipper) run(ctx context.Context, k *sink) {
	f, err := os.Open(s.o.LogPath)
	if err != nil {
		k.fail(fmt.Errorf("ship: %w", err))
		<-ctx.Done()
		return
	}
	defer f.Close()
	if err := s.checkCursor(f, k); err != nil {
		k.log.Warn("the sink's cursor does not match the audit log (a new log, or a log put back); shipping it from its start", "reason", err.Error())
		k.mu.Lock()
		k.cur = cursor{}
		k.mu.Unlock()
	}
	backoff := 100 * time.Millisecond
	for {
		s.watchLag(k)
		b, next, err := s.read(f, k)
		if err == nil && len(b.lines) == 0 {
			k.setState("caught up")
			select {
			case <-ctx.Done():
				return
			case <-time.After(s.o.Poll):
			}
			continue
		}
		if err == nil {
			dctx, cancel := context.WithTimeout(ctx, k.cfg.timeout())
			err = k.send.Send(dctx, b)
			cancel()
		}
		if err == nil {
			err = s.advance(k, b, next)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			k.fail(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, s.o.MaxBackoff)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// watchLag alerts when the sink's lag crosses its bound, and when it is
// back under it; for a blocking sink, keywardd's calls are refused or
// served again (Blocked).
func (s *Shipper) watchLag(k *sink) {
	lag := s.o.Size() - k.offset()
	over := lag > k.cfg.maxLag()
	k.mu.Lock()
	was := k.over
	k.over = over
	why := k.lastErr
	k.mu.Unlock()
	switch {
	case over && !was && k.cfg.OnFailure == Block:
		k.log.Error("audit sink too far behind: keywardd refuses calls until it catches up (on_failure: block)", "lag_bytes", lag, "max_lag_bytes", k.cfg.maxLag(), "error", why)
	case over && !was:
		k.log.Error("audit sink too far behind: it goes on lagging, nothing is dropped (on_failure: spool)", "lag_bytes", lag, "max_lag_bytes", k.cfg.maxLag(), "error", why)
	case !over && was:
		k.log.Info("audit sink back under its bound", "lag_bytes", lag, "max_lag_bytes", k.cfg.maxLag())
	}
	if over != was && k.cfg.OnFailure == Block {
		s.changed()
	}
}

func (k *sink) setState(st string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.state == "failing" && st != "failing" {
		k.log.Info("audit sink delivers again", "failing_since", k.failSeen.UTC().Format(time.RFC3339))
		k.lastErr = ""
	}
	k.state = st
}

// fail records a failed delivery; the first of a run is logged.
func (k *sink) fail(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.failures++
	if k.state != "failing" {
		k.failSeen = time.Now()
		k.log.Warn("audit sink cannot deliver; the local log keeps everything and the sink tries again", "error", err.Error())
	}
	k.state, k.lastErr = "failing", err.Error()
}

// read reads the whole lines past the sink's cursor that the log has
// synced, up to BatchBytes (at least one line), and makes the batch to
// ship: each line as it stands, or its stub if the sink's filter leaves it
// out. next is the cursor after them.
func (s *Shipper) read(f *os.File, k *sink) (batch, cursor, error) {
	cur := k.snapshot()
	size := s.o.Size()
	if size <= cur.Offset {
		return batch{}, cur, nil
	}
	n := min(size-cur.Offset, int64(s.o.BatchBytes))
	buf := make([]byte, n)
	for {
		if _, err := f.ReadAt(buf, cur.Offset); err != nil && !errors.Is(err, io.EOF) {
			return batch{}, cur, fmt.Errorf("ship: reading the audit log: %w", err)
		}
		if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
			buf = buf[:i+1]
			break
		}
		if int64(len(buf)) == size-cur.Offset || len(buf) > 2<<20 {
			return batch{}, cur, fmt.Errorf("ship: the audit log holds a line over 2 MiB at byte %d, which keywardd never writes: run keyward audit verify on it", cur.Offset)
		}
		buf = make([]byte, min(size-cur.Offset, int64(2*len(buf))))
	}
	var b batch
	next := cur
	for ln := range bytes.Lines(buf) {
		next.Offset += int64(len(ln))
		ln = ln[:len(ln)-1]
		sl, err := audit.ParseShipped(ln)
		if err != nil {
			return batch{}, cur, fmt.Errorf("ship: line %d of the audit log: %w", next.Seq+1, err)
		}
		if sl.Kind == "record" && k.cfg.excluded(sl.Op) {
			b.lines, b.kinds = append(b.lines, sl.Stub()), append(b.kinds, audit.KindFiltered)
		} else {
			b.lines, b.kinds = append(b.lines, ln), append(b.kinds, sl.Kind)
		}
		next.Seq, next.Hash = sl.Seq, sl.Hash
	}
	return b, next, nil
}

func (k *sink) snapshot() cursor {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.cur
}

// advance moves the sink's cursor past an acknowledged batch, writing it
// to disk first.
func (s *Shipper) advance(k *sink, b batch, next cursor) error {
	if err := s.writeCursor(k.cfg.Name, next); err != nil {
		return err
	}
	var recs, filtered uint64
	for _, kind := range b.kinds {
		switch kind {
		case "record":
			recs++
		case audit.KindFiltered:
			filtered++
		}
	}
	k.mu.Lock()
	k.cur = next
	k.shipped += recs
	k.filtered += filtered
	k.mu.Unlock()
	k.setState("shipping")
	return nil
}

func (s *Shipper) cursorPath(name string) string { return filepath.Join(s.o.StateDir, name+".cursor") }

func (s *Shipper) readCursor(name string) (cursor, error) {
	var c cursor
	b, err := os.ReadFile(s.cursorPath(name))
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("ship: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil || c.Offset < 0 {
		return cursor{}, fmt.Errorf("ship: the cursor %s does not parse: remove it to ship the log again from its start", s.cursorPath(name))
	}
	return c, nil
}

// writeCursor writes a cursor so that a crash leaves the old one or the
// new one: to a temporary file, synced, renamed over, the directory
// synced.
func (s *Shipper) writeCursor(name string, c cursor) error {
	b, _ := json.Marshal(c)
	p := s.cursorPath(name)
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("ship: writing the cursor: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		var d *os.File
		if d, err = os.Open(s.o.StateDir); err == nil {
			err = d.Sync()
			d.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("ship: writing the cursor: %w", err)
	}
	return nil
}

// checkCursor checks that the line before the sink's cursor is the line
// it names: the log is the one the cursor was written for.
func (s *Shipper) checkCursor(f *os.File, k *sink) error {
	c := k.snapshot()
	if c.Offset == 0 {
		return nil
	}
	if c.Offset > s.o.Size() {
		return fmt.Errorf("the cursor is at byte %d, past the log's end", c.Offset)
	}
	start := max(0, c.Offset-(2<<20))
	buf := make([]byte, c.Offset-start)
	if _, err := f.ReadAt(buf, start); err != nil {
		return err
	}
	buf = bytes.TrimSuffix(buf, []byte("\n"))
	last := buf[bytes.LastIndexByte(buf, '\n')+1:]
	sl, err := audit.ParseShipped(last)
	if err != nil {
		return err
	}
	if sl.Seq != c.Seq || sl.Hash != c.Hash {
		return fmt.Errorf("the line before byte %d is seq %d, not the cursor's %d", c.Offset, sl.Seq, c.Seq)
	}
	return nil
}
