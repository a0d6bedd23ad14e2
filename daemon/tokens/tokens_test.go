package tokens

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"math/big"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	josejson "github.com/go-jose/go-jose/v4/json"
	"github.com/go-jose/go-jose/v4/jwt"
	gjwt "github.com/golang-jwt/jwt/v5"

	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/hsmtest"
)

var t0 = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

// keys makes one HSM signing key of each algorithm.
func keys(t *testing.T) map[jose.SignatureAlgorithm]*Key {
	t.Helper()
	h, _ := hsmtest.Open(t)
	ctx := context.Background()
	out := map[jose.SignatureAlgorithm]*Key{}
	for _, a := range []hsm.Algorithm{hsm.ECDSAP256, hsm.ECDSAP384, hsm.Ed25519} {
		id := hsm.KeyID{Name: "jwt-" + a.String(), Version: 1}
		if err := h.CreateKey(ctx, id, a); err != nil {
			t.Fatal(err)
		}
		s, err := h.Signer(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		k, err := NewKey(s, id)
		if err != nil {
			t.Fatal(err)
		}
		out[k.Alg] = k
	}
	return out
}

func verifier(ks ...*Key) *Verifier {
	v := &Verifier{Keys: map[string]*Key{}, Issuer: "keyward", Leeway: 30 * time.Second}
	for _, k := range ks {
		v.Keys[k.KID] = k
	}
	return v
}

var spec = Spec{Issuer: "keyward", Subject: "uid:1000", Audience: []string{"orders"}, TTL: 5 * time.Minute,
	Scopes: []string{"orders:read"}, Custom: map[string]any{"tenant": "42"}}

func TestMintAndVerify(t *testing.T) {
	ks := keys(t)
	ctx := context.Background()
	for alg, k := range ks {
		t.Run(string(alg), func(t *testing.T) {
			m, err := Mint(ctx, k, spec, t0)
			if err != nil {
				t.Fatal(err)
			}
			if m.KID != k.KID || !m.Expires.Equal(t0.Add(5*time.Minute)) || len(m.ID) != 22 {
				t.Fatalf("minted %+v", m)
			}
			got, err := verifier(k).Verify(m.Token, "orders", t0.Add(time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			if got.Claims.Subject != "uid:1000" || got.Claims.ID != m.ID || got.Custom["tenant"] != "42" || len(got.Scopes) != 1 || got.Scopes[0] != "orders:read" {
				t.Fatalf("verified %+v", got)
			}
			// An ES256 signature is the 64-byte r‖s of JWS, not DER.
			sig, _ := base64.RawURLEncoding.DecodeString(strings.Split(m.Token, ".")[2])
			if want := map[jose.SignatureAlgorithm]int{jose.ES256: 64, jose.ES384: 96, jose.EdDSA: 64}[alg]; len(sig) != want {
				t.Fatalf("%s signature of %d bytes, want %d", alg, len(sig), want)
			}
			crossCheck(t, k, m.Token)
		})
	}
	// The kid is the RFC 7638 thumbprint, computed independently here.
	k := ks[jose.ES256]
	pub := k.Public.(*ecdsa.PublicKey)
	b, _ := pub.Bytes()
	canon := `{"crv":"P-256","kty":"EC","x":"` + base64.RawURLEncoding.EncodeToString(b[1:33]) + `","y":"` + base64.RawURLEncoding.EncodeToString(b[33:]) + `"}`
	sum := sha256.Sum256([]byte(canon))
	if k.KID != base64.RawURLEncoding.EncodeToString(sum[:]) {
		t.Fatal("kid is not the RFC 7638 thumbprint")
	}
	for _, bad := range []Spec{
		{Issuer: "keyward", Subject: "s", Audience: []string{"a"}, TTL: time.Minute, Custom: map[string]any{"exp": 1}},
		{Issuer: "keyward", Subject: "s", Audience: []string{"a"}, TTL: time.Minute, Custom: map[string]any{"ſub": "root"}}, // "sub" to Go's encoding/json
		{Issuer: "keyward", Subject: "s", Audience: []string{"a"}, TTL: time.Minute, Custom: map[string]any{"Sub": "root"}},
		{Issuer: "keyward", Subject: "s", Audience: []string{""}, TTL: time.Minute},
		{Issuer: "keyward", Subject: "s", Audience: []string{"a"}},
	} {
		if _, err := Mint(ctx, k, bad, t0); !errors.Is(err, ErrInvalid) {
			t.Errorf("Mint(%+v) = %v, want ErrInvalid", bad, err)
		}
	}
	if _, err := VerifyKey(k.ID, jose.ES384, k.Public); !errors.Is(err, ErrInvalid) {
		t.Errorf("a P-256 key for ES384: %v", err)
	}
}

// crossCheck verifies a token with independent libraries against the
// published JWKS: go-jose, golang-jwt and, outside Go, Debian's python3-jwt.
func crossCheck(t *testing.T, k *Key, token string) {
	t.Helper()
	set, _ := json.Marshal(JWKS(k))
	var parsed jose.JSONWebKeySet
	if err := json.Unmarshal(set, &parsed); err != nil || len(parsed.Keys) != 1 || parsed.Keys[0].KeyID != k.KID {
		t.Fatalf("JWKS %s: %v", set, err)
	}
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{k.Alg})
	if err != nil {
		t.Fatal(err)
	}
	var c jwt.Claims
	if err := tok.Claims(parsed.Keys[0].Key, &c); err != nil || c.Subject != "uid:1000" {
		t.Fatalf("go-jose: %v", err)
	}
	gt, err := gjwt.Parse(token, func(*gjwt.Token) (any, error) { return parsed.Keys[0].Key, nil },
		gjwt.WithValidMethods([]string{string(k.Alg)}), gjwt.WithAudience("orders"), gjwt.WithIssuer("keyward"),
		gjwt.WithTimeFunc(func() time.Time { return t0.Add(time.Minute) }))
	if err != nil || !gt.Valid {
		t.Fatalf("golang-jwt: %v", err)
	}
	script := `
import json, sys, jwt
jwks, token, alg = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
key = jwt.PyJWKSet.from_dict(jwks).keys[0].key
claims = jwt.decode(token, key, algorithms=[alg], audience="orders", issuer="keyward", options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
print(claims["sub"])
`
	py, err := exec.LookPath("/usr/bin/python3")
	if err != nil {
		t.Fatal("python3 not found: install Debian's python3-jwt and python3-cryptography")
	}
	out, err := exec.Command(py, "-c", script, string(set), token, string(k.Alg)).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "uid:1000" {
		t.Fatalf("python3-jwt (Debian python3-jwt, python3-cryptography): %v\n%s", err, out)
	}
}

// sign signs arbitrary claims with k and extra header parameters, as a
// keyward key would if someone could make it sign anything.
func sign(t *testing.T, k *Key, claims map[string]any, header map[string]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.KID)
	for name, v := range header {
		opts = opts.WithHeader(jose.HeaderKey(name), v)
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: k.Alg, Key: opaque{ctx: context.Background(), k: k}}, opts)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(s).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func b64(v any) string {
	b, _ := json.Marshal(v)
	return base64.RawURLEncoding.EncodeToString(b)
}

func TestVerifyRefuses(t *testing.T) {
	ks := keys(t)
	k := ks[jose.ES256]
	v := verifier(k, ks[jose.EdDSA])
	v.Revoked = func(jti string) bool { return jti == "revoked-jti" }
	now := t0.Add(time.Minute)
	good := map[string]any{"iss": "keyward", "sub": "s", "aud": "orders", "iat": t0.Unix(), "nbf": t0.Unix(), "exp": t0.Add(5 * time.Minute).Unix(), "jti": "j1"}
	with := func(changes map[string]any) map[string]any {
		c := map[string]any{}
		for n, val := range good {
			c[n] = val
		}
		for n, val := range changes {
			if val == nil {
				delete(c, n)
			} else {
				c[n] = val
			}
		}
		return c
	}
	valid := sign(t, k, good, nil)
	if _, err := v.Verify(valid, "orders", now); err != nil {
		t.Fatalf("the control token: %v", err)
	}
	parts := strings.Split(valid, ".")
	pubDER, _ := x509.MarshalPKIXPublicKey(k.Public)
	hs := func(header map[string]any) string {
		in := b64(header) + "." + parts[1]
		m := hmac.New(sha256.New, pubDER)
		m.Write([]byte(in))
		return in + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	}
	raw, _ := base64.RawURLEncoding.DecodeString(parts[2])
	der, _ := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])})
	// The same signature with s replaced by n−s: valid ECDSA, but a second
	// spelling of the token.
	highS := make([]byte, 64)
	copy(highS, raw[:32])
	new(big.Int).Sub(elliptic.P256().Params().N, new(big.Int).SetBytes(raw[32:])).FillBytes(highS[32:])
	// The payload with the unused low bits of its last character set.
	loose := []byte(parts[1])
	last := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", loose[len(loose)-1])
	loose[len(loose)-1] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last|1]
	es384Header := map[string]any{"alg": "ES384", "kid": k.KID, "typ": "JWT"}

	for _, tc := range []struct {
		name  string
		token string
		aud   string
		at    time.Time
		want  error
	}{
		{"alg none", b64(map[string]any{"alg": "none", "kid": k.KID}) + "." + parts[1] + ".", "orders", now, ErrAlgorithm},
		{"HS256 with the public key as secret", hs(map[string]any{"alg": "HS256", "kid": k.KID, "typ": "JWT"}), "orders", now, ErrAlgorithm},
		{"the header names another algorithm than the key's", b64(es384Header) + "." + parts[1] + "." + parts[2], "orders", now, ErrAlgorithm},
		{"unknown kid", sign(t, ks[jose.ES384], good, nil), "orders", now, ErrUnknownKey},
		{"kid with path characters", b64(map[string]any{"alg": "ES256", "kid": "../../keys/x", "typ": "JWT"}) + "." + parts[1] + "." + parts[2], "orders", now, ErrUnknownKey},
		{"jku", sign(t, k, good, map[string]any{"jku": "https://evil.example/jwks"}), "orders", now, ErrHeader},
		{"x5u", sign(t, k, good, map[string]any{"x5u": "https://evil.example/cert"}), "orders", now, ErrHeader},
		{"crit", sign(t, k, good, map[string]any{"crit": []string{"exp"}}), "orders", now, ErrHeader},
		{"embedded jwk", sign(t, k, good, map[string]any{"jwk": k.JWK()}), "orders", now, ErrHeader},
		{"missing exp", sign(t, k, with(map[string]any{"exp": nil}), nil), "orders", now, ErrMissing},
		{"missing aud", sign(t, k, with(map[string]any{"aud": nil}), nil), "orders", now, ErrMissing},
		{"missing jti", sign(t, k, with(map[string]any{"jti": nil}), nil), "orders", now, ErrMissing},
		{"expired beyond the leeway", valid, "orders", t0.Add(5*time.Minute + 31*time.Second), ErrExpired},
		{"nbf in the future", sign(t, k, with(map[string]any{"nbf": t0.Add(time.Hour).Unix()}), nil), "orders", now, ErrNotYet},
		{"wrong aud", valid, "billing", now, ErrAudience},
		{"wrong iss", sign(t, k, with(map[string]any{"iss": "someone"}), nil), "orders", now, ErrIssuer},
		{"revoked jti", sign(t, k, with(map[string]any{"jti": "revoked-jti"}), nil), "orders", now, ErrRevoked},
		{"DER signature", parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(der), "orders", now, ErrSignature},
		{"changed claims", parts[0] + "." + b64(with(map[string]any{"sub": "root"})) + "." + parts[2], "orders", now, ErrSignature},
		{"high-S signature", parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(highS), "orders", now, ErrSignature},
		{"loose base64", parts[0] + "." + string(loose) + "." + parts[2], "orders", now, ErrMalformed},
		{"a line break in a part", parts[0] + "." + parts[1][:10] + "\r\n" + parts[1][10:] + "." + parts[2], "orders", now, ErrMalformed},
		{"missing iss", sign(t, k, with(map[string]any{"iss": nil}), nil), "orders", now, ErrMissing},
		{"not a token", "abc", "orders", now, ErrMalformed},
		{"too long", strings.Repeat("a", 9000), "orders", now, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.Verify(tc.token, tc.aud, tc.at)
			if !errors.Is(err, tc.want) || got != nil {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	// Within the leeway an expired token still passes; the leeway is capped.
	if _, err := v.Verify(valid, "orders", t0.Add(5*time.Minute+29*time.Second)); err != nil {
		t.Fatalf("within the leeway: %v", err)
	}
	v.Leeway = 2 * time.Minute
	if _, err := v.Verify(valid, "orders", now); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a 2-minute leeway: %v", err)
	}
}

// FuzzVerify: no input makes Verify panic, and nothing it accepts lacks the
// claims it requires.
func FuzzVerify(f *testing.F) {
	f.Add("eyJhbGciOiJFUzI1NiJ9.e30.")
	f.Add("a.b.c")
	f.Add(b64(map[string]any{"alg": "ES256", "kid": strings.Repeat("A", 43)}) + "." + b64(map[string]any{"exp": 1}) + ".AAAA")
	k, _ := VerifyKey(hsm.KeyID{Name: "k", Version: 1}, jose.ES256, mustP256())
	v := verifier(k)
	f.Fuzz(func(t *testing.T, token string) {
		got, err := v.Verify(token, "orders", t0)
		if err == nil && (got.Claims.Expiry == nil || len(got.Claims.Audience) == 0) {
			t.Fatal("accepted a token without exp or aud")
		}
	})
}

func mustP256() *ecdsa.PublicKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return &k.PublicKey
}

