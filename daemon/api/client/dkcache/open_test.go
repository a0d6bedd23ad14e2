package dkcache_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/keyward/keyward/daemon/api/client"
	"github.com/keyward/keyward/daemon/api/client/dkcache"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestOpenKey: Open and OpenParts refuse, with ErrKey and without asking
// keywardd, a record whose data key is under another key name than the
// one given, though the caller may decrypt under that key; RecordKey
// tells a record's key name and version (after a rotation:
// TestRetireVersion).
func TestOpenKey(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	c := newCache(t, kw, dkcache.Options{})
	rec, err := c.Seal(ctx, "billing", []byte("not an order"), tenant42)
	if err != nil {
		t.Fatal(err)
	}
	wrapped, sealed, err := c.SealParts(ctx, "billing", []byte("not an order"), nil, tenant42)
	if err != nil {
		t.Fatal(err)
	}
	reader := newCache(t, kw, dkcache.Options{})
	before := audited(t, kw, "EnvelopeService.Decrypt")
	if pt, err := reader.Open(ctx, "orders", rec, tenant42); !errors.Is(err, dkcache.ErrKey) || !strings.Contains(err.Error(), `"billing"`) || !strings.Contains(err.Error(), `"orders"`) {
		t.Errorf(`Open("orders") of a record under "billing": %q, %v; want ErrKey naming both`, pt, err)
	}
	if pt, err := reader.OpenParts(ctx, "orders", wrapped, sealed, nil, tenant42); !errors.Is(err, dkcache.ErrKey) {
		t.Errorf(`OpenParts("orders") of parts under "billing": %q, %v; want ErrKey`, pt, err)
	}
	if n := audited(t, kw, "EnvelopeService.Decrypt") - before; n != 0 {
		t.Errorf("refusing records of another key asked keywardd %d times; want none", n)
	}
	if pt, err := reader.Open(ctx, "billing", rec, tenant42); err != nil || string(pt) != "not an order" {
		t.Errorf(`Open("billing"): %q, %v`, pt, err)
	}
	if pt, err := reader.OpenParts(ctx, "billing", wrapped, sealed, nil, tenant42); err != nil || string(pt) != "not an order" {
		t.Errorf(`OpenParts("billing"): %q, %v`, pt, err)
	}
	// A key name cached for "billing" still does not open as "orders".
	if _, err := reader.Open(ctx, "orders", rec, tenant42); !errors.Is(err, dkcache.ErrKey) {
		t.Errorf(`Open("orders") with "billing"'s data key cached: %v, want ErrKey`, err)
	}

	if name, v, err := dkcache.RecordKey(rec); name != "billing" || v != 1 || err != nil {
		t.Errorf("RecordKey: %q, %d, %v; want billing, 1", name, v, err)
	}
	if _, _, err := dkcache.RecordKey([]byte("kwr")); !errors.Is(err, dkcache.ErrFormat) {
		t.Errorf("RecordKey of a truncated record: %v, want ErrFormat", err)
	}
}

// TestErrors: which error each way a record fails to open gives, as the
// package doc and docs/datakey-cache.md list them.
func TestErrors(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	rec := sealOne(t, kw, "secret")
	w := int(rec[4])
	edit := func(i int) []byte { b := bytes.Clone(rec); b[i] ^= 1; return b }
	sentinels := []error{client.ErrInvalid, dkcache.ErrOpen, dkcache.ErrKey, dkcache.ErrFormat}
	for _, tc := range []struct {
		name    string
		keyName string
		rec     []byte
		encCtx  map[string]string
		want    error
	}{
		{"another context", "orders", rec, tenant43, client.ErrInvalid},
		{"no context", "orders", rec, nil, client.ErrInvalid},
		{"wrapped key's ciphertext changed", "orders", edit(5 + w - 1), tenant42, client.ErrInvalid},
		{"another key name expected", "billing", rec, tenant42, dkcache.ErrKey},
		{"wrapped key's name changed", "orders", edit(5 + 5), tenant42, dkcache.ErrKey},
		{"nonce changed", "orders", edit(5 + w), tenant42, dkcache.ErrOpen},
		{"ciphertext changed", "orders", edit(5 + w + 12), tenant42, dkcache.ErrOpen},
		{"tag changed", "orders", edit(len(rec) - 1), tenant42, dkcache.ErrOpen},
		{"not a record", "orders", []byte("a row in plain text"), tenant42, dkcache.ErrFormat},
		{"truncated", "orders", rec[:5+w+20], tenant42, dkcache.ErrFormat},
		{"wrapped key's length changed", "orders", edit(4), tenant42, dkcache.ErrFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newCache(t, kw, dkcache.Options{}).Open(ctx, tc.keyName, tc.rec, tc.encCtx)
			for _, s := range sentinels {
				if errors.Is(err, s) != (s == tc.want) {
					t.Errorf("%v: errors.Is %v is %v", err, s, errors.Is(err, s))
				}
			}
		})
	}
}

// TestOneAEADPerKey: a cached data key's AES-GCM (whose key schedule holds
// the key, on the heap) is built once, when the key is cached, not per
// record: 100 records sealed and opened build two, one on each side.
func TestOneAEADPerKey(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	var made atomic.Int64
	dkcache.SetAEADMade(func() { made.Add(1) })
	t.Cleanup(func() { dkcache.SetAEADMade(nil) })
	c, reader := newCache(t, kw, dkcache.Options{}), newCache(t, kw, dkcache.Options{})
	for range 100 {
		rec, err := c.Seal(ctx, "orders", []byte("r"), tenant42)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := reader.Open(ctx, "orders", rec, tenant42); err != nil {
			t.Fatal(err)
		}
	}
	if n := made.Load(); n != 2 {
		t.Errorf("100 records sealed and opened under one data key built %d AES-GCMs; want 2", n)
	}
}

