package envelope

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"unicode/utf8"

	"github.com/keyward/keyward/hsm"
)

// The wire format of a ciphertext, version 1 (docs/formats.md):
//
//	magic    3 bytes  "kwe"
//	format   1 byte   1
//	nameLen  1 byte   1..64
//	name     nameLen bytes: the key's name
//	version  4 bytes  big-endian key version, >= 1
//	nonce    12 bytes
//	sealed   the AES-256-GCM ciphertext and its 16-byte tag
//
// Everything before the nonce is the header. The header and the canonical
// encoding of the encryption context are the additional authenticated data,
// so changing either, or moving a ciphertext to another key, name or version,
// fails authentication.
const (
	magic         = "kwe"
	FormatVersion = 1
	NonceSize     = 12
	TagSize       = 16
	maxNameLen    = 64
)

// Context limits: an encryption context is small, sorted key/value metadata.
const (
	MaxContextEntries  = 64
	MaxContextKeyLen   = 256
	MaxContextValueLen = 1024
)

// Errors of the format. Callers match them with errors.Is.
var (
	// ErrFormat: the bytes are not a keyward ciphertext of a format this
	// version reads.
	ErrFormat = errors.New("envelope: not a keyward ciphertext")
	// ErrContext: the encryption context breaks a limit.
	ErrContext = errors.New("envelope: invalid encryption context")
)

// Header names the key version a ciphertext was sealed under.
type Header struct {
	KeyName    string
	KeyVersion uint32
}

// Ciphertext is a parsed keyward ciphertext.
type Ciphertext struct {
	Header
	Nonce  []byte // NonceSize bytes
	Sealed []byte // ciphertext and tag
}

// marshalHeader appends the header's bytes to b.
func (h Header) marshal(b []byte) []byte {
	b = append(b, magic...)
	b = append(b, FormatVersion, byte(len(h.KeyName)))
	b = append(b, h.KeyName...)
	return binary.BigEndian.AppendUint32(b, h.KeyVersion)
}

func (h Header) check() error {
	if err := (hsm.KeyID{Name: h.KeyName, Version: h.KeyVersion}).Check(); err != nil {
		return fmt.Errorf("%w: %v", ErrFormat, err)
	}
	return nil
}

// Marshal encodes c. It fails only on fields no ciphertext can hold.
func (c *Ciphertext) Marshal() ([]byte, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if len(c.Nonce) != NonceSize || len(c.Sealed) < TagSize {
		return nil, fmt.Errorf("%w: nonce of %d bytes or sealed part of %d", ErrFormat, len(c.Nonce), len(c.Sealed))
	}
	b := c.Header.marshal(make([]byte, 0, 9+len(c.KeyName)+NonceSize+len(c.Sealed)))
	b = append(b, c.Nonce...)
	return append(b, c.Sealed...), nil
}

// Parse reads a ciphertext. It copies nothing: the result points into b.
func Parse(b []byte) (*Ciphertext, error) {
	if len(b) < 4 || string(b[:3]) != magic {
		return nil, fmt.Errorf("%w: it does not start with %q", ErrFormat, magic)
	}
	if b[3] != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d; this keyward reads version %d", ErrFormat, b[3], FormatVersion)
	}
	if len(b) < 5 {
		return nil, fmt.Errorf("%w: truncated header", ErrFormat)
	}
	n := int(b[4])
	rest := b[5:]
	if n == 0 || n > maxNameLen || len(rest) < n+4+NonceSize+TagSize {
		return nil, fmt.Errorf("%w: truncated or bad key name length", ErrFormat)
	}
	c := &Ciphertext{Header: Header{KeyName: string(rest[:n]), KeyVersion: binary.BigEndian.Uint32(rest[n:])}}
	if err := c.check(); err != nil {
		return nil, err
	}
	rest = rest[n+4:]
	c.Nonce, c.Sealed = rest[:NonceSize], rest[NonceSize:]
	return c, nil
}

// AAD is the additional authenticated data of a ciphertext with header h
// under the encryption context ctx: the header's bytes, then the canonical
// context.
func AAD(h Header, ctx map[string]string) ([]byte, error) {
	canon, err := CanonicalContext(ctx)
	if err != nil {
		return nil, err
	}
	return append(h.marshal(nil), canon...), nil
}

// CanonicalContext encodes an encryption context the one way that
// authenticates it: the number of entries, then each key and value,
// length-prefixed (unsigned varints), keys in byte order. Keys are non-empty
// UTF-8, values UTF-8, within the Max* limits.
func CanonicalContext(ctx map[string]string) ([]byte, error) {
	if len(ctx) > MaxContextEntries {
		return nil, fmt.Errorf("%w: %d entries; at most %d", ErrContext, len(ctx), MaxContextEntries)
	}
	keys := make([]string, 0, len(ctx))
	size := 1
	for k, v := range ctx {
		switch {
		case k == "" || len(k) > MaxContextKeyLen:
			return nil, fmt.Errorf("%w: keys are 1 to %d bytes", ErrContext, MaxContextKeyLen)
		case len(v) > MaxContextValueLen:
			return nil, fmt.Errorf("%w: the value of %q is over %d bytes", ErrContext, k, MaxContextValueLen)
		case !utf8.ValidString(k) || !utf8.ValidString(v):
			return nil, fmt.Errorf("%w: keys and values must be UTF-8", ErrContext)
		}
		keys = append(keys, k)
		size += 4 + len(k) + len(v)
	}
	slices.Sort(keys)
	b := binary.AppendUvarint(make([]byte, 0, size), uint64(len(keys)))
	for _, k := range keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
		b = binary.AppendUvarint(b, uint64(len(ctx[k])))
		b = append(b, ctx[k]...)
	}
	return b, nil
}

// ParseContext reads a canonical context back. It refuses any encoding but
// the canonical one, so one context has exactly one encoding.
func ParseContext(b []byte) (map[string]string, error) {
	r := bytes.NewReader(b)
	n, err := binary.ReadUvarint(r)
	if err != nil || n > MaxContextEntries {
		return nil, fmt.Errorf("%w: bad entry count", ErrContext)
	}
	ctx := make(map[string]string, n)
	last := ""
	for i := uint64(0); i < n; i++ {
		k, err := readString(r, MaxContextKeyLen)
		if err != nil {
			return nil, err
		}
		v, err := readString(r, MaxContextValueLen)
		if err != nil {
			return nil, err
		}
		if k == "" || (i > 0 && k <= last) {
			return nil, fmt.Errorf("%w: keys empty, repeated or out of order", ErrContext)
		}
		ctx[k], last = v, k
	}
	if r.Len() != 0 {
		return nil, fmt.Errorf("%w: trailing bytes", ErrContext)
	}
	if canon, err := CanonicalContext(ctx); err != nil || !bytes.Equal(canon, b) {
		return nil, fmt.Errorf("%w: not the canonical encoding", ErrContext)
	}
	return ctx, nil
}

func readString(r *bytes.Reader, max int) (string, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil || n > uint64(max) || n > uint64(r.Len()) {
		return "", fmt.Errorf("%w: bad length", ErrContext)
	}
	b := make([]byte, n)
	r.Read(b)
	return string(b), nil
}
