// Package audit keeps keywardd's tamper-evident audit log: one JSON line per
// call, allowed or denied, written and synced to disk before the call's
// answer goes out. Lines are hash-chained (each holds the SHA-256 of the one
// before and of itself), and a checkpoint line MACs the chain's head with an
// HMAC key inside the HSM every so many records, every second and on close.
// Changing, removing or reordering a line breaks the chain; rewriting the
// chain from some line on needs the HSM key to forge the next checkpoint.
//
// One fsync serves every record that arrived while the previous one ran
// (group commit), and one HSM MAC serves every record since the last
// checkpoint, so auditing costs calls neither a disk flush nor an HSM
// operation each. Records never hold plaintext, data keys, PINs or secrets:
// an encryption context appears only as its SHA-256. The format is in
// docs/formats.md.
package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keyward/keyward/hsm"
)

// ErrUnavailable: the record could not be written; the call it records must
// fail.
var ErrUnavailable = errors.New("audit: the audit log cannot be written")

// ErrDamaged: Open found a log whose end is not an audit line (its last
// line does not parse, or the file ends in a line longer than any record),
// so the chain cannot be resumed. Trying again cannot help, and nothing was
// changed: run keyward audit verify on the file.
var ErrDamaged = errors.New("audit: the audit log is damaged")

// Caller is who made the call.
type Caller struct {
	UID    uint32 `json:"uid"`
	GID    uint32 `json:"gid"`
	PID    int    `json:"pid,omitempty"`
	Exe    string `json:"exe,omitempty"`
	SHA256 string `json:"exe_sha256,omitempty"`
	// Cgroup is the path of the caller's cgroup (cgroup v2) when it
	// connected, as keywardd's cgroup namespace shows it; absent when
	// unknown. Its systemd unit, Kubernetes pod and container are read
	// from it (docs/formats.md).
	Cgroup string `json:"cgroup,omitempty"`
}

// Record is one audited call.
type Record struct {
	Time          time.Time `json:"time"`
	Caller        Caller    `json:"caller"`
	Op            string    `json:"op"`
	Key           string    `json:"key,omitempty"`
	Version       uint32    `json:"version,omitempty"`
	Items         int       `json:"items,omitempty"`          // batch calls: how many
	ContextSHA256 string    `json:"context_sha256,omitempty"` // SHA-256 of the canonical encryption context
	Outcome       string    `json:"outcome"`                  // "ok", "denied" or "error"
	Code          string    `json:"code,omitempty"`           // the status code of a refusal
	Detail        string    `json:"detail,omitempty"`         // the refusal's message
	Batch         []Item    `json:"batch,omitempty"`          // a batch call's items, in order
	APIKey        string    `json:"api_key,omitempty"`        // an API key's ID, never its secret
	Result        string    `json:"result,omitempty"`         // VerifyAPIKey's verdict: VALID, NOT_FOUND, ...
	// Node is the name of the keywardd node of a fleet that wrote the
	// record (set by the log, from Options.Node; absent on one host).
	Node string `json:"node,omitempty"`
	// StoreWrites is the store's write count when the record was written
	// (set by the log, not the caller): a store behind the last one the
	// log holds is an older copy, and keywardd refuses it.
	StoreWrites uint64 `json:"store_writes,omitempty"`
}

// Item is one item of a batch call.
type Item struct {
	Key           string `json:"key,omitempty"`
	Version       uint32 `json:"version,omitempty"`
	ContextSHA256 string `json:"context_sha256,omitempty"`
	Outcome       string `json:"outcome"`
	Code          string `json:"code,omitempty"`
	Detail        string `json:"detail,omitempty"` // the item's refusal, as the caller was told it or, where it was withheld, the specific reason
}

// line is the JSON form of a line. Body is a Record or a checkpoint.
type line struct {
	Seq  uint64          `json:"seq"`
	Prev string          `json:"prev"`
	Kind string          `json:"kind"` // "record" or "checkpoint"
	Body json.RawMessage `json:"body"`
	Hash string          `json:"hash"`
}

// checkpoint MACs the chain up to and including the line before it, and
// (version 2, when StoreWrites is present) the store's write count.
type checkpoint struct {
	Key         string  `json:"key"` // the HMAC key's name and version, "audit v1"
	MAC         string  `json:"mac"`
	StoreWrites *uint64 `json:"store_writes,omitempty"`
}

// MACer computes HMAC-SHA256 with a key in the HSM.
type MACer interface {
	HMACSHA256(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, error)
}

// Options tune a Log. Zero values mean the defaults.
type Options struct {
	CheckpointEvery    int           // records between checkpoints; default 256
	CheckpointInterval time.Duration // most time between checkpoints; default 1 s
	// RetryEvery is how often a log that could not be written tries again.
	// Default 1 s.
	RetryEvery time.Duration
	// Now is the clock of the records the log writes itself; nil is
	// time.Now. The time between checkpoints is measured on the monotonic
	// clock.
	Now func() time.Time
	// Node is the node's name in a fleet, written in every record (Record.Node).
	Node string
}

