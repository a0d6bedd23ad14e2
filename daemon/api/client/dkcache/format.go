package dkcache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// The record format, version 1 (docs/datakey-cache.md):
//
//	magic     3 bytes  "kwr"
//	version   1 byte   1
//	wrapLen   1 byte   W, the wrapped data key's length, 70..133
//	wrapped   W bytes  the data key wrapped by keywardd (format 1, docs/formats.md)
//	nonce     12 bytes
//	sealed    the AES-256-GCM ciphertext under the data key and its 16-byte tag
//
// Everything before the nonce is the header; the header and the canonical
// encryption context are the additional authenticated data. A wrapped data
// key of format 1 is 69+N bytes, N its key name's length (its byte 4), and
// the parser holds W to that, so a record has one encoding.
const (
	recordMagic   = "kwr"
	RecordVersion = 1 // the record format this package writes and reads
	nonceSize     = 12
	tagSize       = 16
	// wrappedFixed is a format-1 wrapped data key's length less its key
	// name: magic, version, name length, key version, nonce, 32-byte key,
	// tag.
	wrappedFixed = 3 + 1 + 1 + 4 + nonceSize + keySize + tagSize
	maxKeyName   = 64
)

// ErrFormat: the bytes are not a record of a version this package reads.
var ErrFormat = errors.New("dkcache: not a keyward record")

// record is a parsed record; its slices point into the bytes parsed.
type record struct {
	header  []byte // magic to the end of the wrapped key: the first part of the AAD
	wrapped []byte
	nonce   []byte
	sealed  []byte
}

// aad is the record's additional authenticated data under the canonical
// context canon: its header, then canon.
func (r *record) aad(canon []byte) []byte {
	return append(r.header[:len(r.header):len(r.header)], canon...)
}

// parseRecord reads a record strictly: it accepts only what
// appendHeader and Seal write, byte for byte.
func parseRecord(b []byte) (*record, error) {
	if len(b) < 5 || string(b[:3]) != recordMagic {
		return nil, fmt.Errorf("%w: it does not start with %q", ErrFormat, recordMagic)
	}
	if b[3] != RecordVersion {
		return nil, fmt.Errorf("%w: record version %d; this package reads version %d", ErrFormat, b[3], RecordVersion)
	}
	w := int(b[4])
	if len(b) < 5+w+nonceSize+tagSize {
		return nil, fmt.Errorf("%w: truncated", ErrFormat)
	}
	wrapped := b[5 : 5+w]
	if err := checkWrapped(wrapped); err != nil {
		return nil, err
	}
	rest := b[5+w:]
	return &record{header: b[:5+w], wrapped: wrapped, nonce: rest[:nonceSize], sealed: rest[nonceSize:]}, nil
}

// checkWrapped holds a wrapped data key to the shape of format 1 (the
// rest is keywardd's to check): magic and version, a key name's length
// of 1 to 64 that agrees with the whole length.
func checkWrapped(w []byte) error {
	if len(w) < 5 || string(w[:4]) != "kwe\x01" {
		return fmt.Errorf("%w: the wrapped data key is not a keyward ciphertext of format 1", ErrFormat)
	}
	if n := int(w[4]); n == 0 || n > maxKeyName || len(w) != wrappedFixed+n {
		return fmt.Errorf("%w: the wrapped data key is %d bytes, not a wrapped 32-byte key", ErrFormat, len(w))
	}
	return nil
}

// wrappedKeyName is the key name of a wrapped data key checkWrapped
// accepted.
func wrappedKeyName(w []byte) string { return string(w[5 : 5+int(w[4])]) }

// RecordKey tells which key name and version wrapped a record's data key,
// without opening it or asking keywardd: for finding the records still
// under a version to be retired (open them and seal them again; see
// docs/datakey-cache.md). It is not a check of the record: use Open with
// the key name you expect, never the name RecordKey reads from the record.
func RecordKey(rec []byte) (keyName string, version uint32, err error) {
	r, err := parseRecord(rec)
	if err != nil {
		return "", 0, err
	}
	n := int(r.wrapped[4])
	return wrappedKeyName(r.wrapped), binary.BigEndian.Uint32(r.wrapped[5+n:]), nil
}

// appendHeader appends a record's header for the wrapped key to b.
func appendHeader(b, wrapped []byte) []byte {
	b = append(b, recordMagic...)
	b = append(b, RecordVersion, byte(len(wrapped)))
	return append(b, wrapped...)
}

// canonicalContext is the canonical encoding of an encryption context
// (docs/formats.md): the number of entries, then each key and value,
// length-prefixed with unsigned varints, keys in byte order. keywardd
// checks a context's limits; this encoding is only to bind it and to key
// the cache, where it must be one-to-one. (daemon/envelope has the same
// encoding, with the limits; it is not imported: it brings the HSM's cgo
// library into every client.)
func canonicalContext(ctx map[string]string) []byte {
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	b := binary.AppendUvarint(nil, uint64(len(keys)))
	for _, k := range keys {
		b = appendString(b, k)
		b = appendString(b, ctx[k])
	}
	return b
}

// appendString appends s, prefixed with its length as an unsigned varint.
func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}
