package audit

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// shippedLines writes n records (every third a VerifyAPIKey) to a log with
// a checkpoint every 5, and returns its lines.
func shippedLines(t *testing.T, n int) ([][]byte, MACer) {
	t.Helper()
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{CheckpointEvery: 5})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		r := rec(i)
		if i%3 == 0 {
			r.Op = "APIKeyService.VerifyAPIKey"
		}
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n")), h
}

func TestVerifyReceived(t *testing.T) {
	lines, h := shippedLines(t, 20) // 20 records, 4 checkpoints (one after every 5): 24 lines
	if len(lines) != 24 {
		t.Fatalf("%d lines, want 24", len(lines))
	}
	syslogged := func(ls [][]byte) [][]byte {
		out := [][]byte{[]byte("Dec  5 09:00:00 host systemd[1]: unrelated message")}
		for _, l := range ls {
			out = append(out, append([]byte("<86>1 2026-12-05T09:00:00.000000Z host keywardd 42 record - "), l...))
		}
		return out
	}
	filtered := func(ls [][]byte) [][]byte {
		out := slices.Clone(ls)
		for i, l := range out {
			if bytes.Contains(l, []byte("VerifyAPIKey")) {
				sl, err := ParseShipped(l)
				if err != nil {
					t.Fatal(err)
				}
				out[i] = sl.Stub()
			}
		}
		return out
	}
	altered := func(i int) func([][]byte) [][]byte {
		return func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			out[i] = bytes.Replace(out[i], []byte(`"uid":1000`), []byte(`"uid":1001`), 1)
			return out
		}
	}
	rewritten := func(i int, rewrite func(l []byte) []byte) func([][]byte) [][]byte {
		return func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			out[i] = rewrite(slices.Clone(out[i]))
			return out
		}
	}
	// notCanonical: line 3 rewritten so that its hash still verifies for a
	// reader of Go's encoding/json, and is a fault all the same.
	notCanonical := func(t *testing.T, r Received) {
		t.Helper()
		if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 3 || !strings.Contains(r.Altered[0].Why, "not the bytes keywardd writes") {
			t.Errorf("%+v", r)
		}
	}
	reversed := func(ls [][]byte) [][]byte {
		out := slices.Clone(ls)
		slices.Reverse(out)
		return out
	}
	for _, tc := range []struct {
		name   string
		opts   ReceivedOptions
		change func([][]byte) [][]byte
		check  func(t *testing.T, r Received)
	}{
		{"complete", ReceivedOptions{}, nil, func(t *testing.T, r Received) {
			if !r.OK() || r.Records != 20 || r.Checkpoints != 4 || r.FirstSeq != 1 || r.LastSeq != 24 || r.Unverified != 0 || !r.MACsChecked {
				t.Errorf("%+v", r)
			}
		}},
		{"syslog headers and other messages", ReceivedOptions{}, syslogged, func(t *testing.T, r Received) {
			if !r.OK() || r.Records != 20 || r.Ignored != 1 {
				t.Errorf("%+v", r)
			}
		}},
		{"one missing", ReceivedOptions{}, func(ls [][]byte) [][]byte { return slices.Delete(slices.Clone(ls), 9, 10) }, func(t *testing.T, r Received) {
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{10, 10}}) || len(r.Altered) != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{"one altered", ReceivedOptions{}, altered(2), func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 3 || !strings.Contains(r.Altered[0].Why, "hash does not match") {
				t.Errorf("%+v", r)
			}
		}},
		{"altered with its hash recomputed", ReceivedOptions{}, func(ls [][]byte) [][]byte {
			out := altered(2)(ls)
			var ln line
			mustUnmarshal(t, out[2], &ln)
			prev, _ := hexHash(ln.Prev)
			h := lineHash(prev, ln.Seq, ln.Kind, ln.Body)
			out[2] = appendLine(nil, ln.Seq, prev, ln.Kind, ln.Body, h)
			out[2] = out[2][:len(out[2])-1]
			return out
		}, func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 3 || !strings.Contains(r.Altered[0].Why, "does not link") {
				t.Errorf("%+v", r)
			}
		}},
		{"two reordered", ReceivedOptions{}, func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			out[4], out[5] = out[5], out[4]
			return out
		}, func(t *testing.T, r Received) {
			if r.OK() || r.Reordered != 1 || r.FirstReordered != 5 || len(r.Missing) != 0 || len(r.Altered) != 0 || r.Records != 20 {
				t.Errorf("%+v", r)
			}
		}},
		{"filtered, the sink said to filter", ReceivedOptions{Filtered: true}, filtered, func(t *testing.T, r Received) {
			if !r.OK() || r.Filtered != 7 || r.Records != 13 || r.Unverified != 0 || len(r.Stubs) != 7 || r.Stubs[0] != (SeqRange{1, 1}) {
				t.Errorf("%+v", r)
			}
		}},
		{"filtered, the sink not said to filter: stubs are faults", ReceivedOptions{}, filtered, func(t *testing.T, r Received) {
			if r.OK() || r.Filtered != 7 || len(r.Stubs) != 7 || len(r.Missing)+len(r.Altered)+len(r.Malformed) != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{"duplicates of a batch shipped again", ReceivedOptions{}, func(ls [][]byte) [][]byte {
			return slices.Concat(ls[:10], ls[6:10], ls[10:])
		}, func(t *testing.T, r Received) {
			if !r.OK() || r.Duplicates != 4 || r.Reordered != 0 || r.Records != 20 {
				t.Errorf("%+v", r)
			}
		}},
		{"a record replaced by its stub at the receiver is a fault", ReceivedOptions{}, func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			sl, _ := ParseShipped(out[1])
			out[1] = sl.Stub()
			return out
		}, func(t *testing.T, r Received) {
			if r.OK() || r.Filtered != 1 || !slices.Equal(r.Stubs, []SeqRange{{2, 2}}) || r.StubsExpected {
				t.Errorf("%+v", r)
			}
		}},
		{"a stub not in the form a sink ships", ReceivedOptions{Filtered: true}, func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			sl, _ := ParseShipped(out[2])
			out[2] = bytes.Replace(sl.Stub(), []byte(`"kind"`), []byte(`"note":"approved","kind"`), 1)
			return out
		}, notCanonical},
		{"a body under a key Go reads, a fake one under the key others read", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			i, j := bytes.Index(l, []byte(`"body":`)), bytes.Index(l, []byte(`,"hash":`))
			body := l[i+len(`"body":`) : j]
			fake := bytes.Replace(body, []byte(`"uid":1000`), []byte(`"uid":0`), 1)
			return slices.Concat(l[:i], []byte(`"body":`), fake, []byte(`,"BODY":`), body, l[j:])
		}), notCanonical},
		{"a key twice, the last one wins in Go", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			return bytes.Replace(l, []byte(`"kind":"record",`), []byte(`"kind":"checkpoint","kind":"record",`), 1)
		}), notCanonical},
		{"a key in another case", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			return bytes.Replace(l, []byte(`"seq":`), []byte(`"SEQ":`), 1)
		}), func(t *testing.T, r Received) {
			// {"SEQ": is no longer found as an audit line's start.
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{3, 3}}) {
				t.Errorf("%+v", r)
			}
		}},
		{"a key in another case, after seq", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			return bytes.Replace(l, []byte(`"prev":`), []byte(`"Prev":`), 1)
		}), notCanonical},
		{"a field added", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			return bytes.Replace(l, []byte(`,"hash":`), []byte(`,"approved_by":"ciso","hash":`), 1)
		}), notCanonical},
		{"spaces added", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			return bytes.Replace(l, []byte(`,"hash":`), []byte(`, "hash":`), 1)
		}), notCanonical},
		{"a hash in upper case", ReceivedOptions{}, rewritten(2, func(l []byte) []byte {
			i := bytes.Index(l, []byte(`"hash":"`)) + len(`"hash":"`)
			copy(l[i:], bytes.ToUpper(l[i:i+64]))
			return l
		}), notCanonical},
		{"the head cut, the range given", ReceivedOptions{From: 1}, func(ls [][]byte) [][]byte { return ls[12:] }, func(t *testing.T, r Received) {
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{1, 12}}) || r.FirstSeq != 13 {
				t.Errorf("%+v", r)
			}
		}},
		{"the tail cut, the range given", ReceivedOptions{From: 1, Through: 24}, func(ls [][]byte) [][]byte { return ls[:12] }, func(t *testing.T, r Received) {
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{13, 24}}) || r.LastSeq != 12 {
				t.Errorf("%+v", r)
			}
		}},
		{"the tail cut, no range given: not seen", ReceivedOptions{}, func(ls [][]byte) [][]byte { return ls[:12] }, func(t *testing.T, r Received) {
			if !r.OK() || r.LastSeq != 12 {
				t.Errorf("%+v", r)
			}
		}},
		{"a range within what was received", ReceivedOptions{From: 3, Through: 20}, nil, func(t *testing.T, r Received) {
			if !r.OK() || r.FirstSeq != 1 || r.LastSeq != 24 {
				t.Errorf("%+v", r)
			}
		}},
		{"nothing received, a range given", ReceivedOptions{From: 5, Through: 9}, func([][]byte) [][]byte { return nil }, func(t *testing.T, r Received) {
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{5, 9}}) {
				t.Errorf("%+v", r)
			}
		}},
		{"newest first, any order", ReceivedOptions{AnyOrder: true}, reversed, func(t *testing.T, r Received) {
			if !r.OK() || r.Reordered != 0 || r.Records != 20 || r.FirstSeq != 1 || r.LastSeq != 24 || r.Unverified != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{"newest first, order expected", ReceivedOptions{}, reversed, func(t *testing.T, r Received) {
			if r.OK() || r.Reordered != 23 {
				t.Errorf("%+v", r)
			}
		}},
		{"any order still finds a conflict and counts duplicates", ReceivedOptions{AnyOrder: true}, func(ls [][]byte) [][]byte {
			return reversed(slices.Concat(ls, ls[3:5], [][]byte{altered(7)(ls)[7]}))
		}, func(t *testing.T, r Received) {
			if r.OK() || r.Duplicates != 2 || len(r.Altered) != 1 || r.Altered[0].Seq != 8 || !strings.Contains(r.Altered[0].Why, "two different lines") {
				t.Errorf("%+v", r)
			}
		}},
		{"a conflicting copy", ReceivedOptions{}, func(ls [][]byte) [][]byte { return append(slices.Clone(ls), altered(7)(ls)[7]) }, func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 8 || !strings.Contains(r.Altered[0].Why, "two different lines") {
				t.Errorf("%+v", r)
			}
		}},
		{"a rewritten checkpoint", ReceivedOptions{}, func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			i := slices.IndexFunc(out, func(l []byte) bool { return bytes.Contains(l, []byte(`"kind":"checkpoint"`)) })
			var ln line
			mustUnmarshal(t, out[i], &ln)
			var cp checkpoint
			mustUnmarshal(t, ln.Body, &cp)
			cp.MAC = strings.Repeat("0", 64) // a MAC made up by whoever rewrote the chain
			body, _ := json.Marshal(cp)
			prev, _ := hexHash(ln.Prev)
			h := lineHash(prev, ln.Seq, ln.Kind, body)
			out[i] = bytes.TrimSuffix(appendLine(nil, ln.Seq, prev, ln.Kind, body, h), []byte("\n"))
			return out[:i+1] // the end of the stream: no line after it to break the link
		}, func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 6 || !strings.Contains(r.Altered[0].Why, "MAC is wrong") {
				t.Errorf("%+v", r)
			}
		}},
		{"a malformed line", ReceivedOptions{}, func(ls [][]byte) [][]byte { return append(slices.Clone(ls), []byte(`{"seq":99,"prev":`)) }, func(t *testing.T, r Received) {
			if r.OK() || len(r.Malformed) != 1 || r.Malformed[0].Line != 25 {
				t.Errorf("%+v", r)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ls := lines
			if tc.change != nil {
				ls = tc.change(lines)
			}
			r, err := VerifyReceivedWith(context.Background(), bytes.NewReader(append(bytes.Join(ls, []byte("\n")), '\n')), h, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, r)
		})
	}
}