// maxLate bounds the records kept while the log cannot be written, of
// calls that were done but could not be answered: they are written when
// the log can be written again.
const maxLate = 10000

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	f    *os.File
	mac  MACer
	key  hsm.KeyID
	opt  Options
	reqs chan *request
	done chan struct{}

	sendMu sync.RWMutex // Append sends under R; Close closes reqs under W

	mu     sync.Mutex // guards below; held by the writer while it writes
	seq    uint64
	head   [32]byte // hash of the last line
	since  int      // records since the last checkpoint
	lastCP time.Time
	size   int64  // the file's length after the last write that reached the disk
	buf    []byte // the writer's, for the lines of a batch
	broken error  // set when a write failed, until a retry succeeds: Append fails meanwhile
	outage outage // what happened while broken

	closed atomic.Bool

	lateMu sync.Mutex // guards late and lost
	late   []Record   // records of calls done but answered UNAVAILABLE, to write as soon as the log can
	lost   int        // such records past maxLate

	storeWrites     uint64                        // the last line's, when the log was opened
	storeWritesFunc atomic.Pointer[func() uint64] // the store's count, once it is open

	failed atomic.Pointer[error] // broken, readable without waiting for a write
	macErr atomic.Pointer[error] // why the last checkpoint could not be MACed
	notify atomic.Pointer[func()]

	// state is what the last write that reached the disk left (State),
	// readable without waiting for the writer.
	state atomic.Pointer[State]
	// verifying lets one verification of the whole file run at a time.
	verifying chan struct{}
}

// outage is when and why the log could not be written.
type outage struct {
	since time.Time
	cause string
}

type request struct {
	rec  Record
	body []byte // rec, encoded by its caller (encode)
	keep bool   // the call was done: if its record cannot be written now, it is kept and written late
	done chan error
}

// encode is a record's JSON, capped, without its store_writes: the writer
// adds that (withStoreWrites). Callers encode their own records, in
// parallel, so that the one writer only chains and writes them.
func (l *Log) encode(r Record) ([]byte, error) {
	r = capped(r)
	r.Node = l.opt.Node
	r.StoreWrites = 0
	return json.Marshal(r)
}

// withStoreWrites appends to dst an encoded record with its store_writes
// added: the same bytes json.Marshal writes for the record with
// StoreWrites set, as it is Record's last field and omitted when 0.
func withStoreWrites(dst, body []byte, n uint64) []byte {
	if n == 0 {
		return append(dst, body...)
	}
	dst = append(dst, body[:len(body)-1]...)
	dst = append(dst, `,"store_writes":`...)
	dst = strconv.AppendUint(dst, n, 10)
	return append(dst, '}')
}

