package audit

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

var macKey = hsm.KeyID{Name: KeyName, Version: 1}

func macHSM(t testing.TB) *hsm.HSM {
	t.Helper()
	h, _ := hsmtest.Open(t)
	if err := h.CreateKey(context.Background(), macKey, hsm.HMACSHA256); err != nil {
		t.Fatal(err)
	}
	return h
}

func rec(i int) Record {
	return Record{Time: time.Unix(1700000000+int64(i), 0).UTC(), Caller: Caller{UID: 1000, GID: 1000, PID: 42, Exe: "/usr/bin/app"},
		Op: "EnvelopeService.Decrypt", Key: "kek", Version: 1, ContextSHA256: strings.Repeat("ab", 32), Outcome: "ok"}
}

func verify(t *testing.T, path string, mac MACer) Report {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := Verify(context.Background(), f, mac)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestChainAndCheckpoints(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{CheckpointEvery: 10})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 25 {
				if err := l.Append(context.Background(), rec(w*100+i)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Append(context.Background(), rec(0)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append after Close: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("log mode %04o", fi.Mode().Perm())
	}
	rep := verify(t, path, h)
	if rep.BadLine != 0 || rep.Records != 200 || rep.Checkpoints < 20 || rep.Unverified != 0 {
		t.Fatalf("report %+v; want 200 records, a checkpoint at least every 10, nothing unverified", rep)
	}
	b, _ := os.ReadFile(path)
	run := 0
	for _, ln := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.Contains(ln, `"kind":"checkpoint"`) {
			run = 0
		} else if run++; run > 10 {
			t.Fatal("more than 10 records between two checkpoints")
		}
	}
	if rep := verify(t, path, nil); rep.BadLine != 0 || rep.Unverified != 200 {
		t.Fatalf("without the key: %+v", rep)
	}

	// The chain resumes after a restart.
	l, err = Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Append(context.Background(), rec(999))
	l.Close()
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.Records != 201 {
		t.Fatalf("after a restart: %+v", rep)
	}
}

// TestTampering: every kind of change is found, at its line.
func TestTampering(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{CheckpointEvery: 4})
	for i := range 12 {
		l.Append(context.Background(), rec(i))
	}
	l.Close()
	orig, _ := os.ReadFile(path)
	lines := strings.SplitAfter(strings.TrimSuffix(string(orig), "\n"), "\n")
	write := func(ls []string) string {
		p := filepath.Join(t.TempDir(), "tampered.log")
		os.WriteFile(p, []byte(strings.Join(ls, "")), 0o600)
		return p
	}
	changed := append([]string(nil), lines...)
	changed[2] = strings.Replace(changed[2], `"outcome":"ok"`, `"outcome":"no"`, 1)
	removed := append(append([]string(nil), lines[:3]...), lines[4:]...)
	swapped := append([]string(nil), lines...)
	swapped[1], swapped[2] = swapped[2], swapped[1]

	// Rewriting the chain from line 2 on, as someone without the HSM key:
	// every hash is recomputed, so only a checkpoint's MAC can tell.
	rewritten := append([]string(nil), lines[:1]...)
	var first line
	json.Unmarshal([]byte(lines[0]), &first)
	prevBytes, _ := hex.DecodeString(first.Hash)
	var prev [32]byte
	copy(prev[:], prevBytes)
	for _, s := range lines[1:] {
		var ln line
		json.Unmarshal([]byte(s), &ln)
		if ln.Kind == "record" {
			ln.Body = bytes.Replace(ln.Body, []byte(`"uid":1000`), []byte(`"uid":1001`), 1)
		}
		ln.Prev = hex.EncodeToString(prev[:])
		prev = lineHash(prev, ln.Seq, ln.Kind, ln.Body)
		ln.Hash = hex.EncodeToString(prev[:])
		b, _ := json.Marshal(ln)
		rewritten = append(rewritten, string(b)+"\n")
	}

	for _, tc := range []struct {
		name  string
		lines []string
		bad   uint64
		want  string
	}{
		{"a changed record", changed, 3, "the line was changed"},
		{"a removed line", removed, 4, "a line was removed"},
		{"two lines swapped", swapped, 2, "sequence number"},
		{"the chain rewritten without the key", rewritten, 5, "the checkpoint's MAC is wrong"},
		{"garbage", append(append([]string(nil), lines[:2]...), "not json\n"), 3, "not a JSON line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := verify(t, write(tc.lines), h)
			if rep.BadLine != tc.bad || !strings.Contains(rep.Problem, tc.want) {
				t.Fatalf("report %+v; want line %d: %q", rep, tc.bad, tc.want)
			}
		})
	}
}