// TestLocalLogRefusesStubs: a stub belongs to what a sink shipped; in the
// local log it is a record replaced.
func TestLocalLogRefusesStubs(t *testing.T) {
	lines, h := shippedLines(t, 6)
	sl, err := ParseShipped(lines[2])
	if err != nil {
		t.Fatal(err)
	}
	lines[2] = sl.Stub()
	rep, err := Verify(context.Background(), bytes.NewReader(append(bytes.Join(lines, []byte("\n")), '\n')), h)
	if err != nil {
		t.Fatal(err)
	}
	if rep.BadLine != 3 || !strings.Contains(rep.Problem, "filtered") {
		t.Errorf("%+v", rep)
	}
}

func FuzzVerifyReceived(f *testing.F) {
	f.Add([]byte(`{"seq":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","kind":"filtered","hash":"1111111111111111111111111111111111111111111111111111111111111111"}` + "\n"))
	f.Add([]byte("<86>1 - host keywardd 1 record - {\"seq\":2}\nnoise\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		// A line a sink reads, and its stub: the stub keeps its place in
		// the chain.
		for ln := range bytes.Lines(b) {
			sl, err := ParseShipped(bytes.TrimSuffix(ln, []byte("\n")))
			if err != nil {
				continue
			}
			back, err := ParseShipped(sl.Stub())
			if err != nil || back.Seq != sl.Seq || back.Prev != sl.Prev || back.Hash != sl.Hash || back.Kind != KindFiltered || back.Op != "" {
				t.Errorf("the stub of %q is %q: %v", ln, sl.Stub(), err)
			}
		}
		r, err := VerifyReceived(context.Background(), bytes.NewReader(b), nil)
		if err != nil {
			return
		}
		if r.Records+r.Checkpoints+r.Filtered+r.Duplicates > r.Lines {
			t.Errorf("more lines counted than read: %+v", r)
		}
		if r.FirstSeq > r.LastSeq {
			t.Errorf("first %d after last %d", r.FirstSeq, r.LastSeq)
		}
	})
}