// Open opens (or creates, mode 0600) the log at path and resumes its chain.
// A torn last line (a crash in the middle of a write, never acknowledged) is
// cut off, and the cut is recorded.
func Open(path string, mac MACer, key hsm.KeyID, o Options) (*Log, error) {
	if o.CheckpointEvery <= 0 {
		o.CheckpointEvery = 256
	}
	if o.CheckpointInterval <= 0 {
		o.CheckpointInterval = time.Second
	}
	if o.RetryEvery <= 0 {
		o.RetryEvery = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := &Log{f: f, mac: mac, key: key, opt: o, reqs: make(chan *request, 1024), done: make(chan struct{}), lastCP: time.Now(),
		verifying: make(chan struct{}, 1)}
	torn, err := l.resume()
	if err != nil {
		f.Close()
		return nil, err
	}
	go l.writer()
	if torn > 0 {
		err := l.Append(context.Background(), Record{Time: o.Now().UTC(), Op: "audit.recovered", Outcome: "ok",
			Detail: fmt.Sprintf("cut %d bytes of a line torn by a crash; it recorded no acknowledged call", torn)})
		if err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

// resume reads the last whole line to continue the chain from it.
func (l *Log) resume() (torn int64, err error) {
	fi, err := l.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("audit: %w", err)
	}
	size := fi.Size()
	l.size = size
	if size == 0 {
		l.publish(State{})
		return 0, nil
	}
	const chunk = 1 << 20
	start := max(0, size-chunk)
	buf := make([]byte, size-start)
	if _, err := l.f.ReadAt(buf, start); err != nil {
		return 0, fmt.Errorf("audit: reading %s: %w", l.f.Name(), err)
	}
	// What is wrong is found before anything is cut: a damaged log is left
	// as it is, for keyward audit verify and for whoever looks into it.
	end := bytes.LastIndexByte(buf, '\n')
	if end < 0 && start > 0 {
		return 0, fmt.Errorf("%w: %s ends in a line over %d bytes, longer than any record; run keyward audit verify on it", ErrDamaged, l.f.Name(), chunk)
	}
	torn = int64(len(buf) - end - 1) // a crash in the middle of a write, never acknowledged
	var last line
	var lines [][]byte
	if end >= 0 {
		lines = bytes.Split(buf[:end], []byte("\n"))
		if err := json.Unmarshal(lines[len(lines)-1], &last); err != nil || len(last.Hash) != 64 {
			return 0, fmt.Errorf("%w: the last line of %s does not parse; run keyward audit verify on it", ErrDamaged, l.f.Name())
		}
	}
	h, err := hex.DecodeString(last.Hash)
	if err != nil {
		return 0, fmt.Errorf("%w: the last line of %s has a hash that is not hex; run keyward audit verify on it", ErrDamaged, l.f.Name())
	}
	if torn > 0 {
		if err := l.f.Truncate(size - torn); err != nil {
			return 0, fmt.Errorf("audit: cutting a torn line: %w", err)
		}
		l.size = size - torn
	}
	if end < 0 {
		l.publish(State{})
		return torn, nil // the only line was torn: start afresh
	}
	l.seq = last.Seq
	copy(l.head[:], h)
	var body struct {
		StoreWrites uint64 `json:"store_writes"`
	}
	if json.Unmarshal(last.Body, &body) == nil {
		l.storeWrites = body.StoreWrites
	}
	// The last line is anyone's to write (the chain's hashes are not
	// keyed); the last checkpoint's count is MACed. The store must not be
	// behind either.
	// The tail's first line may be cut at the start of the MiB read: it is
	// left to lastCheckpoint to read whole, from before it.
	tail, from := lines, start
	if start > 0 {
		if cut := bytes.IndexByte(buf, '\n'); cut >= 0 && cut < end {
			from += int64(cut + 1)
			tail = bytes.Split(buf[cut+1:end], []byte("\n"))
		}
	}
	cp, err := l.lastCheckpoint(tail, from)
	if err != nil {
		return 0, err
	}
	l.storeWrites = max(l.storeWrites, cp.storeWrites)
	l.publish(State{Size: l.size, LastSeq: l.seq, LastCheckpointSeq: cp.seq, LastCheckpointTime: cp.time})
	return torn, nil
}

// lastCP is what resume learns of the log's last checkpoint.
type lastCP struct {
	storeWrites uint64    // its count of the store's writes
	seq         uint64    // its line; 0 if the log has none
	time        time.Time // the time of the record before it, if read with it
}

// lastCheckpoint returns the log's last checkpoint: its line, the time of
// the record before it, and the store's write count, after checking its
// MAC with the HSM (0 for a checkpoint written before keywardd recorded
// counts; all zero for a log with none). lines is
// the log's tail; when it holds no checkpoint, the file is read backwards
// from where it starts (end), a MiB at a time, until one is found: lines
// appended after it, however long, do not hide it. A checkpoint whose MAC
// is wrong is ErrDamaged.
func (l *Log) lastCheckpoint(lines [][]byte, end int64) (lastCP, error) {
	for {
		for i := len(lines) - 1; i >= 0; i-- {
			var ln line
			if json.Unmarshal(lines[i], &ln) != nil || ln.Kind != "checkpoint" {
				continue
			}
			n, err := l.checkCheckpoint(ln)
			cp := lastCP{storeWrites: n, seq: ln.Seq}
			var before struct {
				Body struct {
					Time time.Time `json:"time"`
				} `json:"body"`
			}
			if i > 0 && json.Unmarshal(lines[i-1], &before) == nil {
				cp.time = before.Body.Time
			}
			return cp, err
		}
		if end <= 0 {
			return lastCP{}, nil
		}
		start := max(0, end-(1<<20))
		buf := make([]byte, end-start)
		if _, err := l.f.ReadAt(buf, start); err != nil {
			return lastCP{}, fmt.Errorf("audit: reading %s: %w", l.f.Name(), err)
		}
		if start > 0 {
			// The first line read may be cut: it is read whole next time.
			cut := bytes.IndexByte(buf, '\n')
			if cut < 0 {
				return lastCP{}, fmt.Errorf("%w: %s holds a line over 1 MiB before its last checkpoint; run keyward audit verify on it", ErrDamaged, l.f.Name())
			}
			start += int64(cut + 1)
			buf = buf[cut+1:]
		}
		lines, end = bytes.Split(bytes.TrimSuffix(buf, []byte("\n")), []byte("\n")), start
	}
}

// checkCheckpoint checks a checkpoint line's MAC and returns its count.
func (l *Log) checkCheckpoint(ln line) (uint64, error) {
	var cp checkpoint
	prev, err1 := hex.DecodeString(ln.Prev)
	err2 := json.Unmarshal(ln.Body, &cp)
	got, err3 := hex.DecodeString(cp.MAC)
	id, err4 := parseKeyLabel(cp.Key)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil || len(prev) != 32 || id.Name != KeyName {
		return 0, fmt.Errorf("%w: the last checkpoint of %s (line %d) is malformed; run keyward audit verify on it", ErrDamaged, l.f.Name(), ln.Seq)
	}
	want, err := l.mac.HMACSHA256(context.Background(), id, macInput([32]byte(prev), ln.Seq, cp.StoreWrites))
	if err != nil {
		return 0, fmt.Errorf("audit: checking the last checkpoint of %s: %w", l.f.Name(), err)
	}
	if !hmac.Equal(got, want) {
		return 0, fmt.Errorf("%w: the MAC of the last checkpoint of %s (line %d) is wrong: the log was rewritten, or it was written with another HSM token; run keyward audit verify on it", ErrDamaged, l.f.Name(), ln.Seq)
	}
	if cp.StoreWrites == nil {
		return 0, nil
	}
	return *cp.StoreWrites, nil
}

// StoreWrites is the store's write count the log's last line recorded when
// it was opened (0 for a log written before keywardd recorded it).
func (l *Log) StoreWrites() uint64 { return l.storeWrites }

// SetStoreWrites gives the log the store's write count, to record in every
// line from now on.
func (l *Log) SetStoreWrites(fn func() uint64) { l.storeWritesFunc.Store(&fn) }

func (l *Log) currentStoreWrites() uint64 {
	if fn := l.storeWritesFunc.Load(); fn != nil {
		return (*fn)()
	}
	return l.storeWrites
}

// SetNotify sets a function called (on a goroutine of its own) whenever
// the log stops or starts again being writable: Err changed.
func (l *Log) SetNotify(fn func()) { l.notify.Store(&fn) }

func (l *Log) changed() {
	if fn := l.notify.Load(); fn != nil {
		go (*fn)()
	}
}

// Append writes the record of a call that was done, and returns once it
// is on disk. If the log cannot be written (or does not answer before ctx
// ends) it returns ErrUnavailable at once, and keeps doing so until a
// retry (every RetryEvery) writes again: no call may succeed unaudited. The
// record is then kept and written late, since the call it records was
// done.
func (l *Log) Append(ctx context.Context, r Record) error { return l.append(ctx, r, true) }

// AppendBefore writes the record of an act about to be done, which is not
// done unless AppendBefore succeeds: a record it cannot write is not kept.
func (l *Log) AppendBefore(ctx context.Context, r Record) error { return l.append(ctx, r, false) }

func (l *Log) append(ctx context.Context, r Record, keep bool) error {
	body, err := l.encode(r)
	if err != nil && !keep {
		// Only a time outside years 0-9999 cannot be encoded: the clock is
		// wrong, and the act is not done.
		return fmt.Errorf("%w: its record cannot be encoded: %v", ErrUnavailable, err)
	}
	if err != nil {
		body = l.encodeTimeless(r, err) // the call was done: it is recorded all the same
	}
	req := &request{rec: r, body: body, keep: keep, done: make(chan error, 1)}
	l.sendMu.RLock()
	if l.closed.Load() {
		l.sendMu.RUnlock()
		return fmt.Errorf("%w: it is closed", ErrUnavailable)
	}
	if err := l.Err(); err != nil {
		if keep {
			l.keepLate(r) // under sendMu: before Close's last write
		}
		l.sendMu.RUnlock()
		return err
	}
	// A place in the queue first, even if ctx has ended meanwhile.
	select {
	case l.reqs <- req:
	default:
		select {
		case l.reqs <- req:
		case <-ctx.Done():
			if keep {
				l.keepLate(r)
			}
			l.sendMu.RUnlock()
			return fmt.Errorf("%w: %v", ErrUnavailable, ctx.Err())
		}
	}
	l.sendMu.RUnlock()
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		// The record is queued and will be written; the call fails all
		// the same (more on record than answered is the safe side).
		return fmt.Errorf("%w: %v", ErrUnavailable, ctx.Err())
	}
}

// writer takes every request waiting, writes them with one write and one
// fsync, adds a checkpoint when one is due, and answers them.
func (l *Log) writer() {
	defer close(l.done)
	tick := time.NewTicker(l.opt.CheckpointInterval)
	defer tick.Stop()
	retry := time.NewTicker(l.opt.RetryEvery)
	defer retry.Stop()
	for {
		var batch []*request
		select {
		case r, ok := <-l.reqs:
			if !ok {
				l.retry()
				l.flush(nil, true)
				return
			}
			batch = append(batch, r)
		case <-tick.C:
			l.flush(nil, false)
			continue
		case <-retry.C:
			l.retry()
			continue
		}
	more:
		for len(batch) < 4096 {
			select {
			case r, ok := <-l.reqs:
				if !ok {
					break more
				}
				batch = append(batch, r)
			default:
				break more
			}
		}
		l.flush(batch, false)
	}
}

// flush writes batch (and a checkpoint if due or forced) and answers it;
// records kept late while the log did not answer in time go first.
func (l *Log) flush(batch []*request, forceCheckpoint bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.broken
	if err == nil {
		late, lost := l.takeLate()
		var bodies [][]byte
		if len(late) > 0 || lost > 0 {
			bodies = l.encodeAll(append([]Record{lateRecord(l.opt.Now(), "the audit log did not answer in time", late, lost)}, late...))
		}
		for _, r := range batch {
			bodies = append(bodies, r.body)
		}
		if err = l.write(bodies, forceCheckpoint); err != nil {
			l.putBackLate(late, lost)
			// The cause without the file's path: callers' answers carry it.
			cause := "the disk refused the write"
			var errno syscall.Errno
			if errors.As(err, &errno) {
				cause = errno.Error()
			}
			l.outage = outage{since: l.opt.Now(), cause: cause}
			l.broken = fmt.Errorf("%w (%s); keywardd tries again every %s", ErrUnavailable, cause, l.opt.RetryEvery)
			l.failed.Store(&l.broken)
			l.changed()
			err = l.broken
		}
	}
	if err != nil {
		for _, r := range batch {
			if r.keep {
				l.keepLate(r.rec)
			}
		}
	}
	for _, r := range batch {
		r.done <- err
	}
}

// maxField is the longest string a record keeps of a field: a caller's
// key name or a refusal's message can be as long as a request (8 MiB), and
// a line longer than the tail keywardd reads at start would stop it.
const maxField = 1024

// capped returns r with every string field cut to maxField bytes (saying
// how much was cut).
func capped(r Record) Record {
	c := func(s *string) {
		if len(*s) > maxField {
			*s = strings.ToValidUTF8((*s)[:maxField], "") + fmt.Sprintf("...(%d bytes more)", len(*s)-maxField)
		}
	}
	for _, f := range []*string{&r.Caller.Exe, &r.Caller.SHA256, &r.Caller.Cgroup, &r.Op, &r.Key, &r.ContextSHA256, &r.Outcome, &r.Code, &r.Detail, &r.APIKey, &r.Result} {
		c(f)
	}
	if len(r.Batch) > 0 {
		r.Batch = slices.Clone(r.Batch)
		for i := range r.Batch {
			for _, f := range []*string{&r.Batch[i].Key, &r.Batch[i].ContextSHA256, &r.Batch[i].Outcome, &r.Batch[i].Code, &r.Batch[i].Detail} {
				c(f)
			}
		}
	}
	return r
}

// keepLate keeps the record of a call the log could not record in time.
func (l *Log) keepLate(r Record) {
	l.lateMu.Lock()
	defer l.lateMu.Unlock()
	if len(l.late) < maxLate {
		l.late = append(l.late, r)
	} else {
		l.lost++
	}
}

// takeLate takes the records kept late, in order.
func (l *Log) takeLate() ([]Record, int) {
	l.lateMu.Lock()
	defer l.lateMu.Unlock()
	late, lost := l.late, l.lost
	l.late, l.lost = nil, 0
	return late, lost
}

// putBackLate puts back records taken that could not be written, before
// any kept since.
func (l *Log) putBackLate(late []Record, lost int) {
	l.lateMu.Lock()
	defer l.lateMu.Unlock()
	l.late = append(late, l.late...)
	if over := len(l.late) - maxLate; over > 0 {
		l.late, lost = l.late[:maxLate], lost+over
	}
	l.lost += lost
}

// lateRecord is the record that comes before records written late.
func lateRecord(now time.Time, why string, late []Record, lost int) Record {
	detail := why
	if len(late) > 0 {
		detail += fmt.Sprintf("; the %d records that follow are of calls that were done but answered UNAVAILABLE, written late", len(late))
	}
	if lost > 0 {
		detail += fmt.Sprintf("; %d more such records were not kept", lost)
	}
	op := "audit.late"
	if strings.HasPrefix(why, "the audit log could not be written") {
		op = "audit.outage"
	}
	return Record{Time: now.UTC(), Op: op, Outcome: "ok", Detail: detail}
}

// retry tries to write again after a failed write: it cuts whatever the
// failed write left after the last line that reached the disk, then writes
// a record of the outage, the records kept meanwhile, and a checkpoint. If
// that reaches the disk the log serves again.
func (l *Log) retry() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.broken == nil {
		return
	}
	if err := l.f.Truncate(l.size); err != nil {
		return
	}
	o := l.outage
	late, lost := l.takeLate()
	why := fmt.Sprintf("the audit log could not be written from %s until now (%s): keywardd refused every call meanwhile", o.since.UTC().Format(time.RFC3339Nano), o.cause)
	if err := l.write(l.encodeAll(append([]Record{lateRecord(l.opt.Now(), why, late, lost)}, late...)), true); err != nil {
		l.putBackLate(late, lost)
		return
	}
	l.broken, l.outage = nil, outage{}
	l.failed.Store(nil)
	l.changed()
}

