package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBackward: the lines backward hands out, at every chunk size, are
// the file's whole lines, last first, with their offsets; a line not yet
// whole at the end is never one of them.
func TestBackward(t *testing.T) {
	for _, tc := range []struct {
		name string
		data string
		want []string
	}{
		{"empty", "", nil},
		{"one line", "a\n", []string{"a"}},
		{"a line not yet whole", "partial", nil},
		{"lines and a torn end", "a\nbb\nccc\ntor", []string{"ccc", "bb", "a"}},
		{"empty lines", "\n\nx\n\n", []string{"", "x", "", ""}},
		{"long lines", strings.Repeat("x", 300) + "\n" + strings.Repeat("y", 70) + "\n", []string{strings.Repeat("y", 70), strings.Repeat("x", 300)}},
	} {
		for _, chunk := range []int{1, 2, 7, 64, backChunk} {
			t.Run(fmt.Sprintf("%s/chunk=%d", tc.name, chunk), func(t *testing.T) {
				got, offs, err := readBackward(strings.NewReader(tc.data), int64(len(tc.data)), chunk)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, tc.want) {
					t.Fatalf("lines %q; want %q", got, tc.want)
				}
				for i, off := range offs {
					if !strings.HasPrefix(tc.data[off:], got[i]+"\n") || (off > 0 && tc.data[off-1] != '\n') {
						t.Fatalf("line %q at offset %d, which holds %q", got[i], off, tc.data[off:])
					}
				}
			})
		}
	}
}

// TestBackwardLongLine: a line over maxLine is ErrDamaged, not buffered.
func TestBackwardLongLine(t *testing.T) {
	data := "ok\n" + strings.Repeat("x", maxLine+10) + "\n"
	_, _, err := readBackward(strings.NewReader(data), int64(len(data)), backChunk)
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "over 1 MiB") {
		t.Fatalf("got %v; want ErrDamaged, a line over 1 MiB", err)
	}
}

// readBackward is every line backward hands out from r's bytes [0, end),
// with their offsets.
func readBackward(r io.ReaderAt, end int64, chunk int) ([]string, []int64, error) {
	b := newBackward(r, end)
	b.chunk = chunk
	var lines []string
	var offs []int64
	for {
		line, off, err := b.prev()
		if errors.Is(err, io.EOF) {
			return lines, offs, nil
		}
		if err != nil {
			return lines, offs, err
		}
		lines, offs = append(lines, string(line)), append(offs, off)
	}
}

// FuzzBackward: whatever the bytes and the chunk size, backward hands out
// the lines a forward read finds (each '\n'-terminated line, what follows
// the last '\n' dropped), in reverse, each at its offset, having read no
// more than the file.
func FuzzBackward(f *testing.F) {
	f.Add([]byte("a\nbb\nccc\n"), uint16(2))
	f.Add([]byte("no newline at all"), uint16(1))
	f.Add([]byte("\n\n\n"), uint16(3))
	f.Add([]byte(`{"seq":1,"kind":"record","body":{}}`+"\n"+`{"seq":2,"kind":"chec`), uint16(16))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint16) {
		b := newBackward(bytes.NewReader(data), int64(len(data)))
		b.chunk = int(chunk%512) + 1
		var want []string
		if i := bytes.LastIndexByte(data, '\n'); i >= 0 {
			for _, l := range bytes.Split(data[:i], []byte("\n")) {
				want = append(want, string(l))
			}
		}
		for i := len(want) - 1; i >= 0; i-- {
			line, off, err := b.prev()
			if err != nil {
				t.Fatalf("line %d of %d: %v", i, len(want), err)
			}
			if string(line) != want[i] || !bytes.HasPrefix(data[off:], append(line, '\n')) {
				t.Fatalf("line %d: %q at %d; want %q", i, line, off, want[i])
			}
		}
		if _, _, err := b.prev(); !errors.Is(err, io.EOF) {
			t.Fatalf("after every line: %v", err)
		}
		if b.read > int64(len(data)) {
			t.Fatalf("read %d bytes of %d", b.read, len(data))
		}
	})
}

