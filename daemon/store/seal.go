package store

// How records are authenticated (docs/formats.md, "The store").
//
// Every value is stored as 0x01 || tag || record, where tag is an
// HMAC-SHA256 of the bucket, the key and the record: a changed value, or a
// value moved to another key or bucket, does not verify. Tags alone cannot
// show a record that was removed, nor one put back as it was before (an old
// page of the file, a damaged pointer to it, an older copy of the file). So
// the store also keeps a digest of its whole content: the XOR, over every
// record, of a second keyed hash of its tag (and of each bucket's sequence
// number), together with a count of the writes made, MACed in the integrity
// record of the meta bucket. Open reads every record and refuses the file
// unless the digest it computes is the one MACed; each write updates the
// digest and the count in the same transaction. The digest itself is never
// written, only its MAC, so the XOR of the per-record hashes (which are
// secret too) cannot be steered by someone who can read and edit the file.
// The write count lets keywardd compare the store with its audit log, whose
// lines record it: a store behind its audit log is refused as rolled back.

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sync"
)

const (
	sealVersion  = 1
	tagSize      = sha256.Size
	sealOverhead = 1 + tagSize
	integrityKey = "integrity"
)

// KeySize is the size of the key Open takes.
const KeySize = 32

// sealer computes tags and digest elements under the store's key.
type sealer struct {
	rec, set []byte // the record and set keys, derived from the store key
	pool     sync.Pool
}

// macs are one goroutine's HMACs, and room for what they write and sum:
// a record's check makes no allocation (the start-up check runs it for
// every record).
type macs struct {
	rec, set hash.Hash
	n        [8]byte
	sum      [sha256.Size]byte
}

// The labels that open each MAC's input.
var (
	recordLabel   = []byte("keyward store record v1\x00")
	elementLabel  = []byte("keyward store element v1\x00")
	sequenceLabel = []byte("keyward store sequence v1\x00")
)

func newSealer(key []byte) (*sealer, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("store: a key of %d bytes; it takes %d", len(key), KeySize)
	}
	derive := func(label string) []byte {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(label))
		return m.Sum(nil)
	}
	s := &sealer{rec: derive("keyward store v1 record key"), set: derive("keyward store v1 set key")}
	s.pool.New = func() any { return &macs{rec: hmac.New(sha256.New, s.rec), set: hmac.New(sha256.New, s.set)} }
	return s, nil
}

func (m *macs) writeField(h hash.Hash, b []byte) {
	binary.BigEndian.PutUint32(m.n[:4], uint32(len(b)))
	h.Write(m.n[:4])
	h.Write(b)
}

// sumOf is h's sum, through m's buffer.
func (m *macs) sumOf(h hash.Hash) (out [sha256.Size]byte) {
	copy(out[:], h.Sum(m.sum[:0]))
	return out
}

// tag binds a record to its bucket and key.
func (s *sealer) tag(bucket, key, rec []byte) [tagSize]byte {
	m := s.pool.Get().(*macs)
	defer s.pool.Put(m)
	m.rec.Reset()
	m.rec.Write(recordLabel)
	m.writeField(m.rec, bucket)
	m.writeField(m.rec, key)
	m.rec.Write(rec)
	return m.sumOf(m.rec)
}

// seal returns the stored form of rec.
func (s *sealer) seal(bucket, key, rec []byte) ([]byte, [tagSize]byte) {
	t := s.tag(bucket, key, rec)
	out := make([]byte, 0, sealOverhead+len(rec))
	out = append(append(append(out, sealVersion), t[:]...), rec...)
	return out, t
}

// errTag: a stored value that does not verify.
var errTag = errors.New("its tag does not verify")

// open checks a stored value and returns its record (a sub-slice of v)
// and its tag.
func (s *sealer) open(bucket, key, v []byte) ([]byte, [tagSize]byte, error) {
	var t [tagSize]byte
	if len(v) < sealOverhead || v[0] != sealVersion {
		return nil, t, errTag
	}
	want := s.tag(bucket, key, v[sealOverhead:])
	copy(t[:], v[1:sealOverhead])
	if !hmac.Equal(want[:], t[:]) {
		return nil, t, errTag
	}
	return v[sealOverhead:], t, nil
}

// digest is the XOR of the set elements of every record and sequence.
type digest [sha256.Size]byte

func (d *digest) xor(e [sha256.Size]byte) {
	for i := range d {
		d[i] ^= e[i]
	}
}

// element is a record's share of the digest.
func (s *sealer) element(tag [tagSize]byte) [sha256.Size]byte {
	m := s.pool.Get().(*macs)
	defer s.pool.Put(m)
	m.set.Reset()
	m.set.Write(elementLabel)
	copy(m.sum[:], tag[:]) // tag itself would escape to the heap
	m.set.Write(m.sum[:])
	return m.sumOf(m.set)
}

// sequence is a bucket's sequence number's share of the digest.
func (s *sealer) sequence(bucket []byte, seq uint64) [sha256.Size]byte {
	m := s.pool.Get().(*macs)
	defer s.pool.Put(m)
	m.set.Reset()
	m.set.Write(sequenceLabel)
	m.writeField(m.set, bucket)
	binary.BigEndian.PutUint64(m.n[:], seq)
	m.set.Write(m.n[:])
	return m.sumOf(m.set)
}

// integrity is the stored integrity record: the write count and the MAC of
// the count and the digest.
func (s *sealer) integrity(writes uint64, d *digest) []byte {
	out := append([]byte{sealVersion}, binary.BigEndian.AppendUint64(nil, writes)...)
	return append(out, s.integrityMAC(writes, d)...)
}

func (s *sealer) integrityMAC(writes uint64, d *digest) []byte {
	m := hmac.New(sha256.New, s.rec)
	m.Write([]byte("keyward store integrity v1\x00"))
	m.Write(binary.BigEndian.AppendUint64(nil, writes))
	m.Write(d[:])
	return m.Sum(nil)
}

// checkIntegrity checks a stored integrity record against the digest
// computed from the records, and returns its write count.
func (s *sealer) checkIntegrity(v []byte, d *digest) (uint64, error) {
	if len(v) != 1+8+sha256.Size || v[0] != sealVersion {
		return 0, errors.New("the integrity record is malformed")
	}
	writes := binary.BigEndian.Uint64(v[1:])
	if !hmac.Equal(v[9:], s.integrityMAC(writes, d)) {
		return writes, errors.New("the records are not those the integrity record vouches for: a record was changed, removed, added or put back as it was before")
	}
	return writes, nil
}