// encodeAll encodes records the writer writes itself (of an outage, and
// those kept late). One that cannot be encoded (a clock outside years
// 0-9999) is written without its time, rather than not at all.
func (l *Log) encodeAll(recs []Record) [][]byte {
	out := make([][]byte, len(recs))
	for i, r := range recs {
		b, err := l.encode(r)
		if err != nil {
			b = l.encodeTimeless(r, err)
		}
		out[i] = b
	}
	return out
}

// encodeTimeless encodes a record whose time could not be (err): without
// its time, saying why in its detail.
func (l *Log) encodeTimeless(r Record, err error) []byte {
	r.Time = time.Time{}
	r.Detail += fmt.Sprintf(" (its time could not be written: %v)", err)
	b, _ := l.encode(r)
	return b
}

// write chains bodies (encoded records), adds a checkpoint when one is
// due, and writes and syncs them with one write and one fsync.
func (l *Log) write(bodies [][]byte, forceCheckpoint bool) error {
	buf := l.buf[:0]
	seq, head, since := l.seq, l.head, l.since
	storeWrites := l.currentStoreWrites()
	add := func(kind string, body []byte) {
		seq++
		prev := head
		head = lineHash(prev, seq, kind, body)
		buf = appendLine(buf, seq, prev, kind, body, head)
	}
	// checkpoint MACs the head of the chain. One the HSM cannot MAC now
	// (it is away) is made later: the records are chained and on disk all
	// the same, and the next checkpoint covers them. Only a failed write
	// stops the log.
	checkpointed, cpSeq := false, uint64(0)
	checkpoint := func() error {
		mac, err := l.mac.HMACSHA256(context.Background(), l.key, macInput(head, seq+1, &storeWrites))
		if err != nil {
			l.macErr.Store(&err)
			return nil
		}
		l.macErr.Store(nil)
		b, err := json.Marshal(checkpoint{Key: keyLabel(l.key), MAC: hex.EncodeToString(mac), StoreWrites: &storeWrites})
		if err != nil {
			return err
		}
		add("checkpoint", b)
		since, checkpointed, cpSeq = 0, true, seq
		return nil
	}
	var body []byte
	for _, b := range bodies {
		body = withStoreWrites(body[:0], b, storeWrites)
		add("record", body)
		if since++; since >= l.opt.CheckpointEvery {
			if err := checkpoint(); err != nil {
				return err
			}
		}
	}
	if since > 0 && (forceCheckpoint || time.Since(l.lastCP) >= l.opt.CheckpointInterval) {
		if err := checkpoint(); err != nil {
			return err
		}
	}
	if cap(buf) <= 1<<20 {
		l.buf = buf // kept for the next batch, unless a rare one grew it past a MiB
	}
	if len(buf) == 0 {
		return nil
	}
	if _, err := l.f.Write(buf); err != nil {
		return err
	}
	if err := l.f.Sync(); err != nil {
		return err
	}
	l.seq, l.head, l.since = seq, head, since
	l.size += int64(len(buf))
	st := *l.state.Load()
	st.Size, st.LastSeq = l.size, seq
	if checkpointed {
		l.lastCP = time.Now()
		st.LastCheckpointSeq, st.LastCheckpointTime = cpSeq, l.opt.Now().UTC()
	}
	l.publish(st)
	return nil
}