// traffic is known calls, in order, one every second from t0.
var t0 = time.Unix(1700000000, 0).UTC()

func traffic() []Record {
	mk := func(i int, uid uint32, op, key, apiKey, outcome string) Record {
		r := Record{Time: t0.Add(time.Duration(i) * time.Second), Caller: Caller{UID: uid, GID: uid, PID: 100 + i, Exe: "/usr/bin/app"},
			Op: op, Key: key, APIKey: apiKey, Outcome: outcome}
		if outcome != "ok" {
			r.Code, r.Detail = "PermissionDenied", "not granted "+op
		}
		return r
	}
	var recs []Record
	for i := range 60 {
		switch i % 6 {
		case 0:
			recs = append(recs, mk(i, 1000, "EnvelopeService.Decrypt", "orders", "", "ok"))
		case 1:
			recs = append(recs, mk(i, 2000, "EnvelopeService.Decrypt", "orders-eu", "", "denied"))
		case 2:
			recs = append(recs, mk(i, 1000, "APIKeyService.CreateAPIKey", "shop", fmt.Sprintf("ak_%02d", i), "ok"))
		case 3:
			recs = append(recs, mk(i, 3000, "APIKeyService.VerifyAPIKey", "", fmt.Sprintf("ak_%02d", i-1), "error"))
		case 4:
			r := mk(i, 1000, "EnvelopeService.BatchDecrypt", "", "", "ok")
			r.Batch = []Item{{Key: "billing", Outcome: "ok"}, {Key: "hr", Outcome: "error", Code: "InvalidArgument"}}
			recs = append(recs, r)
		case 5:
			recs = append(recs, mk(i, 0, "keywardd.RotateKey", "orders", "", "ok"))
		}
	}
	return recs
}

// openTraffic is a log holding traffic(), a checkpoint every 7 records.
func openTraffic(t *testing.T) (*Log, string) {
	t.Helper()
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{CheckpointEvery: 7})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	for _, r := range traffic() {
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	return l, path
}

