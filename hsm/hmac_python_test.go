package hsm

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// TestHMACMatchesPython imports known generic secrets (as keyward itself
// never does: its keys are made in the token) and checks the MACs keyward
// asks the token for, HMAC-SHA256 and HMAC-SHA384, against Python's hmac
// module, an implementation no one here wrote. The key goes to Python on
// its standard input, never as an argument.
func TestHMACMatchesPython(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is needed to check HMACs: %v", err)
	}
	h, _ := openToken(t)
	msg := []byte("order 42 shipped, \x00 and \xff bytes too")
	for _, tc := range []struct {
		alg  Algorithm
		hash string
		key  []byte
	}{
		{HMACSHA256, "sha256", bytes.Repeat([]byte{0x42}, 32)},
		{HMACSHA384, "sha384", bytes.Repeat([]byte{0x17, 0x2a, 0x99}, 16)},
	} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			var mac []byte
			raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
				key, err := p.CreateObject(s, []*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
					pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
					pkcs11.NewAttribute(pkcs11.CKA_VALUE, tc.key),
					pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				})
				if err != nil {
					return err
				}
				mac, err = h.hmac(s, key, tc.alg, msg)
				return err
			})
			cmd := exec.Command(python, "-c", fmt.Sprintf(
				"import sys, hmac, hashlib; d = sys.stdin.buffer.read(); print(hmac.new(d[:%d], d[%d:], hashlib.%s).hexdigest())",
				len(tc.key), len(tc.key), tc.hash))
			cmd.Stdin = bytes.NewReader(append(bytes.Clone(tc.key), msg...))
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("python3: %v", err)
			}
			if got, want := hex.EncodeToString(mac), strings.TrimSpace(string(out)); got != want {
				t.Fatalf("the token's %v is %s, Python's %s", tc.alg, got, want)
			}
		})
	}
}

// TestHMAC384: a key made as HMACSHA384 computes 48-byte MACs with HMAC,
// which says its algorithm; HMACSHA256 refuses it (the audit log's and the
// API keys' MACs never run on it), and HMAC refuses a key of another kind.
func TestHMAC384(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	k384, k256, kek := KeyID{"m384", 1}, KeyID{"m256", 1}, KeyID{"kek", 1}
	mustCreate(t, h, k384, HMACSHA384)
	mustCreate(t, h, k256, HMACSHA256)
	mustCreate(t, h, kek, AES256GCM)
	for _, tc := range []struct {
		id   KeyID
		alg  Algorithm
		size int
	}{{k384, HMACSHA384, 48}, {k256, HMACSHA256, 32}} {
		mac, alg, err := h.HMAC(ctx, tc.id, []byte("m"))
		if err != nil || alg != tc.alg || len(mac) != tc.size {
			t.Fatalf("HMAC(%v) = %d bytes, %v, %v; want %d bytes of %v", tc.id, len(mac), alg, err, tc.size, tc.alg)
		}
	}
	if _, err := h.HMACSHA256(ctx, k384, []byte("m")); err == nil || !strings.Contains(err.Error(), "the key is hmac-sha384; hmac needs hmac-sha256") {
		t.Fatalf("HMACSHA256 on an HMAC-SHA384 key: %v", err)
	}
	if _, _, err := h.HMAC(ctx, kek, []byte("m")); err == nil || !strings.Contains(err.Error(), "the key is aes256-gcm; hmac needs hmac-sha256 or hmac-sha384") {
		t.Fatalf("HMAC on an AES key: %v", err)
	}
}
