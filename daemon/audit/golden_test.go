package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/hsm"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// goldenKey is the MAC key of the golden logs. keyward's own audit key
// never leaves the HSM, so the vectors are MACed by Go's HMAC-SHA256 under
// this known key, as the HSM would (hsm.TestCrossCheckGoCrypto holds the
// token's HMAC-SHA256 equal to Go's).
var goldenKey = bytes.Repeat([]byte{0xa5}, 32)

// goldenMAC is HMAC-SHA256 under goldenKey, for the key keyward-audit v1
// only: a log naming any other key is an error, as with the HSM.
type goldenMAC struct{}

func (goldenMAC) HMACSHA256(_ context.Context, id hsm.KeyID, msg []byte) ([]byte, error) {
	if id != macKey {
		return nil, fmt.Errorf("golden MAC: no key %s", id)
	}
	m := hmac.New(sha256.New, goldenKey)
	m.Write(msg)
	return m.Sum(nil), nil
}

// goldenRecord is a record of the golden log and the store's write count
// when it is written.
type goldenRecord struct {
	rec    Record
	writes uint64
}

// goldenRecords cover every field of a record: a caller with and without a
// PID, a refusal, a batch with a withheld reason, an API key's verdict, a
// record of keywardd's own, a caller's cgroup, a field cut to its cap with characters
// json.Marshal escapes, a time with nanoseconds, and store counts from
// absent (0) upwards.
func goldenRecords() []goldenRecord {
	t := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	app := Caller{UID: 1000, GID: 1000, PID: 4242, Exe: "/usr/bin/billing", SHA256: strings.Repeat("e3", 32)}
	ctx := ContextDigest([]byte("\x02\x03app\x07billing\x06tenant\x0242"))
	return []goldenRecord{
		{Record{Time: t, Caller: app, Op: "EnvelopeService.Decrypt", Key: "payments", Version: 3, ContextSHA256: ctx, Outcome: "ok"}, 0},
		{Record{Time: t.Add(time.Second), Caller: app, Op: "KeyService.GetKey", Key: "hr", Outcome: "denied",
			Code: "PermissionDenied", Detail: "uid 1000 is not granted KeyService.GetKey on key \"hr\""}, 0},
		{Record{Time: t.Add(2 * time.Second), Caller: app, Op: "EnvelopeService.BatchDecrypt", Items: 2, Outcome: "ok", Batch: []Item{
			{Key: "payments", Version: 3, ContextSHA256: ctx, Outcome: "ok"},
			{Key: "payments", Version: 2, ContextSHA256: ctx, Outcome: "error", Code: "InvalidArgument",
				Detail: "withheld from the caller: the ciphertext's tag does not verify under payments v2"},
		}}, 0},
		{Record{Time: t.Add(3 * time.Second), Caller: Caller{UID: 1001, GID: 1001, Exe: "/srv/api"}, Op: "APIKeyService.VerifyAPIKey",
			APIKey: "ak_0123456789abcdef01234567", Outcome: "ok", Result: "VALID"}, 41},
		{Record{Time: t.Add(4 * time.Second), Op: "keywardd.rotate", Key: "payments", Version: 4, Outcome: "ok",
			Detail: "scheduled rotation (every 720h0m0s)"}, 42},
		{Record{Time: t.Add(5 * time.Second), Caller: app, Op: "KeyService.CreateKey", Key: strings.Repeat("k", 1100), Outcome: "error",
			Code: "InvalidArgument", Detail: "a name <with> \"quotes\" & \u2028 é \x01"}, 42},
		{Record{Time: t.Add(6*time.Second + 123456789), Caller: app, Op: "TokenService.MintToken", Key: "jwt", Version: 1, Outcome: "ok"}, 43},
		{Record{Time: t.Add(7 * time.Second), Caller: Caller{UID: 0, GID: 0, PID: 4343, Exe: "/usr/bin/orders",
			Cgroup: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-" + strings.Repeat("3f", 32) + ".scope"},
			Op: "EnvelopeService.GenerateDataKey", Key: "orders", Version: 1, Outcome: "ok"}, 43},
	}
}

// goldenCheckpointEvery: a checkpoint after every third record, and one
// when the log closes.
const goldenCheckpointEvery = 3

// writeGolden writes the golden records through a Log to path, one call
// at a time, with the store's count set before each.
func writeGolden(t *testing.T, path string) {
	t.Helper()
	var writes uint64
	l, err := Open(path, goldenMAC{}, macKey, Options{CheckpointEvery: goldenCheckpointEvery, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	l.SetStoreWrites(func() uint64 { return writes })
	for _, g := range goldenRecords() {
		writes = g.writes
		if err := l.Append(context.Background(), g.rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestGoldenLog: today's Log writes testdata/golden.log byte for byte from
// the golden records, and reads it back: every link, hash and checkpoint
// MAC holds, the records are those written, and a restart resumes its
// chain. A change here is a change of the audit log's format.
func TestGoldenLog(t *testing.T) {
	path := filepath.Join("testdata", "golden.log")
	written := filepath.Join(t.TempDir(), "audit.log")
	writeGolden(t, written)
	got, err := os.ReadFile(written)
	if err != nil {
		t.Fatal(err)
	}
	want := golden.File(t, path, got)
	compareLines(t, path, got, want)

	rep := verifyBytes(t, want, goldenMAC{})
	if rep != (Report{Lines: 11, Records: 8, Checkpoints: 3}) {
		t.Fatalf("%s verifies as %+v; want 11 lines, 8 records, 3 checkpoints, nothing unverified or bad", path, rep)
	}
	var read []Record
	if err := Records(bytes.NewReader(want), func(r Record) error { read = append(read, r); return nil }); err != nil {
		t.Fatal(err)
	}
	for i, g := range goldenRecords() {
		w := capped(g.rec)
		w.StoreWrites = g.writes
		if i >= len(read) || !reflect.DeepEqual(read[i], w) {
			t.Fatalf("record %d of %s reads back as\n%+v\nwant\n%+v", i+1, path, read[i], w)
		}
	}
	if !strings.Contains(string(want), `...(76 bytes more)`) {
		t.Fatal("the key name of 1100 bytes is not cut to 1024 saying how much was cut")
	}
	checkByTheDocs(t, path, want, 43)

	resumeGolden(t, path, want, 43)
}

// resumeGolden: keywardd resumes a golden log (a copy): its last
// checkpoint's MAC holds, its store count is the one it records, and the
// next line links to it.
func resumeGolden(t *testing.T, from string, log []byte, writes uint64) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(path, log, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Open(path, goldenMAC{}, macKey, Options{})
	if err != nil {
		t.Fatalf("today's Open refuses %s: %v", from, err)
	}
	if l.StoreWrites() != writes {
		t.Fatalf("%s resumed with the store's count %d; its last checkpoint says %d", from, l.StoreWrites(), writes)
	}
	if err := l.Append(context.Background(), goldenRecords()[0].rec); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	more, _ := os.ReadFile(path)
	if !bytes.HasPrefix(more, log) {
		t.Fatalf("resuming %s changed its lines", from)
	}
	if rep := verifyBytes(t, more, goldenMAC{}); rep.BadLine != 0 || rep.Unverified != 0 || rep.Lines != uint64(bytes.Count(log, []byte("\n"))+2) {
		t.Fatalf("%s with a record appended: %+v; want one record and one checkpoint more, all verified", from, rep)
	}
}

// TestGoldenLogV1: a log of checkpoints without store_writes (version 1,
// written before keyward recorded the store's count) still verifies and
// resumes. Today's Log no longer writes these; the file is made by
// checkByTheDocs's reading of docs/formats.md, not by the code under test.
func TestGoldenLogV1(t *testing.T) {
	path := filepath.Join("testdata", "golden-v1.log")
	want := golden.File(t, path, buildV1Log())
	compareLines(t, path, buildV1Log(), want)
	if rep := verifyBytes(t, want, goldenMAC{}); rep != (Report{Lines: 4, Records: 3, Checkpoints: 1}) {
		t.Fatalf("%s verifies as %+v; want 4 lines, 3 records, 1 checkpoint", path, rep)
	}
	checkByTheDocs(t, path, want, 0)
	resumeGolden(t, path, want, 0)
}

// buildV1Log is a log as keywardd wrote it before store_writes: three
// records and a checkpoint MACing "keyward audit checkpoint v1\x00" ||
// head || seq, chained by the documented hash, written without the code
// under test.
func buildV1Log() []byte {
	var out []byte
	var prev [32]byte
	add := func(seq uint64, kind, body string) {
		h := docLineHash(prev, seq, kind, []byte(body))
		out = fmt.Appendf(out, `{"seq":%d,"prev":"%x","kind":"%s","body":%s,"hash":"%x"}`+"\n", seq, prev, kind, body, h)
		prev = h
	}
	add(1, "record", `{"time":"2024-03-01T09:00:00Z","caller":{"uid":0,"gid":0},"op":"keywardd.start","outcome":"ok"}`)
	add(2, "record", `{"time":"2024-03-01T09:00:01Z","caller":{"uid":1000,"gid":1000,"pid":7,"exe":"/usr/bin/app"},"op":"EnvelopeService.Encrypt","key":"kek","version":1,"context_sha256":"6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d","outcome":"ok"}`)
	add(3, "record", `{"time":"2024-03-01T09:00:02Z","caller":{"uid":1000,"gid":1000,"pid":7,"exe":"/usr/bin/app"},"op":"KeyService.DestroyKey","key":"kek","outcome":"denied","code":"PermissionDenied","detail":"not granted"}`)
	add(4, "checkpoint", fmt.Sprintf(`{"key":"keyward-audit v1","mac":"%x"}`, docMAC(prev, 4, nil)))
	return out
}

// docLineHash is a line's hash as docs/formats.md defines it, written
// here apart from lineHash so that the two are held to each other.
func docLineHash(prev [32]byte, seq uint64, kind string, body []byte) [32]byte {
	b := append([]byte("keyward audit line v1\x00"), prev[:]...)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = append(append(append(b, kind...), 0), body...)
	return sha256.Sum256(b)
}

// docMAC is a checkpoint's MAC under goldenKey as docs/formats.md defines
// it: version 2 with the store's count, version 1 without.
func docMAC(head [32]byte, seq uint64, storeWrites *uint64) []byte {
	label := "keyward audit checkpoint v1\x00"
	if storeWrites != nil {
		label = "keyward audit checkpoint v2\x00"
	}
	in := binary.BigEndian.AppendUint64(append([]byte(label), head[:]...), seq)
	if storeWrites != nil {
		in = binary.BigEndian.AppendUint64(in, *storeWrites)
	}
	m := hmac.New(sha256.New, goldenKey)
	m.Write(in)
	return m.Sum(nil)
}

// checkByTheDocs reads a log as docs/formats.md describes it, without the
// code under test: seq from 1 without gaps, prev the hash before, hash
// over the body's bytes as they stand, each checkpoint's MAC (version 2
// with store_writes, version 1 without) by keyward-audit v1, and the last
// line's store count.
func checkByTheDocs(t *testing.T, name string, log []byte, lastWrites uint64) {
	t.Helper()
	var prev [32]byte
	var writes uint64
	for i, raw := range bytes.Split(bytes.TrimSuffix(log, []byte("\n")), []byte("\n")) {
		var ln struct {
			Seq  uint64          `json:"seq"`
			Prev string          `json:"prev"`
			Kind string          `json:"kind"`
			Body json.RawMessage `json:"body"`
			Hash string          `json:"hash"`
		}
		if err := json.Unmarshal(raw, &ln); err != nil {
			t.Fatalf("%s line %d: %v", name, i+1, err)
		}
		h := docLineHash(prev, ln.Seq, ln.Kind, ln.Body)
		switch {
		case ln.Seq != uint64(i+1):
			t.Fatalf("%s line %d: seq %d", name, i+1, ln.Seq)
		case ln.Prev != hex.EncodeToString(prev[:]):
			t.Fatalf("%s line %d: prev is not the hash of the line before", name, i+1)
		case ln.Hash != hex.EncodeToString(h[:]):
			t.Fatalf("%s line %d: hash is not SHA-256 of the documented input", name, i+1)
		}
		var body struct {
			Key         string  `json:"key"`
			MAC         string  `json:"mac"`
			StoreWrites *uint64 `json:"store_writes"`
		}
		json.Unmarshal(ln.Body, &body)
		if body.StoreWrites != nil {
			writes = *body.StoreWrites
		}
		if ln.Kind == "checkpoint" && (body.Key != "keyward-audit v1" || body.MAC != hex.EncodeToString(docMAC(prev, ln.Seq, body.StoreWrites))) {
			t.Fatalf("%s line %d: the checkpoint's key or MAC is not the documented one", name, i+1)
		}
		prev = h
	}
	if writes != lastWrites {
		t.Fatalf("%s ends with the store's count %d, want %d", name, writes, lastWrites)
	}
}

func verifyBytes(t *testing.T, log []byte, mac MACer) Report {
	t.Helper()
	rep, err := Verify(context.Background(), bytes.NewReader(log), mac)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// compareLines fails naming the first line that differs from the golden
// file, and which of its fields (and which fields of its body) changed.
func compareLines(t *testing.T, path string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	gl, wl := bytes.SplitAfter(got, []byte("\n")), bytes.SplitAfter(want, []byte("\n"))
	for i := range max(len(gl), len(wl)) {
		if i >= len(gl) || i >= len(wl) {
			t.Fatalf("the audit log's format changed: %d lines written, %s has %d (go test -update rewrites it; a change there is a format change)", len(gl), path, len(wl))
		}
		if !bytes.Equal(gl[i], wl[i]) {
			t.Fatalf("the audit log's format changed at line %d of %s, fields %s:\n got %s\nwant %s(go test -update rewrites it; a change there is a format change)",
				i+1, path, changedFields(gl[i], wl[i]), gl[i], wl[i])
		}
	}
}

// changedFields names the fields of two JSON lines that differ: the
// line's own, and body.NAME for its body's.
func changedFields(got, want []byte) string {
	var g, w map[string]json.RawMessage
	if json.Unmarshal(got, &g) != nil || json.Unmarshal(want, &w) != nil {
		return "(not JSON)"
	}
	var gb, wb map[string]json.RawMessage
	json.Unmarshal(g["body"], &gb)
	json.Unmarshal(w["body"], &wb)
	var out []string
	for _, f := range []struct {
		prefix string
		g, w   map[string]json.RawMessage
	}{{"", g, w}, {"body.", gb, wb}} {
		for k := range f.w {
			if _, ok := f.g[k]; !ok {
				out = append(out, f.prefix+k+" (gone)")
			}
		}
		for k, v := range f.g {
			if wv, ok := f.w[k]; !ok {
				out = append(out, f.prefix+k+" (new)")
			} else if !bytes.Equal(v, wv) && (f.prefix != "" || k != "body") {
				out = append(out, f.prefix+k)
			}
		}
	}
	if len(out) == 0 {
		return "none (the same fields and values, in another order or spacing)"
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}