func TestTornLine(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{})
	for i := range 3 {
		l.Append(context.Background(), rec(i))
	}
	l.Close()
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"seq":99,"prev":"ab`) // a crash in the middle of a write
	f.Close()
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Append(context.Background(), rec(3))
	l.Close()
	rep := verify(t, path, h)
	if rep.BadLine != 0 || rep.Records != 5 {
		t.Fatalf("after a torn line: %+v (want 3 + the recovery note + 1)", rep)
	}
	b, _ := os.ReadFile(path)
	if !strings.Contains(string(b), `"op":"audit.recovered"`) || !strings.Contains(string(b), "cut 20 bytes") {
		t.Fatal("the cut is not recorded")
	}
}

// TestWriteFailure: when the log cannot be written, Append fails, and keeps
// failing, so that no call succeeds unaudited.
func TestWriteFailure(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Append(context.Background(), rec(0)); err != nil {
		t.Fatal(err)
	}
	l.f.Close() // the disk is gone
	if err := l.Err(); err != nil {
		t.Fatalf("Err before the failure is seen: %v", err)
	}
	for range 3 {
		if err := l.Append(context.Background(), rec(1)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Append to a broken log: %v", err)
		}
	}
	if err := l.Err(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Err after the failure: %v", err)
	}
	if err := l.Close(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Close of a broken log: %v", err)
	}
}

// FuzzVerify: Verify reads anything without panicking, and a report that
// finds no bad line counts every line.
// FuzzRecords: whatever the bytes, Records returns (an error or not) and
// hands on only records.
func FuzzRecords(f *testing.F) {
	f.Add([]byte(`{"seq":1,"prev":"` + strings.Repeat("0", 64) + `","kind":"record","body":{"op":"KeyService.GetKey","outcome":"denied","caller":{"uid":7}},"hash":"00"}` + "\n"))
	f.Add([]byte(`{"kind":"checkpoint","body":{"key":"x","mac":"00"}}` + "\n" + `{"kind":"record","body":[]}`))
	f.Add([]byte("{}\n{}"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		n := 0
		err := Records(bytes.NewReader(b), func(Record) error { n++; return nil })
		if err == nil && n > bytes.Count(b, []byte("record"))+bytes.Count(b, []byte(`\u`)) {
			t.Fatalf("%d records from %q", n, b)
		}
	})
}

func FuzzVerify(f *testing.F) {
	f.Add([]byte(`{"seq":1,"prev":"` + strings.Repeat("0", 64) + `","kind":"record","body":{},"hash":"00"}` + "\n"))
	f.Add([]byte("{}\n{}"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		rep, err := Verify(context.Background(), bytes.NewReader(b), nil)
		if err != nil {
			t.Fatal(err)
		}
		if rep.BadLine == 0 && rep.Records+rep.Checkpoints != rep.Lines {
			t.Fatalf("report %+v does not add up", rep)
		}
		if rep.BadLine != 0 {
			return
		}
		// A log that holds is the bytes keywardd writes, line for line.
		for l := range bytes.Lines(b) {
			var ln line
			if err := json.Unmarshal(l, &ln); err != nil {
				t.Fatalf("line %q holds and does not parse: %v", l, err)
			}
			prev, _ := hexHash(ln.Prev)
			hash, _ := hexHash(ln.Hash)
			if w := appendLine(nil, ln.Seq, prev, ln.Kind, ln.Body, hash); len(l) > len(w) || len(l) < len(w)-1 || !bytes.Equal(w[:len(l)], l) {
				t.Fatalf("line %q holds and is not what keywardd writes, %q", l, w)
			}
		}
	})
}

func ExampleContextDigest() {
	fmt.Println(ContextDigest([]byte{0}))
	// Output: 6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d
}

// flakyMAC fails while down is set, like an HSM that went away.
type flakyMAC struct {
	MACer
	mu   sync.Mutex
	down bool
}

func (f *flakyMAC) HMACSHA256(ctx context.Context, id hsm.KeyID, msg []byte) ([]byte, error) {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	if down {
		return nil, hsm.ErrTokenUnavailable
	}
	return f.MACer.HMACSHA256(ctx, id, msg)
}

