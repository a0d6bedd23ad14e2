package audit

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
	"time"
)

// ErrInvalid: a query List cannot run (a bad glob, outcome or page
// token); the message says which.
var ErrInvalid = errors.New("audit: invalid query")

// The bounds of one List call.
const (
	// DefaultPageSize is the records a page holds when the query names no
	// size; MaxPageSize is the most it may name.
	DefaultPageSize = 100
	MaxPageSize     = 1000
	// MaxScan is the most bytes of the log one call reads, about 40 000
	// records, which takes a third of a second of one core
	// (BenchmarkList/no-match: 50 to 70 MB/s, JSON decoding): a query whose
	// records are rare, or that starts far from the end, stops there and
	// says so (Page.ScanLimited), with a token to go on from.
	MaxScan = 16 << 20
	// maxPageBytes bounds the records' bytes in one page, so that a page
	// of large batch records fits in a gRPC message.
	maxPageBytes = 3 << 20
	// lateWindow is how far back, in lines, a block of records written
	// late can start before its first record (maxLate records, and a
	// checkpoint after each if checkpoints are that frequent).
	lateWindow = 2*maxLate + 2
)

// Query selects records of a log for List. Zero fields select everything.
type Query struct {
	// Since and Until bound the records' times: Since <= time < Until.
	// The scan stops at the first record older than Since (having looked
	// past a block of records written late, whose times are their calls'),
	// so a clock set back while keywardd ran can hide what was before it:
	// list without Since to see across it.
	Since, Until time.Time
	// Op is the operation: exact ("APIKeyService.CreateAPIKey"), a glob
	// (path.Match: "APIKeyService.*", "keywardd.*"), or a prefix ending in
	// "." ("APIKeyService.").
	Op string
	// Outcome is "ok", "denied" or "error".
	Outcome string
	// UID, if set, is the caller's uid.
	UID *uint32
	// Subject is a glob (path.Match), or an exact name, over what the
	// record is about: its key, its API key's ID, or a batch item's key.
	Subject string
	// PageSize is the most records returned: 0 is DefaultPageSize, and
	// more than MaxPageSize is ErrInvalid.
	PageSize int
	// PageToken is the previous page's NextPageToken; empty for the first
	// page (the newest records). Give the same filters with it.
	PageToken string
	// MaxScan bounds the bytes read; 0 is MaxScan.
	MaxScan int64
}

// Entry is a record and the number of its line in the log.
type Entry struct {
	Seq uint64
	Record
}

// Page is what List found.
type Page struct {
	// Records are the records selected, newest (highest Seq) first.
	Records []Entry
	// NextPageToken goes on below the last line read; empty when the log's
	// start, or Since, was reached.
	NextPageToken string
	// ScanLimited: the call stopped at Query.MaxScan before its page was
	// full; NextPageToken goes on from there.
	ScanLimited bool
	// Scanned is the bytes read.
	Scanned int64
}