// badWrap is keywardd's client with the wrapped data keys it returns
// changed by edit; last is the last data key it returned.
type badWrap struct {
	kw   *client.Client
	edit func([]byte) []byte
	last *client.DataKey
}

func (b *badWrap) GenerateDataKey(ctx context.Context, name string, ec map[string]string) (*client.DataKey, error) {
	dk, err := b.kw.GenerateDataKey(ctx, name, ec)
	if err == nil {
		dk.Wrapped = b.edit(dk.Wrapped)
		b.last = dk
	}
	return dk, err
}

func (b *badWrap) Decrypt(ctx context.Context, ct []byte, ec map[string]string) ([]byte, error) {
	return b.kw.Decrypt(ctx, ct, ec)
}

// TestSealChecksWrapped: a wrapped data key this version cannot put in a
// record (another format, a length over a byte) fails Seal and SealParts
// with ErrFormat; its plaintext data key is cleared and not cached.
func TestSealChecksWrapped(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		edit func([]byte) []byte
	}{
		{"format 2", func(w []byte) []byte { w[3] = 2; return w }},
		{"300 bytes", func(w []byte) []byte { return append(w, make([]byte, 300-len(w))...) }},
		{"name length not the length's", func(w []byte) []byte { w[4]++; return w }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &badWrap{kw: kw, edit: tc.edit}
			c := newCache(t, b, dkcache.Options{})
			if rec, err := c.Seal(ctx, "orders", []byte("r"), tenant42); !errors.Is(err, dkcache.ErrFormat) || rec != nil {
				t.Errorf("Seal: % x, %v; want ErrFormat", rec, err)
			}
			if !bytes.Equal(b.last.Plaintext, make([]byte, 32)) {
				t.Error("the refused data key was not cleared")
			}
			if w, s, err := c.SealParts(ctx, "orders", []byte("r"), nil, tenant42); !errors.Is(err, dkcache.ErrFormat) || w != nil || s != nil {
				t.Errorf("SealParts: %v; want ErrFormat", err)
			}
			if s := c.Stats(); s.Entries != 0 {
				t.Errorf("stats %+v; want no key held", s)
			}
		})
	}
}

// TestRetireVersion: what docs/datakey-cache.md says about moving records
// off an old key version. A record's wrapped data key re-wrapped by
// keywardd's ReEncrypt and put back makes a record that no longer opens
// (the header is authenticated); opening and sealing again moves the
// record to the newest version, and it opens after the old version is
// retired, when the old record no longer does.
func TestRetireVersion(t *testing.T) {
	kw := start(t)
	ctx := context.Background()
	rec := sealOne(t, kw, "old")
	if _, err := kw.Keys.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "orders"}); err != nil {
		t.Fatal(err)
	}
	w := int(rec[4])
	rewrapped, err := kw.ReEncrypt(ctx, rec[5:5+w], tenant42)
	if err != nil {
		t.Fatal(err)
	}
	if len(rewrapped) != w {
		t.Fatalf("ReEncrypt gave %d bytes for %d", len(rewrapped), w)
	}
	moved := append(append(bytes.Clone(rec[:5]), rewrapped...), rec[5+w:]...)
	if _, err := newCache(t, kw, dkcache.Options{}).Open(ctx, "orders", moved, tenant42); !errors.Is(err, dkcache.ErrOpen) {
		t.Errorf("a record with its data key re-wrapped by ReEncrypt: %v, want ErrOpen", err)
	}

	pt, err := newCache(t, kw, dkcache.Options{}).Open(ctx, "orders", rec, tenant42)
	if err != nil {
		t.Fatal(err)
	}
	again, err := newCache(t, kw, dkcache.Options{}).Seal(ctx, "orders", pt, tenant42)
	if err != nil {
		t.Fatal(err)
	}
	if name, v, err := dkcache.RecordKey(again); name != "orders" || v != 2 || err != nil {
		t.Errorf("sealed again: RecordKey %q, %d, %v; want orders, version 2", name, v, err)
	}
	if _, err := kw.Keys.SetMinDecryptionVersion(ctx, &keywardv1.SetMinDecryptionVersionRequest{Name: "orders", Version: 2}); err != nil {
		t.Fatal(err)
	}
	if got, err := newCache(t, kw, dkcache.Options{}).Open(ctx, "orders", again, tenant42); err != nil || string(got) != "old" {
		t.Errorf("the record sealed again, after version 1 is retired: %q, %v", got, err)
	}
	if _, err := newCache(t, kw, dkcache.Options{}).Open(ctx, "orders", rec, tenant42); !errors.Is(err, client.ErrUnusable) {
		t.Errorf("the record left under version 1, after it is retired: %v, want ErrUnusable", err)
	}
}

// sealOne is a record of plaintext under "orders" and tenant 42, from a
// cache of its own.
func sealOne(t *testing.T, kw *client.Client, plaintext string) []byte {
	t.Helper()
	rec, err := newCache(t, kw, dkcache.Options{}).Seal(context.Background(), "orders", []byte(plaintext), tenant42)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}