// TestMACUnavailable: while the HSM cannot MAC, records are still written
// and chained; the checkpoint comes when it is back, and covers them.
func TestMACUnavailable(t *testing.T) {
	h := macHSM(t)
	mac := &flakyMAC{MACer: h, down: true}
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, mac, macKey, Options{CheckpointEvery: 2})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := l.Append(context.Background(), rec(i)); err != nil {
			t.Fatalf("Append with the HSM away: %v", err)
		}
	}
	if !errors.Is(l.CheckpointErr(), hsm.ErrTokenUnavailable) || l.Err() != nil {
		t.Fatalf("CheckpointErr %v, Err %v", l.CheckpointErr(), l.Err())
	}
	if rep := verify(t, path, h); rep.Checkpoints != 0 || rep.Records != 5 || rep.BadLine != 0 {
		t.Fatalf("while away: %+v", rep)
	}
	mac.mu.Lock()
	mac.down = false
	mac.mu.Unlock()
	l.Append(context.Background(), rec(5))
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.Records != 6 || rep.Checkpoints == 0 || rep.Unverified != 0 {
		t.Fatalf("after the HSM came back: %+v", rep)
	}
}

// TestForgedTail: someone without the HSM key drops every checkpoint and
// rewrites the chain. Every link holds, but with the key, Verify sees more
// records after the last checkpoint than keywardd ever leaves.
func TestForgedTail(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{})
	for i := range MaxTail + 50 {
		l.Append(context.Background(), rec(i))
	}
	l.Close()
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.TailTooLong || rep.Unverified != 0 {
		t.Fatalf("the genuine log: %+v", rep)
	}
	b, _ := os.ReadFile(path)
	var out []string
	var prev [32]byte
	seq := uint64(0)
	for _, s := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var ln line
		json.Unmarshal([]byte(s), &ln)
		if ln.Kind != "record" {
			continue
		}
		seq++
		ln.Seq, ln.Prev = seq, hex.EncodeToString(prev[:])
		prev = lineHash(prev, ln.Seq, ln.Kind, ln.Body)
		ln.Hash = hex.EncodeToString(prev[:])
		o, _ := json.Marshal(ln)
		out = append(out, string(o))
	}
	forged := filepath.Join(t.TempDir(), "forged.log")
	os.WriteFile(forged, []byte(strings.Join(out, "\n")+"\n"), 0o600)
	rep := verify(t, forged, h)
	if !rep.TailTooLong || rep.BadLine != 0 || !strings.Contains(rep.Problem, "follow no checkpoint") {
		t.Fatalf("a log rewritten without checkpoints: %+v", rep)
	}
}

