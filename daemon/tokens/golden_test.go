package tokens

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyward/keyward/hsm"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// goldenFile is testdata/golden.json: tokens signed by known software keys
// (keyward's own never leave the HSM) and the JWK set of their public keys.
type goldenFile struct {
	JWKS   string        `json:"jwks_json"`
	Tokens []tokenVector `json:"tokens"`
}

// tokenVector is one golden token: its key (the private scalar of an ECDSA
// key, the seed of an Ed25519 one), its key ID, the exact bytes of its
// header and claims, and the token. ECDSA signatures are randomized, so an
// ES256 or ES384 token is verified, not made again; an EdDSA one is made
// again byte for byte.
type tokenVector struct {
	Name     string `json:"name"`
	Alg      string `json:"alg"`
	Private  string `json:"private_key_hex"`
	KID      string `json:"kid"`
	MintedAt string `json:"minted_at"`
	Header   string `json:"header_json"`
	Claims   string `json:"claims_json"`
	Token    string `json:"token"`
}

// goldenToken is a vector's inputs: Mint's, and the jti it would draw.
type goldenToken struct {
	name    string
	alg     jose.SignatureAlgorithm
	version uint32
	private []byte
	spec    Spec
	jti     string
}

// goldenMinted is when every golden token is minted: Mint drops the half
// second.
var goldenMinted = t0.Add(500 * time.Millisecond)

func goldenTokens() []goldenToken {
	seed := func(label string, n int) []byte {
		s := sha512.Sum512([]byte(label))
		return s[:n]
	}
	return []goldenToken{
		{name: "ES256, one audience, no custom claims", alg: jose.ES256, version: 1, private: seed("keyward golden ES256", 32), jti: "AAECAwQFBgcICQoLDA0ODw",
			spec: Spec{Issuer: "keyward", Subject: "uid:1000", Audience: []string{"orders"}, TTL: 5 * time.Minute, Scopes: []string{"orders:read"}}},
		{name: "ES384, two audiences, custom claims", alg: jose.ES384, version: 2, private: seed("keyward golden ES384", 48), jti: "_-_-_-_-_-_-_-_-_-_-_w",
			spec: Spec{Issuer: "keyward", Subject: "uid:1000", Audience: []string{"orders", "billing"}, TTL: time.Hour,
				Custom: map[string]any{"tenant": "42", "tier": 3, "regions": []string{"eu", "us"}}}},
		{name: "EdDSA, no scopes, a claim JSON escapes", alg: jose.EdDSA, version: 3, private: seed("keyward golden EdDSA", 32), jti: "ZGV0ZXJtaW5pc3RpYyEhIQ",
			spec: Spec{Issuer: "keyward", Subject: "uid:1000", Audience: []string{"orders"}, TTL: 90 * time.Second,
				Custom: map[string]any{"note": "<a & b>"}}},
	}
}

