package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/audit/ship"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestAuditSinkBlocks: a real keywardd with an HTTP sink whose failure
// policy is block. While the receiver is down, calls are served until the
// sink lags past its bound, then refused UNAVAILABLE saying why; once the
// receiver is back, the sink catches up, keywardd serves again by itself,
// and the receiver holds the whole log, verified.
func TestAuditSinkBlocks(t *testing.T) {
	var mu sync.Mutex
	var got bytes.Buffer
	var down atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got.Write(b)
		mu.Unlock()
	}))
	defer srv.Close()
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.AuditSinks = []ship.SinkConfig{{Name: "siem", Type: ship.TypeHTTP, URL: srv.URL, OnFailure: ship.Block, MaxLagBytes: ship.MinLag}}
	}))
	c, err := client.Dial(in.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "orders", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	down.Store(true)
	served := 0
	for ; ; served++ {
		_, err := c.GenerateDataKey(ctx, "orders", map[string]string{"tenant": "42"})
		if err != nil {
			var ce *client.Error
			if !errors.As(err, &ce) || ce.Code != codes.Unavailable || !strings.Contains(ce.Message, `sink "siem"`) {
				t.Fatalf("after %d calls: %v", served, err)
			}
			// The refusal says why once the sink has tried and failed (the
			// lag may pass its bound before its first try).
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(ce.Message, "503"); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the refusal never names the receiver's 503: %v", ce)
				}
				_, err := c.GenerateDataKey(ctx, "orders", map[string]string{"tenant": "42"})
				if !errors.As(err, &ce) || ce.Code != codes.Unavailable {
					t.Fatalf("while the sink is past its bound: %v", err)
				}
			}
			break
		}
		if served > 10000 {
			t.Fatal("keywardd never refused calls while its blocking sink was down")
		}
	}
	if served < 50 {
		t.Errorf("refused after %d calls: a sink under its bound of 64 KiB blocks", served)
	}
	// GetStatus says which sink and why.
	st, err := c.Status.GetStatus(ctx, &keywardv1.GetStatusRequest{})
	if err != nil {
		t.Fatalf("GetStatus while the sink blocks: %v", err)
	}
	if s := st.GetAuditSinks(); len(s) != 1 || s[0].GetName() != "siem" || !s[0].GetOverBound() || s[0].GetOnFailure() != "block" ||
		!strings.Contains(s[0].GetLastError(), "503") || s[0].GetLagBytes() < s[0].GetMaxLagBytes() {
		t.Errorf("GetStatus's audit sinks while the sink blocks: %v", s)
	}
	down.Store(false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.GenerateDataKey(ctx, "orders", nil)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("keywardd still refuses calls after the receiver came back: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	in.Stop() // the last checkpoint is written, and shipped at the next start
	in.Restart()
	want := func() uint64 {
		f, err := os.Open(auditFile(in))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		local, err := audit.VerifyReceived(ctx, f, nil)
		if err != nil {
			t.Fatal(err)
		}
		return local.LastSeq
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		b := bytes.Clone(got.Bytes())
		mu.Unlock()
		rep, err := audit.VerifyReceived(ctx, bytes.NewReader(b), nil)
		if err != nil {
			t.Fatal(err)
		}
		if w := want(); rep.LastSeq >= w-1 { // the start's own records may follow
			if !rep.OK() || rep.FirstSeq != 1 || rep.Records < uint64(served)+2 {
				t.Errorf("what the receiver got: %+v", rep)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the receiver got up to seq %d of %d", rep.LastSeq, want())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(in.Config.DataDir, "audit-sinks", "siem.cursor")); err != nil {
		t.Errorf("the sink's cursor: %v", err)
	}
}

// TestAuditSinksConfig: a bad sink is refused at start with a message
// naming it and the field.
func TestAuditSinksConfig(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keywardd.yaml")
	os.WriteFile(path, []byte(`socket: {path: `+dir+`/s.sock}
data_dir: `+dir+`
policy_file: `+dir+`/policy.yaml
audit_sinks:
  - name: siem
    type: http
    url: http://siem.example/in
    bearer_token_file: /etc/keyward/siem-token
  - name: local
    type: syslog
    network: udp
  - name: copy
    type: file
    path: `+dir+`/audit.log
`), 0o600)
	_, err := daemon.LoadConfig(path)
	for _, want := range []string{`audit_sinks[0] (siem): url "http://siem.example/in": a bearer token is sent over https only`, `audit_sinks[1] (local): network "udp"`,
		`audit_sinks[2] (copy): path is the audit log itself`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("LoadConfig: %v, want %q", err, want)
		}
	}
}
