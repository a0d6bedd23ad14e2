package daemon_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// openssl runs the openssl command line, the implementation no one here
// wrote that checks keywardd's signatures, and returns its combined output
// and whether it exited 0.
func openssl(t *testing.T, args ...string) (string, bool) {
	t.Helper()
	path, err := exec.LookPath("openssl")
	if err != nil {
		t.Fatalf("openssl is needed to check signatures (make deps installs it): %v", err)
	}
	out, err := exec.Command(path, args...).CombinedOutput()
	if _, exited := err.(*exec.ExitError); err != nil && !exited {
		t.Fatalf("openssl %v: %v", args, err)
	}
	return string(out), err == nil
}

// opensslVerify says whether openssl accepts sig of msg under the PEM
// public key, for alg (keywardd's algorithm name).
func opensslVerify(t *testing.T, alg, pubPEM string, msg, sig []byte) bool {
	t.Helper()
	dir := t.TempDir()
	pub, m, s := filepath.Join(dir, "pub.pem"), filepath.Join(dir, "msg"), filepath.Join(dir, "sig")
	for f, b := range map[string][]byte{pub: []byte(pubPEM), m: msg, s: sig} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var out string
	var ok bool
	switch alg {
	case "ecdsa-p256":
		out, ok = openssl(t, "dgst", "-sha256", "-verify", pub, "-signature", s, m)
	case "ecdsa-p384":
		out, ok = openssl(t, "dgst", "-sha384", "-verify", pub, "-signature", s, m)
	case "ed25519":
		out, ok = openssl(t, "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", m, "-sigfile", s)
	default:
		t.Fatalf("no openssl check for %q", alg)
	}
	if ok != strings.Contains(out, "Verified Successfully") && ok != strings.Contains(out, "Verified OK") {
		t.Fatalf("openssl exit and output disagree: ok=%v %q", ok, out)
	}
	return ok
}

