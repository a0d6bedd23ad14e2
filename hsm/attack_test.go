package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// TestOneUserPerLibrary: a second HSM on the same library in one process is
// refused; after Close the library can be opened again.
func TestOneUserPerLibrary(t *testing.T) {
	h, tok := openToken(t)
	if h2, err := Open(tokenConfig(tok)); err == nil || !strings.Contains(err.Error(), "already open in this process") {
		if h2 != nil {
			h2.Close()
		}
		t.Fatalf("second Open: %v, want a refusal", err)
	}
	h.Close()
	h2, err := Open(tokenConfig(tok))
	if err != nil {
		t.Fatal(err)
	}
	h2.Close()
}

// noPINSession runs fn in a session that never logged in, as any process
// that can open the token but lacks the PIN. It needs the HSM's own login
// gone, so it closes h's sessions first.
func noPINSession(t *testing.T, h *HSM, fn func(p *pkcs11.Ctx, s pkcs11.SessionHandle)) {
	t.Helper()
	h.mu.Lock()
	h.dropSessionsLocked()
	h.broken = unavailable(ErrTokenUnavailable)
	slot := h.token.Slot
	h.mu.Unlock()
	p := h.mod.ctx
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(s)
	if info, _ := p.GetSessionInfo(s); info.State != pkcs11.CKS_RW_PUBLIC_SESSION {
		t.Fatalf("session state %d, want a public session", info.State)
	}
	fn(p, s)
}

// TestNoPINCannotPlantOrSwap: without the PIN, a process sees none of
// keyward's objects (the public halves are private objects too), and what it
// plants under keyward's labels is ignored: it neither replaces a public key
// nor makes a key ambiguous nor blocks a new version.
func TestNoPINCannotPlantOrSwap(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	id := KeyID{"jwt", 1}
	mustCreate(t, h, id, ECDSAP256)
	want, err := h.PublicKey(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	evil, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	evilBytes, _ := evil.PublicKey.Bytes()
	evilPoint, _ := asn1.Marshal(evilBytes)
	noPINSession(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) {
		if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.label())}); err != nil {
			t.Fatal(err)
		}
		seen, _, _ := p.FindObjects(s, 10)
		p.FindObjectsFinal(s)
		if len(seen) != 0 {
			t.Fatalf("a session without the PIN sees %d of keyward's objects", len(seen))
		}
		for _, label := range []string{id.label(), KeyID{"jwt", 2}.label()} {
			_, err := p.CreateObject(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidP256),
				pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, evilPoint),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			})
			if err != nil {
				t.Fatalf("planting a public object: %v", err)
			}
		}
	})
	got, err := h.PublicKey(ctx, id)
	if err != nil {
		t.Fatalf("after a public object was planted: %v", err)
	}
	if !got.(*ecdsa.PublicKey).Equal(want) {
		t.Fatal("keyward publishes the planted public key")
	}
	mustCreate(t, h, KeyID{"jwt", 2}, ECDSAP256)
}

// TestMismatchedPublicHalf: even a PIN holder cannot make keyward publish a
// public key that is not its private key's.
func TestMismatchedPublicHalf(t *testing.T) {
	h, _ := openToken(t)
	ctx := context.Background()
	a, b := KeyID{"a", 1}, KeyID{"b", 1}
	mustCreate(t, h, a, ECDSAP256)
	mustCreate(t, h, b, ECDSAP256)
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		pubA, _ := h.findObjects(s, append(ours(a.label()), pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY)), 2)
		pubB, _ := h.findObjects(s, append(ours(b.label()), pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY)), 2)
		point, err := p.GetAttributeValue(s, pubB[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
		if err != nil {
			return err
		}
		if err := p.DestroyObject(s, pubA[0]); err != nil {
			return err
		}
		_, err = p.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, a.label()),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidP256),
			pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, point[0].Value),
		})
		return err
	})
	reconnect(t, h)
	if _, err := h.PublicKey(ctx, a); !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), "does not belong to the private half") {
		t.Fatalf("swapped public half: %v, want ErrWeakKey", err)
	}
}

// TestDerivedKeyRefused: a key derived from a base key someone keeps is as
// sensitive as a generated one by every flag but CKA_LOCAL, and its holder
// can derive it again in the clear. keyward refuses it.
func TestDerivedKeyRefused(t *testing.T) {
	h, _ := openToken(t)
	id := KeyID{"kek", 2}
	data := make([]byte, 32)
	// CK_KEY_DERIVATION_STRING_DATA {pData, ulLen}, which miekg/pkcs11 has no type for.
	params := make([]byte, 16)
	binary.LittleEndian.PutUint64(params[0:], uint64(uintptr(unsafe.Pointer(&data[0]))))
	binary.LittleEndian.PutUint64(params[8:], uint64(len(data)))
	raw(t, h, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		base, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true)})
		if err != nil {
			return err
		}
		tmpl := append([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.label()),
		}, append(protection()[:4], usageTemplate(pkcs11.CKO_SECRET_KEY, pkcs11.CKA_ENCRYPT)...)...) // SoftHSM2 will not derive with MODIFIABLE or COPYABLE set
		_, err = p.DeriveKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB_ENCRYPT_DATA, params)}, base, tmpl)
		runtime.KeepAlive(data)
		return err
	})
	reload(t, h)
	_, _, err := h.Encrypt(context.Background(), id, []byte("a data key"), nil)
	if !errors.Is(err, ErrWeakKey) || !strings.Contains(err.Error(), "CKA_LOCAL is false") {
		t.Fatalf("derived key: %v, want ErrWeakKey naming CKA_LOCAL", err)
	}
}

// TestParseBarePoint: tokens that return CKA_EC_POINT without the DER
// wrapper are read right, even when the bare point happens to look like DER.
func TestParseBarePoint(t *testing.T) {
	for range 2000 {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		bare, _ := k.PublicKey.Bytes()
		wrapped, _ := asn1.Marshal(bare)
		for _, point := range [][]byte{bare, wrapped} {
			pub, err := parsePublicKey(ECDSAP256, point)
			if err != nil || !pub.(*ecdsa.PublicKey).Equal(&k.PublicKey) {
				t.Fatalf("point %x: %v", point, err)
			}
		}
	}
}