// TestRecoversAfterWriteFailure: a log that could not be written tries
// again, cuts what the failed write left, records the outage and the
// records of the calls done meanwhile, and serves again; the chain and the
// checkpoints verify.
func TestRecoversAfterWriteFailure(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{RetryEvery: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	changes := make(chan struct{}, 10)
	l.SetNotify(func() { changes <- struct{}{} })
	ctx := context.Background()
	if err := l.Append(ctx, rec(0)); err != nil {
		t.Fatal(err)
	}
	// The disk goes: the next write fails, and leaves a torn line behind.
	l.mu.Lock()
	good := l.f
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	l.f = ro
	w, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	w.Write([]byte(`{"seq":3,"prev":"tor`))
	w.Close()
	l.mu.Unlock()
	if err := l.Append(ctx, rec(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append while the disk is gone: %v", err)
	}
	<-changes
	if err := l.Append(ctx, rec(2)); !errors.Is(err, ErrUnavailable) || l.Err() == nil {
		t.Fatalf("Append to a broken log: %v", err)
	}
	// The disk is back.
	l.mu.Lock()
	l.f = good
	ro.Close()
	l.mu.Unlock()
	<-changes
	if err := l.Err(); err != nil {
		t.Fatalf("still broken after the disk came back: %v", err)
	}
	if err := l.Append(ctx, rec(3)); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.Unverified != 0 {
		t.Fatalf("after the outage: %+v", rep)
	}
	var ops []string
	f, _ := os.Open(path)
	defer f.Close()
	Records(f, func(r Record) error {
		ops = append(ops, fmt.Sprintf("%s@%d", r.Op, r.Time.Unix()-1700000000))
		return nil
	})
	// rec(1) and rec(2) were refused but are of calls that were done: they
	// follow the outage's record, written late.
	got := strings.Join(ops, " ")
	if !strings.HasPrefix(got, "EnvelopeService.Decrypt@0 audit.outage@") || !strings.HasSuffix(got, "EnvelopeService.Decrypt@1 EnvelopeService.Decrypt@2 EnvelopeService.Decrypt@3") {
		t.Fatalf("records %s", got)
	}
}

// TestStoreWrites: every line records the store's write count, a
// checkpoint MACs it, and a reopened log tells the last one.
func TestStoreWrites(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var n uint64 = 41
	l.SetStoreWrites(func() uint64 { return n })
	l.Append(context.Background(), rec(0))
	n = 42
	l.Append(context.Background(), rec(1))
	l.Close()
	l, err = Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := l.StoreWrites(); got != 42 {
		t.Fatalf("StoreWrites %d after reopening, want 42", got)
	}
	l.Close()
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.Checkpoints == 0 {
		t.Fatalf("%+v", rep)
	}
	// A checkpoint's count cannot be changed, even with its line's hash
	// made anew: the MAC covers it.
	rewriteLastCheckpoint(t, path, `"store_writes":42`, `"store_writes":99`)
	if rep := verify(t, path, h); !strings.Contains(rep.Problem, "MAC is wrong") {
		t.Fatalf("a changed count: %+v", rep)
	}
}

// TestDamagedEnd: a log whose end is no audit line is refused with
// ErrDamaged, saying to run keyward audit verify, and is left exactly as
// it was (a torn line after it is not cut either).
func TestDamagedEnd(t *testing.T) {
	h := macHSM(t)
	long := bytes.Repeat([]byte("x"), 1<<20+1)
	for _, tc := range []struct {
		name    string
		content []byte
		want    string
	}{
		{"last line not JSON", []byte("this is not an audit log\n"), "does not parse"},
		{"hash too short", []byte(`{"seq":1,"hash":"00"}` + "\n"), "does not parse"},
		{"hash not hex", []byte(`{"seq":1,"hash":"` + strings.Repeat("zz", 32) + `"}` + "\n"), "not hex"},
		{"damaged line, then a torn one", []byte("not a record\n{\"seq\":2,\"pr"), "does not parse"},
		{"a line over 1 MiB", append([]byte(`{"seq":1}`+"\n"), long...), "ends in a line over 1048576 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			if err := os.WriteFile(path, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			l, err := Open(path, h, macKey, Options{})
			if err == nil {
				l.Close()
				t.Fatal("a damaged log was opened")
			}
			if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "run keyward audit verify") {
				t.Errorf("Open: %v; want ErrDamaged saying %q and to run keyward audit verify", err, tc.want)
			}
			if b, _ := os.ReadFile(path); !bytes.Equal(b, tc.content) {
				t.Errorf("the damaged log was changed: %d bytes, was %d", len(b), len(tc.content))
			}
		})
	}
}

// TestBeforeRecordsNotKeptLate: while the log cannot be written, the
// record of a call that was done (Append) is kept and written after the
// outage; that of an act refused because it could not be audited first
// (AppendBefore) is not, since the act was not done.
func TestBeforeRecordsNotKeptLate(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{RetryEvery: 20 * time.Millisecond})
	changes := make(chan struct{}, 10)
	l.SetNotify(func() { changes <- struct{}{} })
	ctx := context.Background()
	l.Append(ctx, rec(0))
	back := diskGone(t, l)
	l.Append(ctx, rec(1))
	<-changes
	if err := l.AppendBefore(ctx, Record{Op: "keywardd.DeleteKey", Key: "orders", Outcome: "ok"}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("AppendBefore during the outage: %v", err)
	}
	l.Append(ctx, rec(2))
	back()
	<-changes
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	var ops []string
	Records(f, func(r Record) error { ops = append(ops, r.Op); return nil })
	if got := strings.Join(ops, " "); got != "EnvelopeService.Decrypt audit.outage EnvelopeService.Decrypt EnvelopeService.Decrypt" {
		t.Fatalf("on record: %s", got)
	}
}