// softKey is a golden token's key, in software.
func softKey(t *testing.T, g goldenToken) (crypto.Signer, *Key) {
	t.Helper()
	var priv crypto.Signer
	switch g.alg {
	case jose.ES256, jose.ES384:
		curve := elliptic.P256()
		if g.alg == jose.ES384 {
			curve = elliptic.P384()
		}
		k, err := ecdsa.ParseRawPrivateKey(curve, g.private)
		if err != nil {
			t.Fatal(err)
		}
		priv = k
	case jose.EdDSA:
		priv = ed25519.NewKeyFromSeed(g.private)
	}
	k, err := VerifyKey(hsm.KeyID{Name: "keyward-tokens", Version: g.version}, g.alg, priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return priv, k
}

// signSoft signs a JWS signing input as keyward does: Ed25519 over the
// input, ECDSA over its SHA-256 or SHA-384 as r‖s in the low-S form.
func signSoft(t *testing.T, priv crypto.Signer, alg jose.SignatureAlgorithm, input string) []byte {
	t.Helper()
	if alg == jose.EdDSA {
		return ed25519.Sign(priv.(ed25519.PrivateKey), []byte(input))
	}
	k := priv.(*ecdsa.PrivateKey)
	var digest []byte
	size := 32
	if alg == jose.ES256 {
		d := sha256.Sum256([]byte(input))
		digest = d[:]
	} else {
		d := sha512.Sum384([]byte(input))
		digest, size = d[:], 48
	}
	r, s, err := ecdsa.Sign(rand.Reader, k, digest)
	if err != nil {
		t.Fatal(err)
	}
	if n := k.Curve.Params().N; s.Cmp(new(big.Int).Rsh(n, 1)) > 0 {
		s.Sub(n, s)
	}
	out := make([]byte, 2*size)
	r.FillBytes(out[:size])
	s.FillBytes(out[size:])
	return out
}

// mintedParts mints the vector's token with an HSM key of its algorithm
// (Mint signs only with the HSM) and returns its header and claims with
// the two random parts, the HSM key's kid and the jti Mint drew, replaced
// by the vector's: every other byte is Mint's.
func mintedParts(t *testing.T, hsmKey *Key, g goldenToken, kid string) (header, claims string) {
	t.Helper()
	m, err := Mint(context.Background(), hsmKey, g.spec, goldenMinted)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(m.Token, ".")
	h, _ := base64.RawURLEncoding.DecodeString(parts[0])
	c, _ := base64.RawURLEncoding.DecodeString(parts[1])
	if id, err := base64.RawURLEncoding.Strict().DecodeString(m.ID); err != nil || len(id) != 16 {
		t.Fatalf("Mint drew the jti %q; want 16 random bytes in base64url", m.ID)
	}
	header = strings.Replace(string(h), `"kid":"`+hsmKey.KID+`"`, `"kid":"`+kid+`"`, 1)
	claims = strings.Replace(string(c), `"jti":"`+m.ID+`"`, `"jti":"`+g.jti+`"`, 1)
	return header, claims
}

// TestGolden: testdata/golden.json's tokens verify with today's Verifier
// against the keys of its JWK set (and with go-jose, golang-jwt and
// python3-jwt, crossCheck), and today's code writes the same JWK set, key
// IDs, headers and claims byte for byte: Mint with an HSM key of each
// algorithm writes every byte of the header and claims but the kid and
// jti (which are random there) as the vectors hold them, and the EdDSA
// token is made again whole. A change here is a change of the token or
// JWKS format.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	var old goldenFile
	if b, err := os.ReadFile(path); err == nil {
		json.Unmarshal(b, &old)
	}
	hsmKeys := keys(t)
	var made goldenFile
	var soft []*Key
	for i, g := range goldenTokens() {
		priv, k := softKey(t, g)
		soft = append(soft, k)
		header, claims := mintedParts(t, hsmKeys[g.alg], g, k.KID)
		input := base64.RawURLEncoding.EncodeToString([]byte(header)) + "." + base64.RawURLEncoding.EncodeToString([]byte(claims))
		token := input + "." + base64.RawURLEncoding.EncodeToString(signSoft(t, priv, g.alg, input))
		if g.alg != jose.EdDSA && i < len(old.Tokens) && strings.HasPrefix(old.Tokens[i].Token, input+".") {
			token = old.Tokens[i].Token // a new ECDSA signature would change the file for nothing
		}
		made.Tokens = append(made.Tokens, tokenVector{Name: g.name, Alg: string(g.alg), Private: hex.EncodeToString(g.private), KID: k.KID,
			MintedAt: goldenMinted.Format(time.RFC3339Nano), Header: header, Claims: claims, Token: token})
	}
	set, err := json.Marshal(JWKS(soft...))
	if err != nil {
		t.Fatal(err)
	}
	made.JWKS = string(set)
	want := golden.JSON(t, path, made)
	if want.JWKS != made.JWKS {
		t.Errorf("the JWKS format changed%s:\n got %s\nwant %s\n(a change in %s is a format change; go test -update rewrites it)", reordered(made.JWKS, want.JWKS), made.JWKS, want.JWKS, path)
	}
	if len(want.Tokens) != len(made.Tokens) {
		t.Fatalf("%s holds %d tokens, the test makes %d (go test -update rewrites it)", path, len(want.Tokens), len(made.Tokens))
	}
	published := verifierFromJWKS(t, want.JWKS)
	for i, v := range want.Tokens {
		t.Run(v.Name, func(t *testing.T) {
			got := made.Tokens[i]
			for _, f := range []struct{ name, got, want string }{
				{"name", got.Name, v.Name}, {"alg", got.Alg, v.Alg}, {"private_key_hex", got.Private, v.Private}, {"kid", got.KID, v.KID},
				{"minted_at", got.MintedAt, v.MintedAt}, {"header_json", got.Header, v.Header}, {"claims_json", got.Claims, v.Claims},
			} {
				if f.got != f.want {
					t.Errorf("the token format changed: %s of %q%s:\n got %s\nwant %s\n(a change in %s is a format change; go test -update rewrites it)", f.name, v.Name, reordered(f.got, f.want), f.got, f.want, path)
				}
			}
			if parts := strings.Split(v.Token, "."); len(parts) != 3 || parts[0] != base64.RawURLEncoding.EncodeToString([]byte(v.Header)) ||
				parts[1] != base64.RawURLEncoding.EncodeToString([]byte(v.Claims)) {
				t.Errorf("the golden token of %q is not its header_json and claims_json, signed", v.Name)
			}
			if v.Alg == string(jose.EdDSA) && got.Token != v.Token {
				t.Errorf("the EdDSA token is made again as\n%s\nnot\n%s", got.Token, v.Token)
			}
			checkGoldenToken(t, published, v, goldenTokens()[i])
			crossCheck(t, published.Keys[v.KID], v.Token)
		})
	}
}