// TestListFilters: each filter, alone and together, selects exactly the
// records of the known traffic it describes, newest first.
func TestListFilters(t *testing.T) {
	l, _ := openTraffic(t)
	uid := func(u uint32) *uint32 { return &u }
	all := traffic()
	for _, tc := range []struct {
		name string
		q    Query
		want func(Record) bool
	}{
		{"everything", Query{}, func(Record) bool { return true }},
		{"since", Query{Since: t0.Add(50 * time.Second)}, func(r Record) bool { return !r.Time.Before(t0.Add(50 * time.Second)) }},
		{"until", Query{Until: t0.Add(10 * time.Second)}, func(r Record) bool { return r.Time.Before(t0.Add(10 * time.Second)) }},
		{"since and until", Query{Since: t0.Add(20 * time.Second), Until: t0.Add(30 * time.Second)},
			func(r Record) bool {
				return !r.Time.Before(t0.Add(20*time.Second)) && r.Time.Before(t0.Add(30*time.Second))
			}},
		{"operation, exact", Query{Op: "EnvelopeService.Decrypt"}, func(r Record) bool { return r.Op == "EnvelopeService.Decrypt" }},
		{"operation, a service", Query{Op: "APIKeyService."}, func(r Record) bool { return strings.HasPrefix(r.Op, "APIKeyService.") }},
		{"operation, a glob", Query{Op: "*Decrypt"}, func(r Record) bool { return strings.HasSuffix(r.Op, "Decrypt") }},
		{"operation, keywardd's own", Query{Op: "keywardd.*"}, func(r Record) bool { return strings.HasPrefix(r.Op, "keywardd.") }},
		{"outcome denied", Query{Outcome: "denied"}, func(r Record) bool { return r.Outcome == "denied" }},
		{"outcome error", Query{Outcome: "error"}, func(r Record) bool { return r.Outcome == "error" }},
		{"caller uid", Query{UID: uid(2000)}, func(r Record) bool { return r.Caller.UID == 2000 }},
		{"caller uid 0", Query{UID: uid(0)}, func(r Record) bool { return r.Caller.UID == 0 }},
		{"subject, exact key", Query{Subject: "orders"}, func(r Record) bool { return r.Key == "orders" }},
		{"subject, a glob", Query{Subject: "orders*"}, func(r Record) bool { return strings.HasPrefix(r.Key, "orders") }},
		{"subject, an API key", Query{Subject: "ak_08"}, func(r Record) bool { return r.APIKey == "ak_08" }},
		{"subject, a batch item", Query{Subject: "hr"}, func(r Record) bool { return len(r.Batch) == 2 }},
		{"together", Query{Op: "EnvelopeService.*", Outcome: "ok", UID: uid(1000), Since: t0.Add(12 * time.Second)},
			func(r Record) bool {
				return strings.HasPrefix(r.Op, "EnvelopeService.") && r.Outcome == "ok" && r.Caller.UID == 1000 && !r.Time.Before(t0.Add(12*time.Second))
			}},
		{"nothing", Query{Subject: "nope"}, func(Record) bool { return false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var want []string
			for i := len(all) - 1; i >= 0; i-- {
				if tc.want(all[i]) {
					want = append(want, describe(all[i]))
				}
			}
			tc.q.PageSize = MaxPageSize
			p, err := l.List(context.Background(), tc.q)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range p.Records {
				got = append(got, describe(e.Record))
			}
			if !slices.Equal(got, want) {
				t.Fatalf("got %d records:\n%s\nwant %d:\n%s", len(got), strings.Join(got, "\n"), len(want), strings.Join(want, "\n"))
			}
			if p.NextPageToken != "" || p.ScanLimited {
				t.Fatalf("a page with room left says more follows: %q, limited %v", p.NextPageToken, p.ScanLimited)
			}
			if len(want) == 0 && tc.name != "nothing" {
				t.Fatal("a case that selects nothing proves nothing")
			}
		})
	}
}

func describe(r Record) string {
	return fmt.Sprintf("%s %d %s %s %s %s", r.Time.Format(time.TimeOnly), r.Caller.UID, r.Op, r.Key, r.APIKey, r.Outcome)
}

// TestListPages: pages of every size return every record exactly once,
// newest first, their numbers one below the other's, and the record as
// written; the records' lines are found between the checkpoints.
func TestListPages(t *testing.T) {
	l, _ := openTraffic(t)
	all := traffic()
	for _, size := range []int{1, 2, 7, 59, 60, 61} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			var got []Entry
			tok := ""
			for calls := 0; ; calls++ {
				if calls > len(all) {
					t.Fatal("paging does not end")
				}
				p, err := l.List(context.Background(), Query{PageSize: size, PageToken: tok})
				if err != nil {
					t.Fatal(err)
				}
				if len(p.Records) > size {
					t.Fatalf("a page of %d records; asked for %d", len(p.Records), size)
				}
				got = append(got, p.Records...)
				if tok = p.NextPageToken; tok == "" {
					break
				}
			}
			if len(got) != len(all) {
				t.Fatalf("%d records over the pages; want %d", len(got), len(all))
			}
			for i, e := range got {
				want := all[len(all)-1-i]
				if describe(e.Record) != describe(want) || len(e.Batch) != len(want.Batch) {
					t.Fatalf("record %d: %s; want %s", i, describe(e.Record), describe(want))
				}
				if i > 0 && e.Seq >= got[i-1].Seq {
					t.Fatalf("seq %d after %d: not newest first", e.Seq, got[i-1].Seq)
				}
			}
		})
	}
}