// opensslSign signs msg with a fresh key openssl makes of alg's kind.
func opensslSign(t *testing.T, alg string, msg []byte) []byte {
	t.Helper()
	dir := t.TempDir()
	key, m, s := filepath.Join(dir, "key.pem"), filepath.Join(dir, "msg"), filepath.Join(dir, "sig")
	if err := os.WriteFile(m, msg, 0o600); err != nil {
		t.Fatal(err)
	}
	gen := map[string][]string{
		"ecdsa-p256": {"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key},
		"ecdsa-p384": {"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", key},
		"ed25519":    {"genpkey", "-algorithm", "ED25519", "-out", key},
	}[alg]
	if out, ok := openssl(t, gen...); !ok {
		t.Fatalf("openssl genpkey: %s", out)
	}
	sign := []string{"pkeyutl", "-sign", "-inkey", key, "-rawin", "-in", m, "-out", s}
	if alg != "ed25519" {
		sign = []string{"dgst", map[string]string{"ecdsa-p256": "-sha256", "ecdsa-p384": "-sha384"}[alg], "-sign", key, "-out", s, m}
	}
	if out, ok := openssl(t, sign...); !ok {
		t.Fatalf("openssl sign: %s", out)
	}
	sig, err := os.ReadFile(s)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// TestCryptoSignatures: what keywardd signs, openssl verifies under the
// public key keywardd exports, for every signing algorithm, from a message
// or (ECDSA) a digest; a changed message or signature, or a signature by
// another key, verifies neither with openssl nor with keywardd; a digest of
// the wrong size or for Ed25519 is refused, as are keys of another purpose
// and keywardd's own; a signature made before a rotation still verifies.
func TestCryptoSignatures(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(daemontest.AllowAll()))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	cc := keywardv1.NewCryptoServiceClient(in.Conn)
	msg := []byte("pay 100 to alice\n")
	for _, tc := range []struct {
		alg  keywardv1.KeyAlgorithm
		name string
	}{
		{keywardv1.KeyAlgorithm_KEY_ALGORITHM_ECDSA_P256, "ecdsa-p256"},
		{keywardv1.KeyAlgorithm_KEY_ALGORITHM_ECDSA_P384, "ecdsa-p384"},
		{keywardv1.KeyAlgorithm_KEY_ALGORITHM_ED25519, "ed25519"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "sig-" + tc.name
			if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: key, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN, Algorithm: tc.alg, Labels: raw}); err != nil {
				t.Fatal(err)
			}
			s, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: key, Input: &keywardv1.SignRequest_Message{Message: msg}})
			if err != nil {
				t.Fatal(err)
			}
			if s.Algorithm != tc.name || s.KeyVersion != 1 || s.KeyName != key {
				t.Fatalf("signed by %s v%d (%s)", s.KeyName, s.KeyVersion, s.Algorithm)
			}
			pk, err := cc.GetPublicKey(ctx, &keywardv1.GetPublicKeyRequest{KeyName: key})
			if err != nil {
				t.Fatal(err)
			}
			if pk.KeyVersion != 1 || pk.Algorithm != tc.name {
				t.Fatalf("public key of v%d (%s)", pk.KeyVersion, pk.Algorithm)
			}
			if !opensslVerify(t, tc.name, pk.PublicKeyPem, msg, s.Signature) {
				t.Fatal("openssl refuses keywardd's signature")
			}
			changed := bytes.Clone(s.Signature)
			changed[len(changed)/2] ^= 1
			if opensslVerify(t, tc.name, pk.PublicKeyPem, msg, changed) {
				t.Fatal("openssl accepts a changed signature")
			}
			if opensslVerify(t, tc.name, pk.PublicKeyPem, []byte("pay 900 to alice\n"), s.Signature) {
				t.Fatal("openssl accepts the signature of another message")
			}

			verify := func(v uint32, m, sig []byte) (bool, uint32) {
				t.Helper()
				r, err := cc.Verify(ctx, &keywardv1.VerifyRequest{KeyName: key, KeyVersion: v, Input: &keywardv1.VerifyRequest_Message{Message: m}, Signature: sig})
				if err != nil {
					t.Fatal(err)
				}
				return r.Valid, r.KeyVersion
			}
			if ok, v := verify(0, msg, s.Signature); !ok || v != 1 {
				t.Fatalf("keywardd's own signature: valid %v v%d", ok, v)
			}
			if ok, _ := verify(1, msg, changed); ok {
				t.Fatal("keywardd accepts a changed signature")
			}
			if ok, _ := verify(0, []byte("pay 900 to alice\n"), s.Signature); ok {
				t.Fatal("keywardd accepts the signature of another message")
			}
			foreign := opensslSign(t, tc.name, msg)
			if ok, _ := verify(0, msg, foreign); ok {
				t.Fatal("keywardd accepts a signature by openssl's own key")
			}
			if ok, _ := verify(0, msg, nil); ok {
				t.Fatal("keywardd accepts an empty signature")
			}

			if tc.name == "ed25519" {
				_, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: key, Input: &keywardv1.SignRequest_Digest{Digest: make([]byte, 32)}})
				wantCode(t, err, codes.InvalidArgument, "sign the message itself")
			} else {
				var d []byte
				if tc.name == "ecdsa-p256" {
					h := sha256.Sum256(msg)
					d = h[:]
				} else {
					h := sha512.Sum384(msg)
					d = h[:]
				}
				ds, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: key, Input: &keywardv1.SignRequest_Digest{Digest: d}})
				if err != nil {
					t.Fatal(err)
				}
				if !opensslVerify(t, tc.name, pk.PublicKeyPem, msg, ds.Signature) {
					t.Fatal("openssl refuses keywardd's signature of a digest")
				}
				r, err := cc.Verify(ctx, &keywardv1.VerifyRequest{KeyName: key, Input: &keywardv1.VerifyRequest_Digest{Digest: d}, Signature: s.Signature})
				if err != nil || !r.Valid {
					t.Fatalf("a message's signature checked by its digest: %v %v", r, err)
				}
				_, err = cc.Sign(ctx, &keywardv1.SignRequest{KeyName: key, Input: &keywardv1.SignRequest_Digest{Digest: append(d, 0)}})
				wantCode(t, err, codes.InvalidArgument, "digest")
			}

			// A rotation: the old signature still verifies under v1.
			if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: key}); err != nil {
				t.Fatal(err)
			}
			if ok, v := verify(0, msg, s.Signature); !ok || v != 1 {
				t.Fatalf("after a rotation: valid %v v%d", ok, v)
			}
			if ok, _ := verify(2, msg, s.Signature); ok {
				t.Fatal("v1's signature verifies as v2's")
			}
			_, err = cc.Verify(ctx, &keywardv1.VerifyRequest{KeyName: key, KeyVersion: 9, Input: &keywardv1.VerifyRequest_Message{Message: msg}, Signature: s.Signature})
			wantCode(t, err, codes.FailedPrecondition, "no version 9")
		})
	}

	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "m", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC}); err != nil {
		t.Fatal(err)
	}
	_, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "m", Input: &keywardv1.SignRequest_Message{Message: msg}})
	wantCode(t, err, codes.FailedPrecondition, "purpose sign")
	_, err = cc.GetPublicKey(ctx, &keywardv1.GetPublicKeyRequest{KeyName: "m"})
	wantCode(t, err, codes.FailedPrecondition, "purpose sign")
	_, err = cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "sig-ed25519", Input: &keywardv1.SignRequest_Message{Message: make([]byte, 64<<10+1)}})
	wantCode(t, err, codes.ResourceExhausted, "64 KiB")
	_, err = cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "nope", Input: &keywardv1.SignRequest_Message{Message: msg}})
	wantCode(t, err, codes.NotFound, "nope")
	_, err = cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "keyward-audit", Input: &keywardv1.SignRequest_Message{Message: msg}})
	wantCode(t, err, codes.PermissionDenied, "keywardd's own keys")

	// The audit record names the key and the version that signed.
	ac := keywardv1.NewAuditServiceClient(in.Conn)
	recs, err := ac.ListAuditRecords(ctx, &keywardv1.ListAuditRecordsRequest{Operation: "CryptoService.Sign", Outcome: keywardv1.AuditOutcome_AUDIT_OUTCOME_OK})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range recs.Records {
		found = found || r.Key == "sig-ecdsa-p384" && r.KeyVersion == 1
	}
	if !found {
		t.Fatalf("no audit record of sig-ecdsa-p384 v1 signing in %v", recs.Records)
	}
}

