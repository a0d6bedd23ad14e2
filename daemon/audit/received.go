package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
)

// KindFiltered is the kind of a stub: a record a sink's filter left out of
// what it shipped, reduced to its place in the chain (seq, prev, hash), so
// that the chain of what a receiver got still verifies. A stub holds no
// content. The local log never holds one: Verify refuses it there.
const KindFiltered = "filtered"

// ShippedLine is what a sink needs to know of one line of the log to ship
// it: its place in the chain and, for a record, its operation.
type ShippedLine struct {
	Seq  uint64
	Prev string
	Kind string
	Hash string
	Op   string // a record's op; empty for a checkpoint
}

// ParseShipped reads one line of the log (without its newline).
func ParseShipped(b []byte) (ShippedLine, error) {
	var ln struct {
		line
		Body struct {
			Op string `json:"op"`
		} `json:"body"`
	}
	if err := json.Unmarshal(b, &ln); err != nil {
		return ShippedLine{}, fmt.Errorf("audit: a line that does not parse: %w", err)
	}
	prev, err1 := hex.DecodeString(ln.Prev)
	hash, err2 := hex.DecodeString(ln.Hash)
	if ln.Seq == 0 || err1 != nil || err2 != nil || len(prev) != 32 || len(hash) != 32 {
		return ShippedLine{}, errors.New("audit: a line without its seq, or whose prev or hash is not 64 hex digits")
	}
	return ShippedLine{Seq: ln.Seq, Prev: ln.Prev, Kind: ln.Kind, Hash: ln.Hash, Op: ln.Body.Op}, nil
}

// Stub is the line a sink ships in place of a record its filter leaves
// out: {"seq":N,"prev":"...","kind":"filtered","hash":"..."}, no body.
func (s ShippedLine) Stub() []byte {
	return fmt.Appendf(nil, `{"seq":%d,"prev":"%s","kind":"%s","hash":"%s"}`, s.Seq, s.Prev, KindFiltered, s.Hash) // hex: nothing to escape
}

// SeqRange is a run of sequence numbers, both ends included.
type SeqRange struct {
	From uint64 `json:"from"`
	To   uint64 `json:"to"`
}

// Fault is a line that does not hold, by its sequence number (or, for a
// line that does not parse, its line number in what was received).
type Fault struct {
	Seq  uint64 `json:"seq,omitempty"`
	Line uint64 `json:"line,omitempty"`
	Why  string `json:"why"`
}