// verifierFromJWKS is a relying party's Verifier: its keys are read from a
// published JWK set.
func verifierFromJWKS(t *testing.T, set string) *Verifier {
	t.Helper()
	var parsed jose.JSONWebKeySet
	if err := json.Unmarshal([]byte(set), &parsed); err != nil {
		t.Fatalf("the golden JWKS does not parse: %v", err)
	}
	v := &Verifier{Keys: map[string]*Key{}, Issuer: "keyward"}
	for i, jwk := range parsed.Keys {
		if jwk.Use != "sig" || !jwk.Valid() || !jwk.IsPublic() {
			t.Fatalf("JWKS key %d: use %q, valid %v, public %v", i, jwk.Use, jwk.Valid(), jwk.IsPublic())
		}
		k, err := VerifyKey(hsm.KeyID{Name: "keyward-tokens", Version: uint32(i + 1)}, jose.SignatureAlgorithm(jwk.Algorithm), jwk.Key)
		if err != nil {
			t.Fatal(err)
		}
		if k.KID != jwk.KeyID {
			t.Fatalf("JWKS key %d: kid %s, but its thumbprint is %s", i, jwk.KeyID, k.KID)
		}
		v.Keys[k.KID] = k
	}
	return v
}

// checkGoldenToken: today's Verifier accepts the golden token and reads
// from it what was minted; a byte changed in any part is refused.
func checkGoldenToken(t *testing.T, v *Verifier, tv tokenVector, g goldenToken) {
	t.Helper()
	got, err := v.Verify(tv.Token, g.spec.Audience[len(g.spec.Audience)-1], t0.Add(time.Minute))
	if err != nil {
		t.Fatalf("today's Verifier refuses the golden token: %v", err)
	}
	c := got.Claims
	if c.ID != g.jti || c.Subject != g.spec.Subject || c.Issuer != g.spec.Issuer || !reflect.DeepEqual([]string(c.Audience), g.spec.Audience) ||
		!c.IssuedAt.Time().Equal(t0) || !c.NotBefore.Time().Equal(t0) || !c.Expiry.Time().Equal(t0.Add(g.spec.TTL)) ||
		!reflect.DeepEqual(got.Scopes, g.spec.Scopes) || got.KID != tv.KID || got.Key.Version != g.version {
		t.Fatalf("the golden token verifies as %+v", got)
	}
	wantCustom, _ := json.Marshal(g.spec.Custom)
	if custom, _ := json.Marshal(got.Custom); len(g.spec.Custom) > 0 && string(custom) != string(wantCustom) {
		t.Fatalf("custom claims %s, want %s", custom, wantCustom)
	}
	for i := range strings.Count(tv.Token, ".") + 1 {
		parts := strings.Split(tv.Token, ".")
		p := []byte(parts[i])
		if p[len(p)/2] == 'A' {
			p[len(p)/2] = 'B'
		} else {
			p[len(p)/2] = 'A'
		}
		parts[i] = string(p)
		if _, err := v.Verify(strings.Join(parts, "."), g.spec.Audience[0], t0.Add(time.Minute)); err == nil {
			t.Fatalf("the golden token with part %d changed verifies", i+1)
		} else if i == 2 && !errors.Is(err, ErrSignature) {
			t.Fatalf("the golden token with its signature changed: %v, want ErrSignature", err)
		}
	}
}

// reordered says when two different JSON texts hold the same members and
// values: a library's choice of order or spacing, which no reader of a
// token or a JWK set depends on, rather than a change of what they say.
func reordered(got, want string) string {
	var g, w any
	if json.Unmarshal([]byte(got), &g) != nil || json.Unmarshal([]byte(want), &w) != nil || !reflect.DeepEqual(g, w) {
		return ""
	}
	return " (only in order or spacing: the same members and values)"
}
