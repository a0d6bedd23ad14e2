package hsm

import (
	"context"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestSelfCheck(t *testing.T) {
	h, _ := openToken(t)
	steps, err := h.SelfCheck(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range steps {
		names = append(names, s.Name)
	}
	want := "create aes256-gcm key,create hmac-sha256 key,create hmac-sha384 key,create ecdsa-p256 key,create ecdsa-p384 key,create ed25519 key,AES-256-GCM round trip,HMAC-SHA256,HMAC-SHA384,sign and verify ecdsa-p256,sign and verify ecdsa-p384,sign and verify ed25519,random,destroy keys"
	if got := strings.Join(names, ","); got != want {
		t.Fatalf("steps:\n%s\nwant\n%s", got, want)
	}
	// It leaves nothing behind.
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := h.findObjects(s, nil, 10)
		if len(objs) != 0 {
			t.Errorf("%d objects left on the token", len(objs))
		}
		return err
	})
}
