package envelope

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// vector is one golden ciphertext: made with Go's AES-GCM under a known key
// (keyward's own keys never leave the HSM), it pins the format, the
// additional data and the canonical context byte for byte.
type vector struct {
	Name       string            `json:"name"`
	Key        string            `json:"aes_key_hex"`
	KeyName    string            `json:"key_name"`
	KeyVersion uint32            `json:"key_version"`
	Nonce      string            `json:"nonce_hex"`
	Context    map[string]string `json:"context"`
	Plaintext  string            `json:"plaintext_hex"`
	AAD        string            `json:"aad_hex"`
	Ciphertext string            `json:"ciphertext_hex"`
}

func goldenInputs() []vector {
	return []vector{
		{Name: "data key with context", Key: strings.Repeat("00", 16) + strings.Repeat("ff", 16), KeyName: "payments", KeyVersion: 3,
			Nonce: "000102030405060708090a0b", Context: map[string]string{"tenant": "42", "app": "billing"},
			Plaintext: hex.EncodeToString(bytes.Repeat([]byte{0xd7}, 32))},
		{Name: "empty context", Key: strings.Repeat("11", 32), KeyName: "k", KeyVersion: 1,
			Nonce: strings.Repeat("ab", 12), Context: map[string]string{}, Plaintext: hex.EncodeToString([]byte("hello"))},
		{Name: "empty plaintext, unicode context, long name", Key: strings.Repeat("22", 32), KeyName: strings.Repeat("n", 64), KeyVersion: 0xfffffffe,
			Nonce: strings.Repeat("00", 12), Context: map[string]string{"ключ": "значение", "a": ""}, Plaintext: ""},
	}
}

func unhex(t *testing.T, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func goSeal(t *testing.T, v vector) (aad, ct []byte) {
	t.Helper()
	block, _ := aes.NewCipher(unhex(t, v.Key))
	gcm, _ := cipher.NewGCM(block)
	h := Header{KeyName: v.KeyName, KeyVersion: v.KeyVersion}
	aad, err := AAD(h, v.Context)
	if err != nil {
		t.Fatal(err)
	}
	c := &Ciphertext{Header: h, Nonce: unhex(t, v.Nonce), Sealed: gcm.Seal(nil, unhex(t, v.Nonce), unhex(t, v.Plaintext), aad)}
	ct, err = c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return aad, ct
}

func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	var made []vector // written with -update only: each is sealed afresh
	for _, v := range goldenInputs() {
		aad, ct := goSeal(t, v)
		v.AAD, v.Ciphertext = hex.EncodeToString(aad), hex.EncodeToString(ct)
		made = append(made, v)
	}
	vectors := golden.JSON(t, path, made)
	if len(vectors) != len(goldenInputs()) {
		t.Fatalf("%d golden vectors, want %d (go test -update rewrites them)", len(vectors), len(goldenInputs()))
	}
	for _, v := range vectors {
		t.Run(v.Name, func(t *testing.T) {
			aad, ct := goSeal(t, v)
			if hex.EncodeToString(aad) != v.AAD || hex.EncodeToString(ct) != v.Ciphertext {
				t.Fatalf("the format changed:\n aad %x\nwant %s\n  ct %x\nwant %s", aad, v.AAD, ct, v.Ciphertext)
			}
			c, err := Parse(unhex(t, v.Ciphertext))
			if err != nil {
				t.Fatal(err)
			}
			if c.KeyName != v.KeyName || c.KeyVersion != v.KeyVersion || hex.EncodeToString(c.Nonce) != v.Nonce {
				t.Fatalf("parsed %+v", c)
			}
			block, _ := aes.NewCipher(unhex(t, v.Key))
			gcm, _ := cipher.NewGCM(block)
			pt, err := gcm.Open(nil, c.Nonce, c.Sealed, unhex(t, v.AAD))
			if err != nil || hex.EncodeToString(pt) != v.Plaintext {
				t.Fatalf("golden ciphertext does not open: %v", err)
			}
		})
	}
}

