package store

import (
	"bytes"
	"fmt"
)

// Sealer seals and opens records exactly as Store does (seal.go): a
// record's stored form is 0x01 || tag || record, the tag an HMAC of the
// bucket, the key and the record under a key derived from the store key,
// so that a value changed, or moved to another key or bucket, does not
// verify. It is exported for the other backends under daemon/store/...
// (the etcd one), which keep records where others can write them.
type Sealer struct{ s *sealer }

// NewSealer is a Sealer under the store key (KeySize bytes).
func NewSealer(key []byte) (*Sealer, error) {
	s, err := newSealer(key)
	if err != nil {
		return nil, err
	}
	return &Sealer{s}, nil
}

// Seal returns the stored form of rec under bucket and key.
func (s *Sealer) Seal(bucket, key string, rec []byte) []byte {
	out, _ := s.s.seal([]byte(bucket), []byte(key), rec)
	return out
}

// Open checks a stored value v of bucket and key and returns a copy of its
// record, or an error matching ErrDamaged.
func (s *Sealer) Open(bucket, key string, v []byte) ([]byte, error) {
	rec, _, err := s.s.open([]byte(bucket), []byte(key), v)
	if err != nil {
		return nil, fmt.Errorf("%w: the record %q of the bucket %q: %v", ErrDamaged, key, bucket, err)
	}
	return bytes.Clone(rec), nil
}

// Element is a stored value's share of a digest of the whole content, as
// Store keeps one (seal.go): a keyed hash of its tag, to XOR over every
// record. A value too short to hold a tag has the share of a zero tag
// (it does not open anyway).
func (s *Sealer) Element(v []byte) [32]byte {
	var t [tagSize]byte
	if len(v) >= sealOverhead {
		copy(t[:], v[1:sealOverhead])
	}
	return s.s.element(t)
}

// Mask is a one-time pad for a digest stored where others can read it,
// keyed under the store key and drawn for nonce: a digest is linear (an
// XOR), so one shown in the clear would let someone who reads the
// history find a set of changes that undo one another's shares.
func (s *Sealer) Mask(nonce []byte) [32]byte {
	m := s.s.pool.Get().(*macs)
	defer s.s.pool.Put(m)
	m.set.Reset()
	m.set.Write(maskLabel)
	m.set.Write(nonce)
	return m.sumOf(m.set)
}

var maskLabel = []byte("keyward store digest mask v1\x00")
