package daemon_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

func freePort(t *testing.T, host string) string {
	l, err := net.Listen("tcp", host+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestJWKSOverHTTP: verifiers elsewhere get the JWKS and the OpenID
// configuration over HTTP on loopback, cacheable for half the pre-publish
// time, and nothing else.
func TestJWKSOverHTTP(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(tokenPolicy()))
	in.Stop()
	addr := freePort(t, "127.0.0.1")
	in.Config.Tokens.HTTP.Address = addr
	in.Restart()
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "jwt", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}); err != nil {
		t.Fatal(err)
	}
	m, err := keywardv1.NewTokenServiceClient(in.Conn).MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "jwt", Audiences: []string{"orders"}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr + "/.well-known/jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil || len(set.Key(m.Kid)) != 1 {
		t.Fatalf("JWKS over HTTP: %s, %v", body, err)
	}
	if cc := resp.Header.Get("Cache-Control"); cc != "public, max-age=300" {
		t.Fatalf("Cache-Control %q, want half the 10-minute pre-publish time", cc)
	}
	resp, _ = http.Get("http://" + addr + "/.well-known/openid-configuration")
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	var oidc map[string]any
	json.Unmarshal(body, &oidc)
	if oidc["issuer"] != "keyward" || oidc["jwks_uri"] != "http://"+addr+"/.well-known/jwks.json" {
		t.Fatalf("openid-configuration: %s", body)
	}
	for _, tc := range []struct {
		method, path string
		code         int
	}{{"POST", "/.well-known/jwks.json", 405}, {"GET", "/", 404}, {"GET", "/.well-known/../etc/passwd", 404}} {
		req, _ := http.NewRequest(tc.method, "http://"+addr+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, resp.StatusCode, tc.code)
		}
	}
}

// TestJWKSOverTLS: bound beyond loopback the listener needs a certificate,
// and speaks TLS 1.3 only.
func TestJWKSOverTLS(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(tokenPolicy()))
	in.Stop()
	in.Config.Tokens.HTTP.Address = freePort(t, "0.0.0.0")
	errc := make(chan error, 1)
	go func() { errc <- in.RunOnce() }()
	if err := <-errc; err == nil || !strings.Contains(err.Error(), "is not loopback: set tls_cert and tls_key") {
		t.Fatalf("a public address without TLS: %v", err)
	}
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keyward"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	kb, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(filepath.Join(dir, "cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(filepath.Join(dir, "key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	in.Config.Tokens.HTTP.TLSCert, in.Config.Tokens.HTTP.TLSKey = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	in.Restart()
	_, port, _ := net.SplitHostPort(in.Config.Tokens.HTTP.Address)
	pool := x509.NewCertPool()
	cert, _ := x509.ParseCertificate(der)
	pool.AddCert(cert)
	get := func(max uint16) error {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MaxVersion: max}}}
		resp, err := c.Get("https://127.0.0.1:" + port + "/.well-known/jwks.json")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return io.ErrUnexpectedEOF
			}
		}
		return err
	}
	if err := get(tls.VersionTLS13); err != nil {
		t.Fatalf("TLS 1.3: %v", err)
	}
	if err := get(tls.VersionTLS12); err == nil {
		t.Fatal("a TLS 1.2 client was served")
	}
}