// List reads the records of the log in r's bytes [0, size), newest first,
// from the end (or the page token) backward, and returns those Query
// selects: until the page is full, Since is reached, the start of the
// log, or MaxScan bytes were read. Only whole lines are read: the bytes
// past the last '\n' before size are left alone (a write in progress).
// It checks neither the chain nor the MACs (Verify does), but refuses, as
// ErrDamaged, a line that does not parse or whose sequence number does not
// follow the line before it.
func List(ctx context.Context, r io.ReaderAt, size int64, q Query) (Page, error) {
	m, err := newMatcher(q)
	if err != nil {
		return Page{}, err
	}
	limit := q.PageSize
	switch {
	case limit == 0:
		limit = DefaultPageSize
	case limit < 0 || limit > MaxPageSize:
		return Page{}, fmt.Errorf("%w: a page holds 1 to %d records, not %d", ErrInvalid, MaxPageSize, limit)
	}
	maxScan := q.MaxScan
	if maxScan <= 0 {
		maxScan = MaxScan
	}
	// next is the number the next line read must have, once known.
	end, next, known := size, uint64(0), false
	if q.PageToken != "" {
		c, err := parseCursor(q.PageToken)
		if err != nil {
			return Page{}, err
		}
		if end, next, known = c.end, c.seq-1, true; !c.valid(r, size) {
			return Page{}, fmt.Errorf("%w: the page token does not point into this audit log (%d bytes): start again without it", ErrInvalid, size)
		}
	}
	var page Page
	br := newBackward(r, end)
	// lateFrom: the lines after this offset may be records written late,
	// whose times are before Since; -1 when none are known to be.
	var pageBytes int
	var probed int64 // bytes read looking for a block written late
	lateFrom := int64(-1)
	for n := 0; ; n++ {
		if n%256 == 0 {
			if err := ctx.Err(); err != nil {
				return Page{}, fmt.Errorf("audit: listing: %w", err)
			}
		}
		text, off, err := br.prev()
		page.Scanned = br.read + probed
		if errors.Is(err, io.EOF) {
			return page, nil
		}
		if err != nil {
			return Page{}, err
		}
		ln, err := parseLine(text, off)
		if err == nil && known && ln.Seq != next {
			err = fmt.Errorf("%w: the line at byte %d is numbered %d where %d belongs; VerifyAuditLog (keyward audit verify) names the first line that fails", ErrDamaged, off, ln.Seq, next)
		}
		if err != nil {
			if q.PageToken != "" && n == 0 {
				return Page{}, fmt.Errorf("%w: the page token does not match this audit log: start again without it", ErrInvalid)
			}
			return Page{}, err
		}
		next, known = ln.Seq-1, true
		here := cursor{end: off, seq: ln.Seq}
		if ln.rec != nil {
			rec := *ln.rec
			if off <= lateFrom {
				lateFrom = -1 // past the block written late: older records are older
			}
			if !q.Since.IsZero() && rec.Time.Before(q.Since) && lateFrom < 0 {
				marker, read, err := lateMarker(r, off, maxScan-page.Scanned)
				probed += read
				page.Scanned += read
				switch {
				case err != nil:
					return Page{}, err
				case marker < 0 && page.Scanned >= maxScan:
					page.ScanLimited, page.NextPageToken = true, here.token()
					return page, nil
				case marker < 0:
					return page, nil // Since is reached
				}
				lateFrom = marker
			}
			if m.match(&rec) {
				page.Records = append(page.Records, Entry{Seq: ln.Seq, Record: rec})
				pageBytes += len(text)
				if len(page.Records) == limit || pageBytes >= maxPageBytes {
					page.NextPageToken = here.token()
					return page, nil
				}
			}
		}
		if page.Scanned >= maxScan {
			page.ScanLimited, page.NextPageToken = true, here.token()
			return page, nil
		}
	}
}

// parsedLine is what List reads of a line: its seq, and its record if
// it is one. The body is decoded as a record whatever the line's kind, in
// the one pass over the line (a checkpoint's fills a few fields, unused).
type parsedLine struct {
	Seq  uint64 `json:"seq"`
	Kind string `json:"kind"`
	Body Record `json:"body"`
	rec  *Record
}

// parseLine parses the line at off.
func parseLine(text []byte, off int64) (parsedLine, error) {
	var ln parsedLine
	if err := json.Unmarshal(text, &ln); err != nil || ln.Seq == 0 {
		return ln, fmt.Errorf("%w: the line at byte %d does not parse; VerifyAuditLog (keyward audit verify) names the first line that fails", ErrDamaged, off)
	}
	if ln.Kind == "record" {
		ln.rec = &ln.Body
	}
	return ln, nil
}

// The operations of the records that come before records written late
// (lateRecord), as they stand in a line: a string in a record's other
// fields has its quotes escaped, so these bytes are only ever its op.
var lateOps = [][]byte{[]byte(`"op":"audit.late"`), []byte(`"op":"audit.outage"`)}

// lateMarker looks back from the line at end, at most lateWindow lines
// and budget bytes, for a record that precedes records written late,
// and returns the offset of its line, or -1, and the bytes it read.
func lateMarker(r io.ReaderAt, end, budget int64) (int64, int64, error) {
	br := newBackward(r, end)
	for range lateWindow {
		if br.read >= budget {
			break
		}
		text, off, err := br.prev()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return -1, br.read, err
		}
		if !slices.ContainsFunc(lateOps, func(op []byte) bool { return bytes.Contains(text, op) }) {
			continue
		}
		if ln, err := parseLine(text, off); err == nil && ln.rec != nil && strings.HasPrefix(ln.rec.Op, "audit.") {
			return off, br.read, nil
		}
	}
	return -1, br.read, nil
}