// TestCache: a token verified before is accepted from the cache, but its
// time, audience and revocation are checked on every hit, and a new key
// generation empties the cache.
func TestCache(t *testing.T) {
	ks := keys(t)
	k := ks[jose.ES256]
	revoked := map[string]bool{}
	v := verifier(k)
	v.Revoked = func(jti string) bool { return revoked[jti] }
	m, err := Mint(context.Background(), k, spec, t0)
	if err != nil {
		t.Fatal(err)
	}
	c := NewCache()
	if _, err := c.Verify(v, 1, m.Token, "orders", t0); err != nil {
		t.Fatal(err)
	}
	delete(v.Keys, k.KID) // only the cache can accept it now
	if got, err := c.Verify(v, 1, m.Token, "orders", t0.Add(time.Minute)); err != nil || got.Claims.ID != m.ID {
		t.Fatalf("a cache hit: %v", err)
	}
	for _, tc := range []struct {
		name string
		aud  string
		at   time.Time
		want error
	}{
		{"expired", "orders", t0.Add(6 * time.Minute), ErrExpired},
		{"another audience", "billing", t0, ErrAudience},
	} {
		if _, err := c.Verify(v, 1, m.Token, tc.aud, tc.at); !errors.Is(err, tc.want) {
			t.Errorf("%s on a hit: %v, want %v", tc.name, err, tc.want)
		}
	}
	revoked[m.ID] = true
	if _, err := c.Verify(v, 1, m.Token, "orders", t0); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked on a hit: %v", err)
	}
	delete(revoked, m.ID)
	if _, err := c.Verify(v, 2, m.Token, "orders", t0); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("a new generation still used the cache: %v", err)
	}
}

