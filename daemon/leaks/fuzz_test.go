package leaks

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"testing"
)

// FuzzPayload: ParsePayload never panics, and what it takes is within its
// bounds and survives a round trip through JSON.
func FuzzPayload(f *testing.F) {
	f.Add([]byte(`[{"token":"kw_x","type":"keyward_api_key","url":"https://github.com/o/r/blob/1/a","source":"content"}]`))
	f.Add([]byte(`[{"token":"a"},{"token":"b","extra":{"n":[1,2]}}]`))
	f.Add([]byte(`[] `))
	f.Add([]byte(`null`))
	f.Add([]byte(`[{"token":1}]`))
	f.Add([]byte(`[{"token":"a"}] [1]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fs, err := ParsePayload(b)
		if err != nil {
			if !errors.Is(err, ErrPayload) || fs != nil {
				t.Fatalf("ParsePayload = %v, %v", fs, err)
			}
			return
		}
		if len(fs) == 0 || len(fs) > MaxTokens {
			t.Fatalf("%d tokens taken", len(fs))
		}
		for _, x := range fs {
			if x.Token == "" || len(x.Token) > maxToken {
				t.Fatalf("a token of %d bytes taken", len(x.Token))
			}
		}
		again, err := json.Marshal(fs)
		if err != nil {
			t.Fatal(err)
		}
		if fs2, err := ParsePayload(again); err != nil || len(fs2) != len(fs) {
			t.Fatalf("round trip: %v, %d != %d", err, len(fs2), len(fs))
		}
	})
}

// FuzzKeys: ParseKeys never panics, and a key it takes is P-256.
func FuzzKeys(f *testing.F) {
	s := newScanner(f, "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a")
	f.Add(document(f, s))
	f.Add([]byte(`{"public_keys":[{"key_identifier":"a","key":"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n","is_current":true}]}`))
	f.Add([]byte(`{"public_keys":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ks, err := ParseKeys(b)
		if err != nil {
			return
		}
		if len(ks) == 0 || len(ks) > maxKeys {
			t.Fatalf("%d keys taken", len(ks))
		}
		for id, k := range ks {
			if id == "" || k.Curve != elliptic.P256() {
				t.Fatalf("key %q taken", id)
			}
		}
	})
}

// FuzzSignature: a report's signature headers and body, however mangled,
// never panic the check, and only the signer's signature of the very body
// verifies.
func FuzzSignature(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	k := &Keys{}
	k.fromFile.Store(&map[string]*ecdsa.PublicKey{"kid": &key.PublicKey})
	k.fromURL.Store(&map[string]*ecdsa.PublicKey{})
	body := []byte(`[{"token":"kw_x"}]`)
	h := sha256.Sum256(body)
	good, err := ecdsa.SignASN1(rand.Reader, key, h[:])
	if err != nil {
		f.Fatal(err)
	}
	f.Add("kid", "MEQCIAfgjgz6Ou/3DXMYZBervz1TKCHFsvwMcbuJhNZse622AiAG86/cku2XdcmFWNHl2WSJi2fkE8t+auvB24eURaOd2A==", body)
	f.Add("kid", "", body)
	f.Add("other", "AAAA", []byte{})
	f.Fuzz(func(t *testing.T, id, header string, b []byte) {
		sig, err := ParseSignature(header)
		if err != nil {
			if !errors.Is(err, ErrBadSignature) {
				t.Fatal(err)
			}
			return
		}
		err = k.Verify(id, b, sig)
		hb := sha256.Sum256(b)
		if ok := id == "kid" && ecdsa.VerifyASN1(&key.PublicKey, hb[:], sig); ok != (err == nil) {
			t.Fatalf("Verify = %v, crypto/ecdsa with the key says %v", err, ok)
		}
		if id == "kid" && bytes.Equal(b, body) && bytes.Equal(sig, good) && err != nil {
			t.Fatalf("the signer's signature of the body: %v", err)
		}
	})
}