func TestParseRefuses(t *testing.T) {
	good, _ := (&Ciphertext{Header: Header{"kek", 2}, Nonce: make([]byte, 12), Sealed: make([]byte, 16)}).Marshal()
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "does not start with"},
		{"other magic", append([]byte("kwx"), good[3:]...), "does not start with"},
		{"future format", append([]byte("kwe\x02"), good[4:]...), "format version 2; this keyward reads version 1"},
		{"truncated", good[:len(good)-1], "truncated"},
		{"zero name length", append([]byte("kwe\x01\x00"), good[5:]...), "truncated or bad key name length"},
		{"name too long", append([]byte("kwe\x01\x41"), bytes.Repeat([]byte("a"), 200)...), "truncated or bad key name length"},
		{"bad name", []byte(strings.Replace(string(good), "kek", "k/k", 1)), "not allowed"},
		{"version 0", append(append([]byte("kwe\x01\x03kek"), 0, 0, 0, 0), make([]byte, 28)...), "versions start at 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.b)
			if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrFormat saying %q", err, tc.want)
			}
		})
	}
}

func TestCanonicalContext(t *testing.T) {
	a, _ := CanonicalContext(map[string]string{"b": "2", "a": "1"})
	b, _ := CanonicalContext(map[string]string{"a": "1", "b": "2"})
	if !bytes.Equal(a, b) || hex.EncodeToString(a) != "0201610131016201"+"32" {
		t.Fatalf("canonical context %x", a)
	}
	// Ambiguity: {"ab": "c"} and {"a": "bc"} must differ.
	x, _ := CanonicalContext(map[string]string{"ab": "c"})
	y, _ := CanonicalContext(map[string]string{"a": "bc"})
	if bytes.Equal(x, y) {
		t.Fatal("two contexts share an encoding")
	}
	for _, bad := range []map[string]string{
		{"": "x"},
		{strings.Repeat("k", MaxContextKeyLen+1): "x"},
		{"k": strings.Repeat("v", MaxContextValueLen+1)},
		{"k": "\xff"},
	} {
		if _, err := CanonicalContext(bad); !errors.Is(err, ErrContext) {
			t.Errorf("CanonicalContext(%q) = %v, want ErrContext", bad, err)
		}
	}
	many := map[string]string{}
	for i := range MaxContextEntries + 1 {
		many[string(rune('A'+i))] = ""
	}
	if _, err := CanonicalContext(many); !errors.Is(err, ErrContext) {
		t.Errorf("%d entries: %v", len(many), err)
	}
	for _, bad := range [][]byte{{0x02, 0x01, 'b', 0x00, 0x01, 'a', 0x00}, {0x01, 0x01, 'a', 0x00, 0x00}, {0x01, 0x00, 0x00}, {0x81}} {
		if _, err := ParseContext(bad); !errors.Is(err, ErrContext) {
			t.Errorf("ParseContext(%x) = %v, want ErrContext", bad, err)
		}
	}
}

// FuzzParse: whatever Parse accepts, Marshal gives back byte for byte (no
// two encodings of one ciphertext), and nothing panics.
func FuzzParse(f *testing.F) {
	good, _ := (&Ciphertext{Header: Header{"kek", 2}, Nonce: make([]byte, 12), Sealed: make([]byte, 20)}).Marshal()
	f.Add(good)
	f.Add([]byte("kwe\x01"))
	f.Add([]byte("kwe\x01\x40" + strings.Repeat("a", 64)))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b)
		if err != nil {
			return
		}
		again, err := c.Marshal()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("Parse(%x) then Marshal = %x, %v", b, again, err)
		}
	})
}

// FuzzContext: a context that parses is canonical and re-encodes to the
// same bytes.
func FuzzContext(f *testing.F) {
	c, _ := CanonicalContext(map[string]string{"app": "billing", "tenant": "42"})
	f.Add(c)
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, b []byte) {
		ctx, err := ParseContext(b)
		if err != nil {
			return
		}
		again, err := CanonicalContext(ctx)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("ParseContext(%x) re-encodes to %x, %v", b, again, err)
		}
	})
}