// createKeys makes keys of the purposes given, each of its purpose's
// default algorithm.
func createKeys(t *testing.T, kc keywardv1.KeyServiceClient, keys map[string]keywardv1.KeyPurpose) {
	t.Helper()
	for name, p := range keys {
		if _, err := kc.CreateKey(context.Background(), &keywardv1.CreateKeyRequest{Name: name, Purpose: p, Labels: raw}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCryptoMAC: a MAC verifies under the version that made it and under no
// other, nor for a changed message or MAC; an encryption key and
// keywardd's own keys are refused; random bytes come in the length asked.
func TestCryptoMAC(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(daemontest.AllowAll()))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	cc := keywardv1.NewCryptoServiceClient(in.Conn)
	createKeys(t, kc, map[string]keywardv1.KeyPurpose{"m": keywardv1.KeyPurpose_KEY_PURPOSE_HMAC, "e": keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT})
	msg := []byte("order 42 shipped")
	g, err := cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "m", Message: msg})
	if err != nil {
		t.Fatal(err)
	}
	if len(g.Mac) != 32 || g.KeyVersion != 1 {
		t.Fatalf("a %d-byte MAC by v%d", len(g.Mac), g.KeyVersion)
	}
	if _, err := kc.RotateKey(ctx, &keywardv1.RotateKeyRequest{Name: "m"}); err != nil {
		t.Fatal(err)
	}
	g2, err := cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "m", Message: msg})
	if err != nil {
		t.Fatal(err)
	}
	if g2.KeyVersion != 2 || bytes.Equal(g2.Mac, g.Mac) {
		t.Fatalf("after a rotation: v%d, same MAC %v", g2.KeyVersion, bytes.Equal(g2.Mac, g.Mac))
	}
	changed := bytes.Clone(g.Mac)
	changed[0] ^= 0x80
	for _, tc := range []struct {
		name    string
		version uint32
		msg     []byte
		mac     []byte
		want    bool
	}{
		{"its own", 1, msg, g.Mac, true},
		{"the newest by default", 0, msg, g2.Mac, true},
		{"another version's", 2, msg, g.Mac, false},
		{"a changed message", 1, []byte("order 43 shipped"), g.Mac, false},
		{"a changed MAC", 1, msg, changed, false},
		{"a truncated MAC", 1, msg, g.Mac[:16], false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := cc.VerifyMAC(ctx, &keywardv1.VerifyMACRequest{KeyName: "m", KeyVersion: tc.version, Message: tc.msg, Mac: tc.mac})
			if err != nil {
				t.Fatal(err)
			}
			if r.Valid != tc.want {
				t.Fatalf("valid %v, want %v", r.Valid, tc.want)
			}
		})
	}
	_, err = cc.VerifyMAC(ctx, &keywardv1.VerifyMACRequest{KeyName: "m", KeyVersion: 3, Message: msg, Mac: g.Mac})
	wantCode(t, err, codes.FailedPrecondition, "no version 3")
	_, err = cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "e", Message: msg})
	wantCode(t, err, codes.FailedPrecondition, "purpose hmac")
	_, err = cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "m"})
	wantCode(t, err, codes.InvalidArgument, "empty message")
	_, err = cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "keyward-audit", Message: msg})
	wantCode(t, err, codes.PermissionDenied, "keywardd's own keys")

	a, err := cc.GenerateRandom(ctx, &keywardv1.GenerateRandomRequest{Length: 1024})
	if err != nil {
		t.Fatal(err)
	}
	b, err := cc.GenerateRandom(ctx, &keywardv1.GenerateRandomRequest{Length: 1024})
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Random) != 1024 || bytes.Equal(a.Random, b.Random) {
		t.Fatalf("random: %d bytes, the same twice %v", len(a.Random), bytes.Equal(a.Random, b.Random))
	}
	// An HMAC-SHA384 key: 48-byte MACs, named as such.
	if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "m384", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_HMAC, Algorithm: keywardv1.KeyAlgorithm_KEY_ALGORITHM_HMAC_SHA384}); err != nil {
		t.Fatal(err)
	}
	g3, err := cc.GenerateMAC(ctx, &keywardv1.GenerateMACRequest{KeyName: "m384", Message: msg})
	if err != nil || len(g3.Mac) != 48 || g3.Algorithm != "hmac-sha384" {
		t.Fatalf("GenerateMAC with an HMAC-SHA384 key = %v, %v", g3, err)
	}
	if g.Algorithm != "hmac-sha256" {
		t.Fatalf("the default hmac key's algorithm: %q", g.Algorithm)
	}
	if r, err := cc.VerifyMAC(ctx, &keywardv1.VerifyMACRequest{KeyName: "m384", Message: msg, Mac: g3.Mac}); err != nil || !r.Valid {
		t.Fatalf("VerifyMAC with an HMAC-SHA384 key = %v, %v", r, err)
	}
	if r, err := cc.VerifyMAC(ctx, &keywardv1.VerifyMACRequest{KeyName: "m384", Message: msg, Mac: g3.Mac[:32]}); err != nil || r.Valid {
		t.Fatalf("VerifyMAC of a truncated HMAC-SHA384 = %v, %v", r, err)
	}

	for _, n := range []uint32{0, 1025} {
		_, err = cc.GenerateRandom(ctx, &keywardv1.GenerateRandomRequest{Length: n})
		wantCode(t, err, codes.InvalidArgument, "ask for 1 to 1024")
	}
}

