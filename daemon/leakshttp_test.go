package daemon_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestLeaksOverHTTP: keywardd with leaks.http takes a report signed by a
// key of its keys file, and the key it names is refused by the very next
// VerifyAPIKey; the logs name the key, never the token.
func TestLeaksOverHTTP(t *testing.T) {
	scanner, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&scanner.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	doc, _ := json.Marshal(map[string]any{"public_keys": []map[string]any{{"key_identifier": "test-kid", "is_current": true,
		"key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}}})
	keysFile := filepath.Join(t.TempDir(), "scanner-keys.json")
	if err := os.WriteFile(keysFile, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freePort(t, "127.0.0.1")
	metricsAddr := freePort(t, "127.0.0.1")
	in := daemontest.Start(t, daemontest.Configure(func(c *daemon.Config) {
		c.Leaks.HTTP.Address, c.Leaks.PublicKeysFile = addr, keysFile
		c.Metrics.Address = metricsAddr
	}))
	ctx := context.Background()
	ak := keywardv1.NewAPIKeyServiceClient(in.Conn)
	created, err := ak.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "web", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal([]map[string]string{{"token": created.GetSecret(), "type": "keyward_api_key", "url": "https://github.com/o/r/blob/1/.env", "source": "content"}})
	h := sha256.Sum256(body)
	sig, err := ecdsa.SignASN1(rand.Reader, scanner, h[:])
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/leaks/github", bytes.NewReader(body))
	req.Header.Set("Github-Public-Key-Identifier", "test-kid")
	req.Header.Set("Github-Public-Key-Signature", base64.StdEncoding.EncodeToString(sig))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(answer), `"label":"true_positive"`) {
		t.Fatalf("report = %d %s", resp.StatusCode, answer)
	}
	v, err := ak.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: created.GetSecret(), Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil || v.GetCode() != keywardv1.APIKeyCode_API_KEY_CODE_REVOKED {
		t.Fatalf("VerifyAPIKey after the report = %v, %v; want REVOKED", v.GetCode(), err)
	}
	if log := in.Log.String(); strings.Contains(log, created.GetSecret()) || !strings.Contains(log, created.GetKey().GetId()) {
		t.Fatalf("keywardd's log holds the token, or not the key's ID:\n%s", log)
	}
	fams := scrape(t, http.DefaultClient, "http://"+metricsAddr+"/metrics")
	if n := metricValue(t, fams, "keyward_apikey_leak_reports_total", map[string]string{"via": "scanner", "result": "stopped"}); n != 1 {
		t.Errorf("keyward_apikey_leak_reports_total{via=scanner,result=stopped} = %v, want 1", n)
	}
	// An unsigned report: refused, and keywardd serves on.
	resp, err = http.Post("http://"+addr+"/leaks/github", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("unsigned report = %d, want 401", resp.StatusCode)
	}
}