// State is what the log knows of itself without reading its file, as the
// last write that reached the disk left it.
type State struct {
	// Path is the log's file.
	Path string
	// Size is the length of the file the writer has written and synced:
	// whole lines, all of them acknowledged. Bytes past it may be a write
	// in progress, or what a failed write left before it is cut.
	Size int64
	// LastSeq is the last line's sequence number (0 for an empty log).
	LastSeq uint64
	// LastCheckpointSeq is the line of the last checkpoint (0 if none);
	// LastCheckpointTime is when it was written (by the log's clock) or,
	// for one written before the log was opened (checkpoints hold no
	// time), the time of the record before it; zero if unknown.
	LastCheckpointSeq  uint64
	LastCheckpointTime time.Time
}

// State is the log's state now, without waiting for a write in progress.
func (l *Log) State() State { return *l.state.Load() }

func (l *Log) publish(st State) {
	st.Path = l.f.Name()
	l.state.Store(&st)
}

// appendLine appends a line's JSON to dst: the bytes json.Marshal writes
// for line{Seq: seq, Prev: hex(prev), Kind: kind, Body: body, Hash:
// hex(hash)} and a newline, body being compact JSON (TestAppendLine holds
// them equal), without json.Marshal's reflection and its compacting again
// of what is compact already.
func appendLine(dst []byte, seq uint64, prev [32]byte, kind string, body []byte, hash [32]byte) []byte {
	dst = append(dst, `{"seq":`...)
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, `,"prev":"`...)
	dst = hex.AppendEncode(dst, prev[:])
	dst = append(dst, `","kind":"`...)
	dst = append(dst, kind...)
	dst = append(dst, `","body":`...)
	dst = append(dst, body...)
	dst = append(dst, `,"hash":"`...)
	dst = hex.AppendEncode(dst, hash[:])
	return append(dst, "\"}\n"...)
}