// TestListScanLimit: a call stops once it has read MaxScan bytes, says
// so, and the token goes on from where it stopped: every record is still
// found once.
func TestListScanLimit(t *testing.T) {
	l, _ := openTraffic(t)
	var got []Entry
	tok, limited := "", 0
	for range 1000 {
		p, err := l.List(context.Background(), Query{Outcome: "denied", MaxScan: 1000, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		if p.Scanned > 1000+backChunk {
			t.Fatalf("read %d bytes; the bound is 1000 (and the chunk it is in)", p.Scanned)
		}
		if p.ScanLimited {
			limited++
			if p.NextPageToken == "" {
				t.Fatal("stopped early without a token to go on")
			}
		}
		got = append(got, p.Records...)
		if tok = p.NextPageToken; tok == "" {
			break
		}
	}
	if limited == 0 || len(got) != 10 {
		t.Fatalf("%d records in %d limited calls; want the 10 denied ones, over several calls", len(got), limited)
	}
}

// TestListWhileAppending: records appended while pages are read never
// tear a page (a line half written is not read), and paging from the
// first page's token finds every record that was there, once.
func TestListWhileAppending(t *testing.T) {
	l, _ := openTraffic(t)
	ctx := context.Background()
	first, err := l.List(ctx, Query{PageSize: 5})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r := rec(1000 + i)
				r.Detail = strings.Repeat("d", w*300) // lines of different lengths
				if err := l.Append(ctx, r); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	seen := len(first.Records)
	for tok := first.NextPageToken; tok != ""; {
		p, err := l.List(ctx, Query{PageSize: 5, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		seen += len(p.Records)
		tok = p.NextPageToken
		// The newest page, read again and again as lines are appended.
		if _, err := l.List(ctx, Query{}); err != nil {
			t.Fatalf("a page read while records are appended: %v", err)
		}
	}
	close(stop)
	wg.Wait()
	if seen != len(traffic()) {
		t.Fatalf("%d records over the pages; want %d", seen, len(traffic()))
	}
	st := l.State()
	fi, _ := os.Stat(l.f.Name())
	if st.Size != fi.Size() || st.LastSeq == 0 {
		t.Fatalf("state %+v; the file holds %d bytes", st, fi.Size())
	}
}

// TestListTornEnd: bytes after the last whole line (a write in progress)
// are not read as a line.
func TestListTornEnd(t *testing.T) {
	l, path := openTraffic(t)
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteString(`{"seq":999,"prev":"to`)
	w.Close()
	fi, _ := os.Stat(path)
	f, _ := os.Open(path)
	defer f.Close()
	p, err := List(context.Background(), f, fi.Size(), Query{PageSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Records) != 1 || p.Records[0].Op != "keywardd.RotateKey" {
		t.Fatalf("%+v; want the last whole record", p.Records)
	}
	// The log itself reads up to what it wrote.
	if st := l.State(); st.Size >= fi.Size() {
		t.Fatalf("state size %d; the torn line ends at %d", st.Size, fi.Size())
	}
}

// TestListBadQuery: what List cannot run is ErrInvalid, saying why.
func TestListBadQuery(t *testing.T) {
	l, _ := openTraffic(t)
	first, err := l.List(context.Background(), Query{PageSize: 3})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := parseCursor(first.NextPageToken)
	for _, tc := range []struct {
		q    Query
		want string
	}{
		{Query{Op: "[a-"}, "operation \"[a-\" is not a glob"},
		{Query{Subject: "\\"}, "subject \"\\\\\" is not a glob"},
		{Query{Subject: "*[" + strings.Repeat("a-a", 100) + "]Z"}, "the subject is 304 bytes; at most 256"},
		{Query{Op: strings.Repeat("A", 257)}, "the operation is 257 bytes; at most 256"},
		{Query{Outcome: "OK"}, "outcome \"OK\" is none of ok, denied, error"},
		{Query{PageSize: MaxPageSize + 1}, "1 to 1000 records, not 1001"},
		{Query{Since: t0, Until: t0}, "is not before until"},
		{Query{PageToken: "not a token"}, "not one ListAuditRecords gave"},
		{Query{PageToken: cursor{end: c.end + 5, seq: c.seq}.token()}, "does not point into this audit log"},
		{Query{PageToken: cursor{end: 1 << 40, seq: c.seq}.token()}, "does not point into this audit log"},
		{Query{PageToken: cursor{end: c.end, seq: c.seq + 1}.token()}, "does not match this audit log"},
	} {
		_, err := l.List(context.Background(), tc.q)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v; want ErrInvalid with %q", tc.q, err, tc.want)
		}
	}
}

// TestListSinceLate: Since stops the scan at the first older record, but
// not inside a block of records written late after an outage (their
// times are their calls'): the outage's record before them is found.
func TestListSinceLate(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	// No checkpoint on the clock: the file is read again after the listing.
	l, err := Open(path, h, macKey, Options{RetryEvery: 20 * time.Millisecond, CheckpointInterval: time.Hour,
		Now: func() time.Time { return t0.Add(50 * time.Second) }})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	for i := range 10 {
		if err := l.Append(ctx, rec(i)); err != nil {
			t.Fatal(err)
		}
	}
	// The disk goes: the calls at 11 and 12 are done but not recorded
	// until it is back (TestRecoversAfterWriteFailure).
	changes := make(chan struct{}, 10)
	l.SetNotify(func() { changes <- struct{}{} })
	back := diskGone(t, l)
	l.Append(ctx, rec(11))
	<-changes
	l.Append(ctx, rec(12))
	back()
	<-changes
	if err := l.Append(ctx, rec(51)); err != nil {
		t.Fatal(err)
	}
	p, err := l.List(ctx, Query{Since: t0.Add(12 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range p.Records {
		got = append(got, fmt.Sprintf("%s@%d", e.Op, e.Time.Sub(t0)/time.Second))
	}
	want := []string{"EnvelopeService.Decrypt@51", "EnvelopeService.Decrypt@12", "audit.outage@50"}
	if !slices.Equal(got, want) {
		t.Fatalf("since 12: %v; want %v", got, want)
	}
	if p.NextPageToken != "" {
		t.Fatalf("since was reached, but a token says more follows")
	}
	// It read the log once, and looked back for a block written late from
	// the first older record (at 11), and again past the block (at 9):
	// each a read of the lines before it, all counted.
	b, _ := os.ReadFile(path)
	lineAt := func(sec int) int64 {
		i := bytes.Index(b, []byte(t0.Add(time.Duration(sec)*time.Second).Format(`"time":"2006-01-02T15:04:05Z"`)))
		return int64(bytes.LastIndexByte(b[:i], '\n') + 1)
	}
	if want := int64(len(b)) + lineAt(11) + lineAt(9); p.Scanned != want {
		t.Fatalf("read %d bytes; want %d", p.Scanned, want)
	}
	// Without the outage, the scan stops at the first older record: it
	// read the end of the log, not all of it.
	p, err = l.List(ctx, Query{Since: t0.Add(51 * time.Second)})
	if err != nil || len(p.Records) != 1 {
		t.Fatalf("since 51: %+v, %v", p.Records, err)
	}
}

// TestState: the state tells the committed size, the last line and the
// last checkpoint, and a reopened log finds its last checkpoint again.
func TestState(t *testing.T) {
	l, path := openTraffic(t)
	st := l.State()
	fi, _ := os.Stat(path)
	if st.Path != path || st.Size != fi.Size() || st.LastSeq == 0 || st.LastCheckpointSeq == 0 || st.LastCheckpointTime.IsZero() {
		t.Fatalf("state %+v; the file has %d bytes", st, fi.Size())
	}
	h := l.mac
	l.Close()
	l2, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	st2 := l2.State()
	fi, _ = os.Stat(path)
	// Close wrote a last checkpoint, right after the last record (at 59 s).
	if st2.Size != fi.Size() || st2.LastSeq != st2.LastCheckpointSeq || st2.LastSeq <= st.LastSeq ||
		!st2.LastCheckpointTime.Equal(t0.Add(59*time.Second)) {
		t.Fatalf("reopened: %+v; before %+v", st2, st)
	}
}

// TestLogVerify: the live log verifies up to what it wrote, with its own
// MAC key; a line changed on disk is named; a cancelled call stops.
func TestLogVerify(t *testing.T) {
	l, path := openTraffic(t)
	ctx := context.Background()
	rep, size, err := l.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.BadLine != 0 || rep.Records != 60 || rep.Checkpoints == 0 || size != l.State().Size {
		t.Fatalf("report %+v of %d bytes", rep, size)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := l.Verify(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled verification: %v", err)
	}
	b, _ := os.ReadFile(path)
	i := bytes.Index(b, []byte(`"outcome":"denied"`))
	w, _ := os.OpenFile(path, os.O_WRONLY, 0)
	w.WriteAt([]byte(`"outcome":"DENIED"`), int64(i))
	w.Close()
	rep, _, err = l.Verify(ctx)
	line := uint64(bytes.Count(b[:i], []byte("\n")) + 1)
	if err != nil || rep.BadLine != line || !strings.Contains(rep.Problem, "the line was changed") {
		t.Fatalf("after a change on line %d: %+v, %v", line, rep, err)
	}
}

// FuzzList: whatever the log's bytes, the page token and the globs, List
// answers without panicking: records newest first, or an error that is
// ErrInvalid (the query) or ErrDamaged (the log).
func FuzzList(f *testing.F) {
	gold, err := os.ReadFile(filepath.Join("testdata", "golden.log"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(gold, "", "*", "")
	f.Add(gold, cursor{end: int64(bytes.IndexByte(gold, '\n') + 1), seq: 2}.token(), "", "kek")
	f.Add(gold[:len(gold)/2], "MTIzLjQ", "EnvelopeService.", "[")
	f.Add([]byte("{}\n{\"seq\":2}\n"), "", "", "")
	f.Fuzz(func(t *testing.T, data []byte, token, op, subject string) {
		p, err := List(context.Background(), bytes.NewReader(data), int64(len(data)), Query{PageToken: token, Op: op, Subject: subject})
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrDamaged) {
				t.Fatalf("%v: neither ErrInvalid nor ErrDamaged", err)
			}
			return
		}
		for i := 1; i < len(p.Records); i++ {
			if p.Records[i].Seq >= p.Records[i-1].Seq {
				t.Fatalf("seq %d after %d", p.Records[i].Seq, p.Records[i-1].Seq)
			}
		}
	})
}

// TestListDamaged: a line that does not parse, or is out of sequence, is
// ErrDamaged, pointing at VerifyAuditLog; lines after it still list.
func TestListDamaged(t *testing.T) {
	rec := `{"seq":%d,"prev":"","kind":"record","body":{"op":"KeyService.GetKey","outcome":"ok"},"hash":""}` + "\n"
	for _, tc := range []struct {
		name, log, want string
	}{
		{"not JSON", fmt.Sprintf(rec, 1) + "garbage\n" + fmt.Sprintf(rec, 3), "does not parse"},
		{"a line removed", fmt.Sprintf(rec, 1) + fmt.Sprintf(rec, 3), "numbered 1 where 2 belongs"},
		{"a line before the first", fmt.Sprintf(rec, 1) + fmt.Sprintf(rec, 1), "numbered 1 where 0 belongs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := List(context.Background(), strings.NewReader(tc.log), int64(len(tc.log)), Query{})
			if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "VerifyAuditLog") {
				t.Fatalf("%+v, %v; want ErrDamaged: %q", p, err, tc.want)
			}
			p, err = List(context.Background(), strings.NewReader(tc.log), int64(len(tc.log)), Query{PageSize: 1})
			if err != nil || len(p.Records) != 1 || p.Records[0].Seq != 3 && p.Records[0].Seq != 1 {
				t.Fatalf("the last line alone: %+v, %v", p, err)
			}
		})
	}
}