func mustUnmarshal(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

func hexHash(s string) ([32]byte, error) {
	b, err := hex.DecodeString(s)
	return [32]byte(b), err
}

// TestReceivedTailTooLong: with the HSM, a stream whose last checkpoint is
// more than MaxTail records before its end is a fault, as in the local
// log: checkpoints at the end were removed and the lines after rewritten,
// or the HSM could not MAC for a long time. Without the HSM no checkpoint
// is checked, and nothing can be told.
func TestReceivedTailTooLong(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, h, macKey, Options{CheckpointEvery: 10 * MaxTail, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range MaxTail + 1 {
		if err := l.Append(context.Background(), rec(i)); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		lines []byte
		mac   MACer
		long  bool
	}{
		{"a tail of MaxTail+1 records, with the HSM", b, h, true},
		{"a tail of MaxTail records, with the HSM", b[:bytes.LastIndexByte(b[:len(b)-1], '\n')+1], h, false},
		{"without the HSM", b, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := VerifyReceived(context.Background(), bytes.NewReader(tc.lines), tc.mac)
			if err != nil {
				t.Fatal(err)
			}
			if r.TailTooLong != tc.long || r.OK() == tc.long || r.Checkpoints != 0 {
				t.Errorf("%+v", r)
			}
		})
	}
}

// TestVerifyRewrittenLine: the local log's lines must be the bytes
// keywardd writes, as what a receiver got must: a line whose hash checks
// for Go's encoding/json but that other readers see otherwise is a fault.
func TestVerifyRewrittenLine(t *testing.T) {
	lines, h := shippedLines(t, 6)
	for _, tc := range []struct {
		name    string
		rewrite func(l []byte) []byte
	}{
		{"a fake body under body, the real one under BODY", func(l []byte) []byte {
			i, j := bytes.Index(l, []byte(`"body":`)), bytes.Index(l, []byte(`,"hash":`))
			body := l[i+len(`"body":`) : j]
			fake := bytes.Replace(body, []byte(`"uid":1000`), []byte(`"uid":0`), 1)
			return slices.Concat(l[:i], []byte(`"body":`), fake, []byte(`,"BODY":`), body, l[j:])
		}},
		{"a field added", func(l []byte) []byte {
			return bytes.Replace(l, []byte(`,"hash":`), []byte(`,"approved_by":"ciso","hash":`), 1)
		}},
		{"a space added", func(l []byte) []byte { return bytes.Replace(l, []byte(`,"hash":`), []byte(`, "hash":`), 1) }},
		{"a carriage return", func(l []byte) []byte { return append(l, '\r') }},
		{"a key in another case", func(l []byte) []byte { return bytes.Replace(l, []byte(`"kind":`), []byte(`"Kind":`), 1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ls := slices.Clone(lines)
			ls[2] = tc.rewrite(slices.Clone(ls[2]))
			rep, err := Verify(context.Background(), bytes.NewReader(append(bytes.Join(ls, []byte("\n")), '\n')), h)
			if err != nil {
				t.Fatal(err)
			}
			if rep.BadLine != 3 || !strings.Contains(rep.Problem, "not the bytes keywardd writes") {
				t.Errorf("%+v", rep)
			}
		})
	}
	rep, err := Verify(context.Background(), bytes.NewReader(append(bytes.Join(lines, []byte("\n")), '\n')), h)
	if err != nil || rep.BadLine != 0 || rep.Records != 6 {
		t.Errorf("the log unchanged: %+v %v", rep, err)
	}
}