// matcher is a Query's filters, checked.
type matcher struct {
	q  Query
	op string // a glob
}

// MaxGlob is the longest operation or subject pattern a query takes.
const MaxGlob = 256

func newMatcher(q Query) (*matcher, error) {
	m := &matcher{q: q, op: q.Op}
	if strings.HasSuffix(m.op, ".") {
		m.op += "*"
	}
	for _, g := range []struct{ name, glob string }{{"operation", m.op}, {"subject", q.Subject}} {
		// path.Match reads a whole [...] class at each character it tries:
		// a long pattern costs seconds a record.
		if len(g.glob) > MaxGlob {
			return nil, fmt.Errorf("%w: the %s is %d bytes; at most %d (names are at most 128)", ErrInvalid, g.name, len(g.glob), MaxGlob)
		}
		if _, err := path.Match(g.glob, ""); err != nil {
			return nil, fmt.Errorf("%w: the %s %q is not a glob (path.Match: *, ?, [a-z], \\ to escape)", ErrInvalid, g.name, g.glob)
		}
	}
	switch q.Outcome {
	case "", "ok", "denied", "error":
	default:
		return nil, fmt.Errorf("%w: the outcome %q is none of ok, denied, error", ErrInvalid, q.Outcome)
	}
	if !q.Since.IsZero() && !q.Until.IsZero() && !q.Since.Before(q.Until) {
		return nil, fmt.Errorf("%w: since (%s) is not before until (%s)", ErrInvalid, q.Since.Format(time.RFC3339Nano), q.Until.Format(time.RFC3339Nano))
	}
	return m, nil
}

func (m *matcher) match(r *Record) bool {
	q := m.q
	switch {
	case !q.Since.IsZero() && r.Time.Before(q.Since), !q.Until.IsZero() && !r.Time.Before(q.Until):
		return false
	case q.Outcome != "" && r.Outcome != q.Outcome:
		return false
	case q.UID != nil && r.Caller.UID != *q.UID:
		return false
	case m.op != "" && !glob(m.op, r.Op):
		return false
	case q.Subject != "":
		return glob(q.Subject, r.Key) || glob(q.Subject, r.APIKey) ||
			slices.ContainsFunc(r.Batch, func(it Item) bool { return glob(q.Subject, it.Key) })
	}
	return true
}

func glob(pattern, s string) bool {
	ok, _ := path.Match(pattern, s)
	return ok
}

// cursor is where a listing goes on: below the line numbered seq, which
// starts at byte end.
type cursor struct {
	end int64
	seq uint64
}

// token is the cursor as a page token: opaque to callers, who hand it
// back as it is. A cursor at the log's start has nothing below it.
func (c cursor) token() string {
	if c.end <= 0 || c.seq <= 1 {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "%d.%d", c.end, c.seq))
}

func parseCursor(tok string) (cursor, error) {
	var c cursor
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err == nil {
		var rest string
		if n, _ := fmt.Sscanf(string(b), "%d.%d%s", &c.end, &c.seq, &rest); n != 2 {
			err = errors.New("bad")
		}
	}
	if err != nil || c.end <= 0 || c.seq <= 1 {
		return cursor{}, fmt.Errorf("%w: the page token is not one ListAuditRecords gave: pass next_page_token as it is", ErrInvalid)
	}
	return c, nil
}

// valid says whether c points at the start of a line of r's bytes [0,
// size).
func (c cursor) valid(r io.ReaderAt, size int64) bool {
	if c.end > size {
		return false
	}
	var b [1]byte
	_, err := r.ReadAt(b[:], c.end-1)
	return err == nil && b[0] == '\n'
}

// List reads the log as it stands now (State.Size: whole lines, every one
// acknowledged): List over the log's file.
func (l *Log) List(ctx context.Context, q Query) (Page, error) {
	return List(ctx, l.f, l.State().Size, q)
}