// Received is what VerifyReceived found in what a receiver got.
type Received struct {
	Lines       uint64 `json:"lines"`       // audit lines read, duplicates included
	Ignored     uint64 `json:"ignored"`     // lines holding no audit line (other messages of a syslog file)
	Records     uint64 `json:"records"`     // distinct records, stubs not counted
	Checkpoints uint64 `json:"checkpoints"` // distinct checkpoints
	// Filtered counts the stubs: lines that hold a record's place in the
	// chain (seq, prev, hash) and none of its content. A sink's filter
	// ships them for the records it leaves out; but a stub is not bound to
	// the record it stands for (whoever can write at the receiver can
	// replace any record by its stub, and the chain still holds), so a stub
	// is a fault unless ReceivedOptions.Filtered says the sink filters.
	Filtered uint64 `json:"filtered"`
	// Stubs are the runs of sequence numbers received as stubs.
	Stubs []SeqRange `json:"stubs,omitempty"`
	// StubsExpected: the operator said the sink filters
	// (ReceivedOptions.Filtered), so stubs are not faults.
	StubsExpected bool `json:"stubsExpected"`
	// Duplicates counts lines received again, byte for byte (a sink ships
	// at least once: a batch not acknowledged is shipped again).
	Duplicates uint64 `json:"duplicates"`
	// FirstSeq and LastSeq are the lowest and highest sequence numbers
	// received. What was before or after them is not the stream's to tell:
	// records deleted at either end are found only against the range the
	// operator says the receiver holds (ReceivedOptions.From, Through).
	FirstSeq uint64 `json:"firstSeq"`
	LastSeq  uint64 `json:"lastSeq"`
	// Missing are the runs of sequence numbers that were not received:
	// between FirstSeq and LastSeq, and between them and
	// ReceivedOptions.From and Through when given.
	Missing []SeqRange `json:"missing,omitempty"`
	// Altered are the lines that were changed: their hash does not match
	// their content, the line after them does not link to them, two
	// different lines share their number, or a checkpoint's MAC fails.
	Altered []Fault `json:"altered,omitempty"`
	// Malformed are the received lines that look like audit lines but do
	// not parse.
	Malformed []Fault `json:"malformed,omitempty"`
	// Reordered counts lines received after a line with a higher sequence
	// number; FirstReordered is the first such line's seq. The chain is
	// checked in sequence order all the same. With
	// ReceivedOptions.AnyOrder nothing is counted here.
	Reordered      uint64 `json:"reordered"`
	FirstReordered uint64 `json:"firstReordered,omitempty"`
	// MACsChecked: the checkpoints' MACs were checked with the HSM key.
	MACsChecked bool `json:"macsChecked"`
	// Unverified counts the records after the last checkpoint whose MAC
	// was checked (every record without the HSM key).
	Unverified uint64 `json:"unverified"`
	// TailTooLong: with the HSM key, more records follow the last checked
	// checkpoint than keywardd leaves (MaxTail), as Verify says of the
	// local log: the stream's end was cut or rewritten, or the HSM could
	// not MAC for a long time.
	TailTooLong bool `json:"tailTooLong"`
}

// OK says whether the stream is whole between FirstSeq and LastSeq (and
// the range ReceivedOptions named), in order, unchanged: nothing missing,
// altered, malformed or reordered, no tail too long, and no stub unless
// the sink was said to filter. Duplicates are not faults.
func (r Received) OK() bool {
	return len(r.Missing) == 0 && len(r.Altered) == 0 && len(r.Malformed) == 0 && r.Reordered == 0 &&
		(r.Filtered == 0 || r.StubsExpected) && !r.TailTooLong
}

// ReceivedOptions say what the operator knows of the stream that
// VerifyReceived cannot tell from its lines. The zero value: the sink does
// not filter, the lines came in the order shipped, and no range is known.
type ReceivedOptions struct {
	// Filtered: the sink has a filter (exclude_ops), so stubs are what it
	// left out and not faults.
	Filtered bool
	// AnyOrder: the lines carry no arrival order (an export of a SIEM,
	// often newest first): they are not checked for it.
	AnyOrder bool
	// From and Through, when not 0, are the first and last sequence numbers
	// the receiver should hold: what is absent before FirstSeq or after
	// LastSeq is reported missing.
	From, Through uint64
}

// maxReceivedLine is the longest line VerifyReceived reads: an audit line
// (at most maxLine) with a syslog header before it.
const maxReceivedLine = maxLine + 64<<10

// receivedLine is what VerifyReceived keeps of each line: about 200 bytes.
type receivedLine struct {
	prev, hash [32]byte
	kind       string
	fault      string   // why it does not hold on its own: its hash, or its form; "" if it does
	digest     [32]byte // of the whole line, to tell a duplicate from a conflict
	mac        []byte   // a checkpoint's
	key        string   // a checkpoint's key label
	storeW     *uint64  // a checkpoint's store_writes
}

// VerifyReceived checks what a receiver got from a sink: the lines of a
// newline-JSON file sink, or of a file where a syslog receiver wrote the
// messages (each line's audit line is found from its `{"seq":`, whatever
// header comes before it; lines without one are counted as ignored). It
// sorts the lines by sequence number, drops exact duplicates, and reports
// what is missing, altered, malformed, reordered or filtered, checking
// every hash and link and, given a MACer, every checkpoint's MAC. It holds
// about 200 bytes per line in memory.
func VerifyReceived(ctx context.Context, r io.Reader, mac MACer) (Received, error) {
	return VerifyReceivedWith(ctx, r, mac, ReceivedOptions{})
}