// TestClaimsJSON: the payload is the same JSON object, member for member
// and value for value, as go-jose's jwt builder makes of the same claims,
// read by go-jose's JSON decoder (which refuses a member name twice).
func TestClaimsJSON(t *testing.T) {
	reg := jwt.Claims{Issuer: "keyward", Subject: "uid:1000", Audience: jwt.Audience{"a", "b"},
		Expiry: jwt.NewNumericDate(t0.Add(time.Minute)), NotBefore: jwt.NewNumericDate(t0), IssuedAt: jwt.NewNumericDate(t0), ID: "id"}
	one := reg
	one.Audience = jwt.Audience{"a"}
	hs, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: make([]byte, 32)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		reg    jwt.Claims
		scopes []string
		custom map[string]any
	}{
		{"registered only", reg, nil, nil},
		{"one audience", one, nil, nil},
		{"empty custom", reg, nil, map[string]any{}},
		{"scopes", reg, []string{"x:r"}, nil},
		{"custom", reg, nil, map[string]any{"tenant": "42", "n": 1.5, "big": 1e6, "o": map[string]any{"k": []any{true, nil}}}},
		{"both", reg, []string{"x:r", "y:w"}, map[string]any{"tenant": "<&>\u2028"}},
		{"no registered claim", jwt.Claims{}, nil, map[string]any{"x": 1.0}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := claimsJSON(c.reg, Spec{Scopes: c.scopes, Custom: c.custom})
			if err != nil {
				t.Fatal(err)
			}
			b := jwt.Signed(hs).Claims(c.reg)
			if len(c.scopes) > 0 {
				b = b.Claims(map[string]any{"scope": c.scopes})
			}
			if len(c.custom) > 0 {
				b = b.Claims(c.custom)
			}
			tok, err := b.Serialize()
			if err != nil {
				t.Fatal(err)
			}
			want, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
			if err != nil {
				t.Fatal(err)
			}
			var g, w map[string]any
			if err := josejson.Unmarshal(got, &g); err != nil {
				t.Fatalf("%s does not read as one JSON object: %v", got, err)
			}
			if err := josejson.Unmarshal(want, &w); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(g, w) {
				t.Fatalf("claims\n got %s\nwant %s (go-jose's builder)", got, want)
			}
		})
	}
	// A value JSON has no number for is the caller's mistake.
	if _, err := claimsJSON(reg, Spec{Custom: map[string]any{"x": math.NaN()}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a NaN claim: %v, want ErrInvalid", err)
	}
}

// TestReservedNames: every claim jwt.Claims marshals is reserved, so a
// custom claim can never repeat one (claimsJSON splices them unchecked).
func TestReservedNames(t *testing.T) {
	ty := reflect.TypeFor[jwt.Claims]()
	for i := range ty.NumField() {
		name, _, _ := strings.Cut(ty.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" && !slices.Contains(reserved, name) {
			t.Errorf("jwt.Claims marshals %q, which a custom claim may name: add it to reserved", name)
		}
	}
	if !slices.Contains(reserved, "scope") {
		t.Error("scope is not reserved")
	}
}
