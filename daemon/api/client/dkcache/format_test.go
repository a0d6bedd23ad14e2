package dkcache

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// vector is testdata/golden.json: a record made with Go's AES-GCM under a
// known data key, whose wrapped form is the golden vector of format 1
// (docs/formats.md: the data key d7 x 32 under key "payments" version 3).
type vector struct {
	DataKey   string            `json:"data_key"`
	Wrapped   string            `json:"wrapped"`
	Nonce     string            `json:"nonce"`
	Context   map[string]string `json:"context"`
	Plaintext string            `json:"plaintext"`
	AAD       string            `json:"aad"`
	Record    string            `json:"record"`
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGolden: the golden record is what this package's layout and Go's
// AES-GCM make of its inputs, it parses into them, and it opens.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	g := vector{
		DataKey:   hex.EncodeToString(bytes.Repeat([]byte{0xd7}, 32)),
		Wrapped:   "6b776501087061796d656e747300000003000102030405060708090a0b83c7b13f15bdab74218f3ae23f38c49a801d58ace8adea2587773dc18ccb355b9056770f7fd03c797f63f39e86883303",
		Nonce:     "0c0d0e0f1011121314151617",
		Context:   map[string]string{"app": "billing", "tenant": "42"},
		Plaintext: "a small record",
	}
	block, err := aes.NewCipher(unhex(t, g.DataKey))
	if err != nil {
		t.Fatal(err)
	}
	gcm, _ := cipher.NewGCM(block)
	header := appendHeader(nil, unhex(t, g.Wrapped))
	aad := append(bytes.Clone(header), canonicalContext(g.Context)...)
	rec := gcm.Seal(append(bytes.Clone(header), unhex(t, g.Nonce)...), unhex(t, g.Nonce), []byte(g.Plaintext), aad)
	g.AAD, g.Record = hex.EncodeToString(aad), hex.EncodeToString(rec)
	want := golden.JSON(t, path, g)
	if want.AAD != g.AAD || want.Record != g.Record {
		t.Fatalf("the format changed:\naad    %s\nwant   %s\nrecord %s\nwant   %s", g.AAD, want.AAD, g.Record, want.Record)
	}
	r, err := parseRecord(unhex(t, want.Record))
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(r.wrapped) != want.Wrapped || hex.EncodeToString(r.nonce) != want.Nonce {
		t.Errorf("parsed wrapped %x nonce %x", r.wrapped, r.nonce)
	}
	pt, err := open(gcm, r.nonce, r.sealed, r.aad(canonicalContext(want.Context)))
	if err != nil || string(pt) != want.Plaintext {
		t.Errorf("the golden record opens to %q, %v", pt, err)
	}
}

// TestParseRecord: what the parser refuses, and why.
func TestParseRecord(t *testing.T) {
	g, err := os.ReadFile(filepath.Join("testdata", "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var gv vector
	json.Unmarshal(g, &gv)
	good := unhex(t, gv.Record)
	edit := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name string
		rec  []byte
		ok   bool
	}{
		{"golden", good, true},
		{"empty", nil, false},
		{"other magic", edit(func(b []byte) []byte { b[0] = 'x'; return b }), false},
		{"version 2", edit(func(b []byte) []byte { b[3] = 2; return b }), false},
		{"no tag", good[:len(good)-len(gv.Plaintext)-1], false},
		{"empty plaintext", good[:len(good)-len(gv.Plaintext)], true},
		{"wrapped length one more", edit(func(b []byte) []byte { b[4]++; return b }), false},
		{"wrapped length one less", edit(func(b []byte) []byte { b[4]--; return b }), false},
		{"wrapped not format 1", edit(func(b []byte) []byte { b[5+3] = 2; return b }), false},
		{"wrapped name length 0", edit(func(b []byte) []byte { b[5+4] = 0; return b }), false},
	} {
		_, err := parseRecord(tc.rec)
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// FuzzParseRecord: the parser accepts a record only in the one encoding
// it writes: what it accepts is written back byte for byte.
func FuzzParseRecord(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRecord(b)
		if err != nil {
			return
		}
		out := append(append(appendHeader(nil, r.wrapped), r.nonce...), r.sealed...)
		if !bytes.Equal(out, b) || !bytes.Equal(r.header, b[:len(r.header)]) {
			t.Fatalf("parsed % x, wrote % x", b, out)
		}
	})
}