// diskGone makes the log's writes fail, as on a disk that went away,
// until back is called.
func diskGone(t *testing.T, l *Log) (back func()) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	good := l.f
	ro, err := os.Open(good.Name())
	if err != nil {
		t.Fatal(err)
	}
	l.f = ro
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.f = good
		ro.Close()
	}
}

// TestStallKeepsRecords: a disk that stalls past the calls' audit deadline
// (the writer holds the log through a stuck fsync) loses no record of a
// call that was done: each is written, in the queue or late.
func TestStallKeepsRecords(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{CheckpointInterval: 20 * time.Millisecond})
	l.mu.Lock()    // as the writer holds it through a stuck fsync
	const n = 1200 // more than the queue holds
	errs := make(chan error, n)
	for i := range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			r := rec(i)
			r.Op = "APIKeyService.RevokeAPIKey"
			errs <- l.Append(ctx, r)
		}()
	}
	time.Sleep(300 * time.Millisecond)
	l.mu.Unlock()
	for range n {
		<-errs
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	written := 0
	Records(f, func(r Record) error {
		if r.Op == "APIKeyService.RevokeAPIKey" {
			written++
		}
		return nil
	})
	if written != n {
		t.Fatalf("%d calls done, %d on record", n, written)
	}
	if rep := verify(t, path, h); rep.BadLine != 0 {
		t.Fatalf("%+v", rep)
	}
}

// TestAppendLine holds the writer's hand-built lines equal to what
// json.Marshal writes for them, the form Verify and every reader parse.
func TestAppendLine(t *testing.T) {
	recs := []Record{rec(1), {}, {Time: time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC), Op: "x<y>&z\u2028", Detail: "a \"quoted\" \\ \x00 \xff line\n",
		Caller: Caller{UID: 1 << 31, Exe: "/bin/é"}, Batch: []Item{{Key: "k", Outcome: "ok"}, {Outcome: "error", Detail: strings.Repeat("x", 2000)}},
		APIKey: "id", Result: "VALID", Items: 2}}
	for i, r := range recs {
		for _, n := range []uint64{0, 1, 1 << 63} {
			l := &Log{}
			if n == 1 {
				l.opt.Node = "node-1" // a fleet's node names itself in every record
			}
			body, err := l.encode(r)
			if err != nil {
				t.Fatal(err)
			}
			body = withStoreWrites(nil, body, n)
			want := capped(r)
			want.StoreWrites = n
			want.Node = l.opt.Node
			wantBody, _ := json.Marshal(want)
			if !bytes.Equal(body, wantBody) {
				t.Fatalf("record %d, count %d: body\n%s\nwant\n%s", i, n, body, wantBody)
			}
			prev, hash := [32]byte{1, 2}, [32]byte{0xff, 3}
			got := appendLine(nil, uint64(i)+1<<40, prev, "record", body, hash)
			wantLine, _ := json.Marshal(line{Seq: uint64(i) + 1<<40, Prev: hex.EncodeToString(prev[:]), Kind: "record", Body: wantBody, Hash: hex.EncodeToString(hash[:])})
			if !bytes.Equal(got, append(wantLine, '\n')) {
				t.Fatalf("record %d: line\n%s\nwant\n%s", i, got, wantLine)
			}
		}
	}
	if _, err := (&Log{}).encode(Record{Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}); err == nil {
		t.Fatal("a time past year 9999 was encoded")
	}
}

// TestUnencodableTime: a call that was done is recorded even when its time
// cannot be written (a clock past year 9999), without it and saying so; an
// act that would be done only once recorded is refused.
func TestUnencodableTime(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	h := macHSM(t)
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	future := Record{Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), Op: "KeyService.DestroyKey", Key: "k", Outcome: "ok"}
	if err := l.AppendBefore(context.Background(), future); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("AppendBefore of an unencodable record: %v, want ErrUnavailable", err)
	}
	if err := l.Append(context.Background(), future); err != nil {
		t.Fatalf("Append of a done call's record: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, path, h); rep.BadLine != 0 || rep.Records != 1 {
		t.Fatalf("verify: %+v", rep)
	}
	f, _ := os.Open(path)
	defer f.Close()
	var got []Record
	Records(f, func(r Record) error { got = append(got, r); return nil })
	if len(got) != 1 || got[0].Op != future.Op || !got[0].Time.IsZero() || !strings.Contains(got[0].Detail, "its time could not be written") {
		t.Fatalf("records: %+v", got)
	}
}