// TestCryptoPolicy: each call is the policy's to grant on the key it names;
// GenerateRandom, on no key, is granted by any permission listing it.
func TestCryptoPolicy(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(`      - operations: ["KeyService.*"]
        keys: ["*"]
      - operations: [CryptoService.Sign, CryptoService.GenerateRandom]
        keys: ["app-*"]`)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	cc := keywardv1.NewCryptoServiceClient(in.Conn)
	for _, k := range []string{"app-s", "other-s"} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: k, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN, Labels: raw}); err != nil {
			t.Fatal(err)
		}
	}
	msg := &keywardv1.SignRequest_Message{Message: []byte("x")}
	if _, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "app-s", Input: msg}); err != nil {
		t.Fatal(err)
	}
	_, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "other-s", Input: msg})
	wantCode(t, err, codes.PermissionDenied, `CryptoService.Sign on key "other-s"`)
	_, err = cc.GetPublicKey(ctx, &keywardv1.GetPublicKeyRequest{KeyName: "app-s"})
	wantCode(t, err, codes.PermissionDenied, "CryptoService.GetPublicKey")
	if r, err := cc.GenerateRandom(ctx, &keywardv1.GenerateRandomRequest{Length: 16}); err != nil || len(r.Random) != 16 {
		t.Fatalf("GenerateRandom = %v, %v", r, err)
	}
}

