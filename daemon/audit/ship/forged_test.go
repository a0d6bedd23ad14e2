package ship_test

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/audit/ship"
)

// TestReceiverSideForgery: what someone who can write at the receiver does
// to hide a KeyService.DestroyKey from a file sink with no filter, and what
// audit.VerifyReceivedWith says of it, with the HSM.
func TestReceiverSideForgery(t *testing.T) {
	l := newLog(t)
	out := filepath.Join(t.TempDir(), "shipped.jsonl")
	s, _ := start(t, l, t.TempDir(), ship.SinkConfig{Name: "archive", Type: ship.TypeFile, Path: out})
	l.add(t, 5, "EnvelopeService.Decrypt")
	l.add(t, 1, "KeyService.DestroyKey") // the act to hide
	l.add(t, 20, "EnvelopeService.Decrypt")
	caughtUp(t, l, s)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	last := l.State().LastSeq
	if uint64(len(lines)) != last {
		t.Fatalf("%d lines shipped of %d", len(lines), last)
	}
	destroy := slices.IndexFunc(lines, func(ln []byte) bool { return bytes.Contains(ln, []byte("KeyService.DestroyKey")) })
	if destroy < 0 {
		t.Fatal("no DestroyKey line")
	}
	with := func(i int, ln []byte) []byte {
		ls := slices.Clone(lines)
		ls[i] = ln
		return append(bytes.Join(ls, []byte("\n")), '\n')
	}
	sl, err := audit.ParseShipped(lines[destroy])
	if err != nil {
		t.Fatal(err)
	}
	// The real body under "BODY", which Go's encoding/json reads (case
	// insensitive, the last wins), a fake one under "body", which jq or a
	// SIEM reads.
	dl := lines[destroy]
	i, j := bytes.Index(dl, []byte(`"body":`)), bytes.Index(dl, []byte(`,"hash":`))
	real := dl[i+len(`"body":`) : j]
	fake := bytes.Replace(real, []byte("KeyService.DestroyKey"), []byte("KeyService.GetKeyInfo"), 1)
	twoBodies := slices.Concat(dl[:i], []byte(`"body":`), fake, []byte(`,"BODY":`), real, dl[j:])

	for _, tc := range []struct {
		name string
		got  []byte
		opts audit.ReceivedOptions
		bad  func(r audit.Received) bool // says whether r names the fault
	}{
		{"the record replaced by its stub", with(destroy, sl.Stub()), audit.ReceivedOptions{},
			func(r audit.Received) bool {
				return slices.Equal(r.Stubs, []audit.SeqRange{{From: sl.Seq, To: sl.Seq}})
			}},
		{"the record's body under another key", with(destroy, twoBodies), audit.ReceivedOptions{},
			func(r audit.Received) bool {
				return len(r.Altered) == 1 && r.Altered[0].Seq == sl.Seq && strings.Contains(r.Altered[0].Why, "not the bytes keywardd writes")
			}},
		{"the last 12 lines cut", append(bytes.Join(lines[:len(lines)-12], []byte("\n")), '\n'), audit.ReceivedOptions{From: 1, Through: last},
			func(r audit.Received) bool {
				return slices.Equal(r.Missing, []audit.SeqRange{{From: last - 11, To: last}})
			}},
		{"the first 12 lines cut", append(bytes.Join(lines[12:], []byte("\n")), '\n'), audit.ReceivedOptions{From: 1, Through: last},
			func(r audit.Received) bool { return slices.Equal(r.Missing, []audit.SeqRange{{From: 1, To: 12}}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := received(t, bytes.NewReader(tc.got), l.h, tc.opts)
			if r.OK() || !tc.bad(r) || !r.MACsChecked {
				t.Errorf("%+v", r)
			}
		})
	}
	if r := received(t, bytes.NewReader(b), l.h, audit.ReceivedOptions{From: 1, Through: last}); !r.OK() || r.Unverified != 0 {
		t.Errorf("what was shipped, unchanged: %+v", r)
	}
}
