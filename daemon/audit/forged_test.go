package audit

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// appendForged appends a chained (unkeyed) line after the file's last line.
func appendForged(t *testing.T, path, kind string, body []byte) {
	b, _ := os.ReadFile(path)
	lines := bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	var last line
	json.Unmarshal(lines[len(lines)-1], &last)
	prev, _ := hex.DecodeString(last.Hash)
	hash := lineHash([32]byte(prev), last.Seq+1, kind, body)
	forged, _ := json.Marshal(line{Seq: last.Seq + 1, Prev: last.Hash, Kind: kind, Body: body, Hash: hex.EncodeToString(hash[:])})
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(append(forged, '\n'))
	f.Close()
}

// rewriteLastCheckpoint replaces from with to in the body of the log's last
// line, a checkpoint, and makes the line's hash anew: what someone without
// the HSM key can do.
func rewriteLastCheckpoint(t *testing.T, path, from, to string) {
	t.Helper()
	b, _ := os.ReadFile(path)
	lines := bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	var last line
	json.Unmarshal(lines[len(lines)-1], &last)
	if last.Kind != "checkpoint" {
		t.Fatalf("the log ends with a %s", last.Kind)
	}
	last.Body = bytes.Replace(last.Body, []byte(from), []byte(to), 1)
	prev, _ := hex.DecodeString(last.Prev)
	hash := lineHash([32]byte(prev), last.Seq, last.Kind, last.Body)
	last.Hash = hex.EncodeToString(hash[:])
	lines[len(lines)-1], _ = json.Marshal(last)
	os.WriteFile(path, append(bytes.Join(lines, []byte("\n")), '\n'), 0o600)
}

// base writes three records with the store at write 500, and a checkpoint.
func base(t *testing.T) (string, MACer) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{})
	l.SetStoreWrites(func() uint64 { return 500 })
	for i := range 3 {
		l.Append(context.Background(), rec(i))
	}
	l.Close()
	return path, h
}

// TestForgedLastLine: a line appended by someone without the HSM key (the
// chain's hashes are not keyed) that records no store count does not lower
// the count the log vouches for: the last checkpoint's, MACed, holds.
func TestForgedLastLine(t *testing.T) {
	path, h := base(t)
	body, _ := json.Marshal(Record{Op: "KeyService.GetKey", Outcome: "ok"})
	appendForged(t, path, "record", body)
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := l.StoreWrites(); got != 500 {
		t.Fatalf("after a forged last line the log vouches for write %d, want 500", got)
	}
}

// TestForgedCheckpointRefused: a last checkpoint whose MAC is wrong (its
// count edited, its line's hash made anew) stops Open with ErrDamaged.
func TestForgedCheckpointRefused(t *testing.T) {
	path, h := base(t)
	rewriteLastCheckpoint(t, path, `"store_writes":500`, `"store_writes":1`)
	if _, err := Open(path, h, macKey, Options{}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a forged checkpoint: %v", err)
	}
}

// TestForgedV1CheckpointRefused: a checkpoint of the old form (no store
// count) is MAC-checked too: one forged after the last genuine checkpoint
// stops Open.
func TestForgedV1CheckpointRefused(t *testing.T) {
	path, h := base(t)
	appendForged(t, path, "checkpoint", []byte(`{"key":"keyward-audit v1","mac":"00"}`))
	body, _ := json.Marshal(Record{Op: "KeyService.GetKey", Outcome: "ok", StoreWrites: 3})
	appendForged(t, path, "record", body)
	if _, err := Open(path, h, macKey, Options{}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a forged old-form checkpoint: %v", err)
	}
}

// TestCheckpointBeyondTheTail: a record of a MiB appended (by someone
// without the key) pushes the last checkpoint out of the tail keywardd reads
// first; it is found all the same and its count holds; and keyward audit
// verify names the line whose count went down.
func TestCheckpointBeyondTheTail(t *testing.T) {
	path, h := base(t)
	big, _ := json.Marshal(Record{Op: "KeyService.GetKey", Outcome: "ok", StoreWrites: 500, Detail: strings.Repeat("x", 1<<20-600)})
	appendForged(t, path, "record", big)
	body, _ := json.Marshal(Record{Op: "KeyService.GetKey", Outcome: "ok", StoreWrites: 3})
	appendForged(t, path, "record", body)
	l, err := Open(path, h, macKey, Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := l.StoreWrites()
	l.Close()
	if got != 500 {
		t.Fatalf("the count after the checkpoint was pushed out of the tail: %d, want 500", got)
	}
	if rep := verify(t, path, h); !strings.Contains(rep.Problem, "write count goes down") {
		t.Fatalf("verify: %+v", rep)
	}
}

// TestLongFieldsCut: a caller's key name as long as a request does not make
// a line longer than the tail keywardd reads at start.
func TestLongFieldsCut(t *testing.T) {
	h := macHSM(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, _ := Open(path, h, macKey, Options{})
	r := rec(0)
	r.Key, r.Detail = strings.Repeat("k", 4<<20), strings.Repeat("\x01", 1<<20)
	if err := l.Append(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	l.Close()
	b, _ := os.ReadFile(path)
	for _, ln := range bytes.Split(b, []byte("\n")) {
		if len(ln) > 16<<10 {
			t.Fatalf("a line of %d bytes", len(ln))
		}
	}
	if _, err := Open(path, h, macKey, Options{}); err != nil {
		t.Fatal(err)
	}
}