// VerifyReceivedWith is VerifyReceived told what the operator knows of the
// stream: whether the sink filters, whether arrival order means anything,
// and what range the receiver should hold.
func VerifyReceivedWith(ctx context.Context, r io.Reader, mac MACer, o ReceivedOptions) (Received, error) {
	if o.From != 0 && o.Through != 0 && o.From > o.Through {
		return Received{}, fmt.Errorf("audit: the range to hold starts at %d, after its end %d", o.From, o.Through)
	}
	rep := Received{StubsExpected: o.Filtered}
	got := map[uint64]*receivedLine{}
	var maxSeq uint64
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxReceivedLine)
	for n := uint64(1); sc.Scan(); n++ {
		if n%4096 == 0 && ctx.Err() != nil {
			return rep, ctx.Err()
		}
		text := sc.Bytes()
		i := bytes.Index(text, []byte(`{"seq":`))
		if i < 0 {
			if len(bytes.TrimSpace(text)) > 0 {
				rep.Ignored++
			}
			continue
		}
		text = bytes.TrimRight(text[i:], " \t\r")
		var ln line
		if err := json.Unmarshal(text, &ln); err != nil || ln.Seq == 0 {
			rep.Malformed = append(rep.Malformed, Fault{Line: n, Why: "an audit line that does not parse"})
			continue
		}
		rep.Lines++
		e, why := parseReceived(ln, text)
		if why != "" {
			rep.Malformed = append(rep.Malformed, Fault{Seq: ln.Seq, Line: n, Why: why})
			continue
		}
		if old, ok := got[ln.Seq]; ok {
			if old.digest == e.digest {
				rep.Duplicates++ // shipped again after a retry: neither a fault nor out of order
			} else {
				rep.Altered = append(rep.Altered, Fault{Seq: ln.Seq, Why: "two different lines with this sequence number were received"})
			}
			continue
		}
		if ln.Seq < maxSeq && !o.AnyOrder {
			if rep.Reordered == 0 {
				rep.FirstReordered = ln.Seq
			}
			rep.Reordered++
		}
		maxSeq = max(maxSeq, ln.Seq)
		got[ln.Seq] = e
	}
	if err := sc.Err(); err != nil {
		return rep, fmt.Errorf("audit: reading what was received: %w", err)
	}
	seqs := slices.Sorted(func(yield func(uint64) bool) {
		for s := range got {
			if !yield(s) {
				return
			}
		}
	})
	if len(seqs) == 0 {
		if o.From != 0 || o.Through != 0 {
			from := max(o.From, 1)
			rep.Missing = []SeqRange{{From: from, To: max(from, o.Through)}}
		}
		return rep, nil
	}
	rep.FirstSeq, rep.LastSeq, rep.MACsChecked = seqs[0], seqs[len(seqs)-1], mac != nil
	if o.From != 0 && o.From < rep.FirstSeq {
		rep.Missing = append(rep.Missing, SeqRange{From: o.From, To: rep.FirstSeq - 1})
	}
	altered := map[uint64]bool{}
	for _, f := range rep.Altered {
		altered[f.Seq] = true
	}
	alter := func(seq uint64, why string) {
		if !altered[seq] {
			altered[seq] = true
			rep.Altered = append(rep.Altered, Fault{Seq: seq, Why: why})
		}
	}
	for i, seq := range seqs {
		e := got[seq]
		if i > 0 {
			if p := seqs[i-1]; p != seq-1 {
				rep.Missing = append(rep.Missing, SeqRange{From: p + 1, To: seq - 1})
			} else if got[p].hash != e.prev {
				alter(p, "the line after it does not link to it: it was changed (and its hash made to match)")
			}
		}
		if e.fault != "" {
			alter(seq, e.fault)
			continue
		}
		switch e.kind {
		case "record":
			rep.Records++
			rep.Unverified++
		case KindFiltered:
			rep.Filtered++
			rep.Unverified++
			if n := len(rep.Stubs); n > 0 && rep.Stubs[n-1].To == seq-1 {
				rep.Stubs[n-1].To = seq
			} else {
				rep.Stubs = append(rep.Stubs, SeqRange{From: seq, To: seq})
			}
		case "checkpoint":
			rep.Checkpoints++
			if mac == nil {
				continue
			}
			id, err := parseKeyLabel(e.key)
			if err != nil || id.Name != KeyName {
				alter(seq, "a checkpoint that names no key, or another key than "+KeyName)
				continue
			}
			want, err := mac.HMACSHA256(ctx, id, macInput(e.prev, seq, e.storeW))
			if err != nil {
				return rep, fmt.Errorf("audit: computing the MAC of the checkpoint at seq %d: %w", seq, err)
			}
			if !hmac.Equal(e.mac, want) {
				alter(seq, "the checkpoint's MAC is wrong: the chain before it was rewritten")
				continue
			}
			rep.Unverified = 0
		}
	}
	if o.Through > rep.LastSeq {
		rep.Missing = append(rep.Missing, SeqRange{From: rep.LastSeq + 1, To: o.Through})
	}
	rep.TailTooLong = mac != nil && rep.Unverified > MaxTail
	slices.SortFunc(rep.Altered, func(a, b Fault) int { return cmpUint(a.Seq, b.Seq) })
	return rep, nil
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// parseReceived checks one received line on its own, or says why it is
// malformed.
func parseReceived(ln line, text []byte) (*receivedLine, string) {
	e := &receivedLine{kind: ln.Kind, digest: sha256.Sum256(text)}
	prev, err1 := hex.DecodeString(ln.Prev)
	hash, err2 := hex.DecodeString(ln.Hash)
	if err1 != nil || err2 != nil || len(prev) != 32 || len(hash) != 32 {
		return nil, "its prev or hash is not 64 hex digits"
	}
	e.prev, e.hash = [32]byte(prev), [32]byte(hash)
	switch ln.Kind {
	case KindFiltered:
		if len(ln.Body) != 0 {
			return nil, "a stub of a filtered record with a body"
		}
		stub := ShippedLine{Seq: ln.Seq, Prev: hex.EncodeToString(prev), Hash: hex.EncodeToString(hash)}.Stub()
		if !bytes.Equal(text, stub) {
			e.fault = errNotCanonical
		}
		return e, ""
	case "record":
		var rec Record
		if json.Unmarshal(ln.Body, &rec) != nil {
			return nil, "a record that does not parse"
		}
	case "checkpoint":
		var cp checkpoint
		if json.Unmarshal(ln.Body, &cp) != nil {
			return nil, "a checkpoint that does not parse"
		}
		e.mac, _ = hex.DecodeString(cp.MAC)
		e.key, e.storeW = cp.Key, cp.StoreWrites
	default:
		return nil, fmt.Sprintf("unknown line kind %q", ln.Kind)
	}
	switch {
	case !canonical(text, ln.Seq, e.prev, ln.Kind, ln.Body, e.hash):
		e.fault = errNotCanonical
	case lineHash(e.prev, ln.Seq, ln.Kind, ln.Body) != e.hash:
		e.fault = "its hash does not match its content: the line was changed"
	}
	return e, ""
}

// errNotCanonical says why a line that is not the bytes keywardd writes
// is a fault: JSON readers differ on such a line (a key twice, a key in
// other case, a field added), so what a SIEM shows may not be what the
// hash covers.
const errNotCanonical = "it is not the bytes keywardd writes (a key repeated, in another case or added, or other spacing): the line was rewritten"

// canonical says whether text is exactly the line keywardd writes for
// these fields (appendLine's bytes, without the newline).
func canonical(text []byte, seq uint64, prev [32]byte, kind string, body []byte, hash [32]byte) bool {
	want := appendLine(make([]byte, 0, len(text)+1), seq, prev, kind, body, hash)
	return bytes.Equal(text, want[:len(want)-1])
}