func keyLabel(k hsm.KeyID) string { return fmt.Sprintf("%s v%d", k.Name, k.Version) }

// lineHash chains a line to the one before it.
func lineHash(prev [32]byte, seq uint64, kind string, body []byte) [32]byte {
	var head [len(lineDomain) + 32 + 8 + len("checkpoint\x00")]byte
	b := append(append(head[:0], lineDomain...), prev[:]...)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = append(append(b, kind...), 0)
	h := sha256.New()
	h.Write(b)
	h.Write(body)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

const lineDomain = "keyward audit line v1\x00"

// macInput is what a checkpoint at seq MACs: the head of the chain before
// it, and (version 2) the store's write count.
func macInput(head [32]byte, seq uint64, storeWrites *uint64) []byte {
	if storeWrites == nil {
		b := append([]byte("keyward audit checkpoint v1\x00"), head[:]...)
		return binary.BigEndian.AppendUint64(b, seq)
	}
	b := append([]byte("keyward audit checkpoint v2\x00"), head[:]...)
	b = binary.BigEndian.AppendUint64(b, seq)
	return binary.BigEndian.AppendUint64(b, *storeWrites)
}

// Err says why the log cannot be written, or nil. It does not wait for a
// write in progress.
func (l *Log) Err() error {
	if p := l.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// CheckpointErr says why the last checkpoint due could not be MACed (the
// HSM was unreachable), or nil. Records since are chained but not MACed
// until the HSM is back.
func (l *Log) CheckpointErr() error {
	if p := l.macErr.Load(); p != nil {
		return *p
	}
	return nil
}

// Close writes a last checkpoint and closes the file. If the log still
// cannot be written, the records kept late are lost, and Close says how
// many.
func (l *Log) Close() error {
	if l.closed.Swap(true) {
		return nil
	}
	l.sendMu.Lock()
	close(l.reqs)
	l.sendMu.Unlock()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.f.Close()
	if l.broken != nil {
		late, lost := l.takeLate()
		if n := len(late) + lost; n > 0 {
			return fmt.Errorf("%w; the records of %d calls that were done could not be written and are lost", l.broken, n)
		}
		return l.broken
	}
	return err
}

// Report is what Verify found.
type Report struct {
	Lines       uint64 // lines read
	Records     uint64
	Checkpoints uint64
	// Unverified counts the records after the last checkpoint: chained, but
	// not yet MACed (or all records, when no MAC key was given).
	Unverified uint64
	// BadLine is the number (from 1) of the first line that fails, with
	// Problem saying why; 0 if every line holds.
	BadLine uint64
	Problem string
	// TailTooLong: with a MAC key, more records follow the last checkpoint
	// than keywardd ever leaves (MaxTail): the log was cut or rewritten at
	// its end, or the HSM could not MAC for a long time. Problem says so.
	TailTooLong bool
}

// MaxTail is the most records keywardd writes without a checkpoint while
// its HSM can MAC: a checkpoint follows every 256 records.
const MaxTail = 256

// KeyName is the name of the HMAC key that MACs keywardd's checkpoints.
const KeyName = "keyward-audit"

// Verify reads a log and checks every line's chain link and, given a MACer,
// every checkpoint's MAC. Every line must be the exact bytes keywardd
// writes (appendLine's): JSON readers differ on a line with a key repeated,
// in other case or added, so what one shows might not be what the hash
// covers. It stops at the first line that fails.
//
// It reads r to its end: ctx's end stops it (with ctx's error), and so
// does an error of r's, which is returned rather than taken for a bad line.
func Verify(ctx context.Context, r io.Reader, mac MACer) (Report, error) {
	var rep Report
	src := &ctxReader{ctx: ctx, r: r}
	sc := bufio.NewScanner(src)
	sc.Buffer(make([]byte, 64<<10), maxLine+1)
	sc.Split(splitLines)
	var head [32]byte
	var storeWrites uint64
	fail := func(format string, a ...any) (Report, error) {
		rep.BadLine = rep.Lines
		rep.Problem = fmt.Sprintf(format, a...)
		return rep, nil
	}
	for {
		if !sc.Scan() {
			if src.err != nil {
				return rep, fmt.Errorf("audit: reading line %d: %w", rep.Lines+1, src.err)
			}
			if sc.Err() != nil {
				rep.Lines++
				return fail("%v", errLongLine)
			}
			if mac != nil && rep.Unverified > MaxTail {
				rep.TailTooLong = true
				rep.Problem = fmt.Sprintf("the last %d records follow no checkpoint, more than keywardd leaves (%d) while its HSM works: the end of the log was cut or rewritten, or the HSM could not MAC for a long time", rep.Unverified, MaxTail)
			}
			return rep, nil
		}
		text := sc.Bytes()
		rep.Lines++
		var ln line
		if err := json.Unmarshal(text, &ln); err != nil {
			return fail("not a JSON line: %v", err)
		}
		if ln.Seq != rep.Lines {
			return fail("sequence number %d where %d belongs: a line was removed, added or moved", ln.Seq, rep.Lines)
		}
		if ln.Prev != hex.EncodeToString(head[:]) {
			return fail("does not link to the line before it")
		}
		if ln.Kind == KindFiltered {
			return fail("a stub of a record a sink filtered out, which only what a sink shipped holds: a record of the local log was replaced (for what a receiver got, use keyward audit verify -received)")
		}
		want := lineHash(head, ln.Seq, ln.Kind, ln.Body)
		if ln.Hash != hex.EncodeToString(want[:]) {
			return fail("its hash does not match its content: the line was changed")
		}
		if !canonical(text, ln.Seq, head, ln.Kind, ln.Body, want) {
			return fail("%s", errNotCanonical)
		}
		var counted struct {
			StoreWrites uint64 `json:"store_writes"`
		}
		json.Unmarshal(ln.Body, &counted)
		if w := counted.StoreWrites; w > 0 {
			if w < storeWrites {
				return fail("the store's write count goes down, from %d to %d, which keywardd never writes: lines were added by someone else", storeWrites, w)
			}
			storeWrites = w
		}
		switch ln.Kind {
		case "record":
			var rec Record
			if err := json.Unmarshal(ln.Body, &rec); err != nil {
				return fail("a record that does not parse")
			}
			rep.Records++
			rep.Unverified++
		case "checkpoint":
			var cp checkpoint
			if err := json.Unmarshal(ln.Body, &cp); err != nil {
				return fail("a checkpoint that does not parse")
			}
			if mac != nil {
				id, err := parseKeyLabel(cp.Key)
				if err != nil || id.Name != KeyName {
					return fail("a checkpoint names no key, or another key than %s", KeyName)
				}
				got, err := hex.DecodeString(cp.MAC)
				if err != nil {
					return fail("a checkpoint with a bad MAC")
				}
				want, err := mac.HMACSHA256(ctx, id, macInput(head, ln.Seq, cp.StoreWrites))
				if err != nil {
					return rep, fmt.Errorf("audit: computing the MAC of line %d: %w", rep.Lines, err)
				}
				if !hmac.Equal(got, want) {
					return fail("the checkpoint's MAC is wrong: the chain before it was rewritten")
				}
				rep.Unverified = 0
			}
			rep.Checkpoints++
		default:
			return fail("unknown line kind %q", ln.Kind)
		}
		head = want
	}
}

// splitLines is bufio.ScanLines without its dropping of a '\r' before the
// newline: a line must be keywardd's bytes, and it writes no '\r'.
func splitLines(data []byte, atEOF bool) (advance int, token []byte, err error) {
	if i := bytes.IndexByte(data, '\n'); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// ctxReader reads r until ctx ends, and keeps the error r returned (other
// than io.EOF).
type ctxReader struct {
	ctx context.Context
	r   io.Reader
	err error
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		c.err = err
		return 0, err
	}
	n, err := c.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		c.err = err
	}
	return n, err
}

// Verify checks the log as it stands now with the log's own MACer: every
// line written and synced when it was called (State.Size), none written
// since, so that a record being appended is never taken for a torn line.
// It reads the whole file; one verification runs at a time, and another
// waits for it, or for its ctx to end. size is the length it verified.
func (l *Log) Verify(ctx context.Context) (rep Report, size int64, err error) {
	select {
	case l.verifying <- struct{}{}:
		defer func() { <-l.verifying }()
	case <-ctx.Done():
		return Report{}, 0, fmt.Errorf("audit: waiting for another verification of the log: %w", ctx.Err())
	}
	size = l.State().Size
	rep, err = Verify(ctx, io.NewSectionReader(l.f, 0, size), l.mac)
	return rep, size, err
}

func parseKeyLabel(s string) (hsm.KeyID, error) {
	var id hsm.KeyID
	_, err := fmt.Sscanf(s, "%s v%d", &id.Name, &id.Version)
	if err == nil {
		err = id.Check()
	}
	return id, err
}

// Records reads a log's records, in order, and hands each to fn (an error
// from fn stops the reading and is returned). It does not check the chain
// or the checkpoints: run Verify first, or keyward audit verify, before
// trusting what it reads. A line that is not a record is an error naming
// its number; checkpoints are passed over.
func Records(r io.Reader, fn func(Record) error) error {
	dec := json.NewDecoder(r)
	for n := 1; ; n++ {
		var ln line
		err := dec.Decode(&ln)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("audit: line %d is not a JSON line: %w", n, err)
		}
		if ln.Kind != "record" {
			continue
		}
		var rec Record
		if err := json.Unmarshal(ln.Body, &rec); err != nil {
			return fmt.Errorf("audit: line %d: its record does not parse: %w", n, err)
		}
		if err := fn(rec); err != nil {
			return err
		}
	}
}

// ContextDigest is the hex SHA-256 of a canonical encryption context, for
// Record.ContextSHA256.
func ContextDigest(canonical []byte) string {
	s := sha256.Sum256(canonical)
	return hex.EncodeToString(s[:])
}