// TestCryptoBatch: each item of a batch is answered on its own, as its
// single call would be, and audited with its key and version; a batch over
// the caller's limit is refused whole.
func TestCryptoBatch(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	cc := keywardv1.NewCryptoServiceClient(in.Conn)
	createKeys(t, kc, map[string]keywardv1.KeyPurpose{"s": keywardv1.KeyPurpose_KEY_PURPOSE_SIGN, "m": keywardv1.KeyPurpose_KEY_PURPOSE_HMAC})
	signReq := func(key, msg string) *keywardv1.SignRequest {
		return &keywardv1.SignRequest{KeyName: key, Input: &keywardv1.SignRequest_Message{Message: []byte(msg)}}
	}
	bs, err := cc.BatchSign(ctx, &keywardv1.BatchSignRequest{Items: []*keywardv1.SignRequest{
		signReq("s", "one"), signReq("m", "two"), signReq("keyward-audit", "three"), signReq("s", "four")}})
	if err != nil {
		t.Fatal(err)
	}
	r := bs.Results
	if len(r) != 4 || r[0].GetOk() == nil || r[3].GetOk() == nil ||
		codes.Code(r[1].GetError().GetCode()) != codes.FailedPrecondition || !strings.Contains(r[1].GetError().GetMessage(), "purpose sign") ||
		codes.Code(r[2].GetError().GetCode()) != codes.PermissionDenied {
		t.Fatalf("BatchSign = %v", r)
	}
	pk, err := cc.GetPublicKey(ctx, &keywardv1.GetPublicKeyRequest{KeyName: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if !opensslVerify(t, pk.Algorithm, pk.PublicKeyPem, []byte("four"), r[3].GetOk().Signature) {
		t.Fatal("openssl refuses a batch item's signature")
	}
	verifyReq := func(msg string, sig []byte) *keywardv1.VerifyRequest {
		return &keywardv1.VerifyRequest{KeyName: "s", Input: &keywardv1.VerifyRequest_Message{Message: []byte(msg)}, Signature: sig}
	}
	bv, err := cc.BatchVerify(ctx, &keywardv1.BatchVerifyRequest{Items: []*keywardv1.VerifyRequest{
		verifyReq("one", r[0].GetOk().Signature), verifyReq("one", r[3].GetOk().Signature)}})
	if err != nil {
		t.Fatal(err)
	}
	if !bv.Results[0].GetOk().GetValid() || bv.Results[1].GetOk() == nil || bv.Results[1].GetOk().GetValid() {
		t.Fatalf("BatchVerify = %v", bv.Results)
	}

	bm, err := cc.BatchGenerateMAC(ctx, &keywardv1.BatchGenerateMACRequest{Items: []*keywardv1.GenerateMACRequest{
		{KeyName: "m", Message: []byte("one")}, {KeyName: "m"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(bm.Results[0].GetOk().GetMac()) != 32 || codes.Code(bm.Results[1].GetError().GetCode()) != codes.InvalidArgument {
		t.Fatalf("BatchGenerateMAC = %v", bm.Results)
	}
	mac := bm.Results[0].GetOk().GetMac()
	bvm, err := cc.BatchVerifyMAC(ctx, &keywardv1.BatchVerifyMACRequest{Items: []*keywardv1.VerifyMACRequest{
		{KeyName: "m", Message: []byte("one"), Mac: mac}, {KeyName: "m", Message: []byte("two"), Mac: mac}}})
	if err != nil {
		t.Fatal(err)
	}
	if !bvm.Results[0].GetOk().GetValid() || bvm.Results[1].GetOk() == nil || bvm.Results[1].GetOk().GetValid() {
		t.Fatalf("BatchVerifyMAC = %v", bvm.Results)
	}

	// uidPolicy's role allows batches of 5.
	var six []*keywardv1.GenerateMACRequest
	for range 6 {
		six = append(six, &keywardv1.GenerateMACRequest{KeyName: "m", Message: []byte("x")})
	}
	_, err = cc.BatchGenerateMAC(ctx, &keywardv1.BatchGenerateMACRequest{Items: six})
	wantCode(t, err, codes.InvalidArgument, "at most 5")

	recs, err := keywardv1.NewAuditServiceClient(in.Conn).ListAuditRecords(ctx, &keywardv1.ListAuditRecordsRequest{Operation: "CryptoService.BatchSign"})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs.Records) != 1 || recs.Records[0].Items != 4 {
		t.Fatalf("BatchSign's audit records: %v", recs.Records)
	}
}

// raw is the label of a signing key made for CryptoService.Sign.
var raw = map[string]string{keys.UseLabel: keys.UseRaw}

// TestTokenKeysApart: a signing key made for CryptoService.Sign mints no
// token, and a key that mints tokens signs nothing through CryptoService.
func TestTokenKeysApart(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(fmt.Sprintf(`version: 1
roles:
  all:
    permissions:
      - operations: ["*"]
        keys: ["*"]
    tokens:
      audiences: [orders]
bindings:
  - role: all
    callers:
      - uid: %d
`, os.Getuid())))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	for name, labels := range map[string]map[string]string{"jwt": nil, "release": raw} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN, Labels: labels}); err != nil {
			t.Fatal(err)
		}
	}
	tc := keywardv1.NewTokenServiceClient(in.Conn)
	if _, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}}); err != nil {
		t.Fatalf("a token key mints: %v", err)
	}
	if _, err := tc.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "release", Audiences: []string{"orders"}}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("a raw signing key minted a token: %v", err)
	}
	cc := keywardv1.NewCryptoServiceClient(in.Conn)
	if _, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "jwt", Input: &keywardv1.SignRequest_Message{Message: []byte("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJyb290In0")}}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("a token key signed raw bytes (a forged token): %v", err)
	}
	if _, err := cc.Sign(ctx, &keywardv1.SignRequest{KeyName: "release", Input: &keywardv1.SignRequest_Message{Message: []byte("x")}}); err != nil {
		t.Errorf("a raw key does not sign: %v", err)
	}
}
