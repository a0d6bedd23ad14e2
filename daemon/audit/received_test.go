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
	for _, tc := range []struct {
		name   string
		change func([][]byte) [][]byte
		check  func(t *testing.T, r Received)
	}{
		{"complete", nil, func(t *testing.T, r Received) {
			if !r.OK() || r.Records != 20 || r.Checkpoints != 4 || r.FirstSeq != 1 || r.LastSeq != 24 || r.Unverified != 0 || !r.MACsChecked {
				t.Errorf("%+v", r)
			}
		}},
		{"syslog headers and other messages", syslogged, func(t *testing.T, r Received) {
			if !r.OK() || r.Records != 20 || r.Ignored != 1 {
				t.Errorf("%+v", r)
			}
		}},
		{"one missing", func(ls [][]byte) [][]byte { return slices.Delete(slices.Clone(ls), 9, 10) }, func(t *testing.T, r Received) {
			if r.OK() || !slices.Equal(r.Missing, []SeqRange{{10, 10}}) || len(r.Altered) != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{"one altered", altered(2), func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 3 || !strings.Contains(r.Altered[0].Why, "hash does not match") {
				t.Errorf("%+v", r)
			}
		}},
		{"altered with its hash recomputed", func(ls [][]byte) [][]byte {
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
		{"two reordered", func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			out[4], out[5] = out[5], out[4]
			return out
		}, func(t *testing.T, r Received) {
			if r.OK() || r.Reordered != 1 || r.FirstReordered != 5 || len(r.Missing) != 0 || len(r.Altered) != 0 || r.Records != 20 {
				t.Errorf("%+v", r)
			}
		}},
		{"filtered", filtered, func(t *testing.T, r Received) {
			if !r.OK() || r.Filtered != 7 || r.Records != 13 || r.Unverified != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{"duplicates of a batch shipped again", func(ls [][]byte) [][]byte {
			return slices.Concat(ls[:10], ls[6:10], ls[10:])
		}, func(t *testing.T, r Received) {
			if !r.OK() || r.Duplicates != 4 || r.Reordered != 0 || r.Records != 20 {
				t.Errorf("%+v", r)
			}
		}},
		{"a stub in place of a record that was not filtered is still only filtered", func(ls [][]byte) [][]byte {
			out := slices.Clone(ls)
			sl, _ := ParseShipped(out[1])
			out[1] = sl.Stub()
			return out
		}, func(t *testing.T, r Received) {
			if !r.OK() || r.Filtered != 1 {
				t.Errorf("%+v", r)
			}
		}},
		{"a conflicting copy", func(ls [][]byte) [][]byte { return append(slices.Clone(ls), altered(7)(ls)[7]) }, func(t *testing.T, r Received) {
			if r.OK() || len(r.Altered) != 1 || r.Altered[0].Seq != 8 || !strings.Contains(r.Altered[0].Why, "two different lines") {
				t.Errorf("%+v", r)
			}
		}},
		{"a rewritten checkpoint", func(ls [][]byte) [][]byte {
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
		{"a malformed line", func(ls [][]byte) [][]byte { return append(slices.Clone(ls), []byte(`{"seq":99,"prev":`)) }, func(t *testing.T, r Received) {
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
			r, err := VerifyReceived(context.Background(), bytes.NewReader(append(bytes.Join(ls, []byte("\n")), '\n')), h)
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
