package main

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/devmode"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// startDev runs keywardd --dev with args and returns it once it serves, with
// the socket it printed and its standard error so far.
func startDev(t *testing.T, bin string, args ...string) (*exec.Cmd, string, *strings.Builder) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"-dev"}, args...)...)
	cmd.Env = append(os.Environ(), "TMPDIR="+t.TempDir())
	stdout, _ := cmd.StdoutPipe()
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
	defer deadline.Stop()
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if s, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "export KEYWARD_SOCKET="); ok {
			go io.Copy(io.Discard, stdout)
			return cmd, s, stderr
		}
	}
	cmd.Wait()
	t.Fatalf("keywardd --dev %v printed no socket; stderr:\n%s", args, stderr.String())
	return nil, "", nil
}

// stopDev stops keywardd with SIGTERM and checks that it stopped cleanly.
func stopDev(t *testing.T, cmd *exec.Cmd, stderr *strings.Builder) {
	t.Helper()
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("keywardd --dev after SIGTERM: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), `"msg":"keywardd stopped"`) {
		t.Fatalf("no clean stop in the log:\n%s", stderr.String())
	}
}

// TestDevMode builds keywardd, runs keywardd --dev, makes calls through the
// socket it prints (envelope encryption, a token as the dev policy grants),
// and stops it with SIGTERM: the socket and the throw-away directory are
// gone afterwards.
func TestDevMode(t *testing.T) {
	bin := daemontest.Build(t)
	cmd, sock, stderr := startDev(t, bin)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dk, err := c.GenerateDataKey(ctx, "dev-kek", map[string]string{"app": "demo"})
	if err != nil {
		t.Fatalf("GenerateDataKey on the dev key: %v", err)
	}
	if pt, err := c.Decrypt(ctx, dk.Wrapped, map[string]string{"app": "demo"}); err != nil || string(pt) != string(dk.Plaintext) {
		t.Fatalf("Decrypt: %v", err)
	}
	// The dev keys are on the moderate rotation policy, as it prints; there
	// is no HMAC key (nothing could use one).
	plan, err := keywardv1.NewRotationServiceClient(c.Conn()).GetRotationPlan(ctx, &keywardv1.GetRotationPlanRequest{})
	if err != nil || len(plan.GetRotations()) != 2 || plan.GetRotations()[0].GetPolicy() != "moderate" {
		t.Fatalf("the dev rotation plan: %v, %v", plan, err)
	}
	// The dev policy grants tokens, as the printed example mints one.
	tok, err := c.Tokens.MintToken(ctx, &keywardv1.MintTokenRequest{KeyName: "dev-signing", Audiences: []string{"orders"}, Scopes: []string{"orders:read"}})
	if err != nil {
		t.Fatalf("MintToken on the dev key: %v", err)
	}
	if v, err := c.Tokens.VerifyToken(ctx, &keywardv1.VerifyTokenRequest{Token: tok.Token, Audience: "orders"}); err != nil || !v.Valid {
		t.Fatalf("VerifyToken: %v %v", v, err)
	}
	// The dev policy grants the operator the audit log, as the dashboard
	// reads it.
	recs, err := c.ListAuditRecords(ctx, &keywardv1.ListAuditRecordsRequest{Operation: "EnvelopeService.*"})
	if err != nil || len(recs.GetRecords()) != 2 || recs.GetRecords()[0].GetOperation() != "EnvelopeService.Decrypt" {
		t.Fatalf("ListAuditRecords: %v, %v", recs, err)
	}
	if v, err := c.VerifyAuditLog(ctx); err != nil || !v.GetOk() {
		t.Fatalf("VerifyAuditLog: %v, %v", v, err)
	}
	c.Close()
	stopDev(t, cmd, stderr)
	dir := filepath.Dir(filepath.Dir(sock))
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the dev directory %s is still there: %v", dir, err)
	}
}

// TestDevModeKeepsItsDirectory: keywardd --dev -dev-dir DIR starts again on
// the token, PIN, policy and configuration of its first start (an edit to
// the policy stays), and what was made there is still there.
func TestDevModeKeepsItsDirectory(t *testing.T) {
	bin := daemontest.Build(t)
	dir := filepath.Join(t.TempDir(), "dev")
	cmd, sock, stderr := startDev(t, bin, "-dev-dir", dir)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ectx := map[string]string{"app": "demo"}
	dk, err := c.GenerateDataKey(ctx, "dev-kek", ectx)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	stopDev(t, cmd, stderr)
	files := devmode.FilesIn(dir)
	edited := []byte("# edited by hand\n")
	pol, err := os.ReadFile(files.Policy)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files.Policy, append(edited, pol...), 0o600); err != nil {
		t.Fatal(err)
	}
	keep := map[string][]byte{}
	for _, f := range []string{files.Config, filepath.Join(files.Token, "user.pin"), files.Policy} {
		if keep[f], err = os.ReadFile(f); err != nil {
			t.Fatal(err)
		}
	}

	cmd, sock, stderr = startDev(t, bin, "-dev-dir", dir)
	c, err = client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	// The data key wrapped by the first start's dev-kek opens: the same
	// token, and its key.
	if pt, err := c.Decrypt(ctx, dk.Wrapped, ectx); err != nil || string(pt) != string(dk.Plaintext) {
		t.Fatalf("Decrypt after a restart on the same -dev-dir: %v\n%s", err, stderr.String())
	}
	c.Close()
	stopDev(t, cmd, stderr)
	for f, b := range keep {
		if now, _ := os.ReadFile(f); string(now) != string(b) {
			t.Errorf("%s changed on the second start", f)
		}
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("-dev-dir %s is gone: %v", dir, err)
	}
}

// TestDevModeWithConfig: keywardd --dev -config FILE runs FILE's
// configuration (here metrics on a Unix socket) on the dev token, with the
// dev directory's socket, data and policy, which FILE does not name.
func TestDevModeWithConfig(t *testing.T) {
	bin := daemontest.Build(t)
	tmp := t.TempDir()
	msock := filepath.Join(tmp, "metrics", "metrics.sock")
	os.Mkdir(filepath.Dir(msock), 0o700)
	config := filepath.Join(tmp, "keywardd.yaml")
	if err := os.WriteFile(config, []byte("metrics:\n  socket: "+msock+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd, sock, stderr := startDev(t, bin, "-config", config)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GenerateDataKey(context.Background(), "dev-kek", nil); err != nil {
		t.Fatalf("GenerateDataKey: %v", err)
	}
	c.Close()
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", msock)
	}}}
	resp, err := hc.Get("http://keywardd/metrics")
	if err != nil {
		t.Fatalf("the metrics socket FILE configures: %v\n%s", err, stderr.String())
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `keyward_calls_total{`) {
		t.Fatalf("no calls counted in the metrics:\n%s", body)
	}
	stopDev(t, cmd, stderr)
}

// TestDevModeRefusesForeignDirectory: keywardd --dev -dev-dir takes a
// directory only if it is this user's and empty or its own: another user's
// (made under /tmp, say) could name the PKCS#11 module and the plugins
// keywardd loads. Nothing is made in a refused directory.
func TestDevModeRefusesForeignDirectory(t *testing.T) {
	bin := daemontest.Build(t)
	refused := func(t *testing.T, dir, why string) {
		t.Helper()
		before, _ := os.ReadDir(dir)
		cmd := exec.Command(bin, "-dev", "-dev-dir", dir)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err == nil {
				t.Fatalf("keywardd --dev -dev-dir %s started", dir)
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("keywardd --dev -dev-dir %s did not stop", dir)
		}
		if !strings.Contains(stderr.String(), why) {
			t.Fatalf("keywardd --dev -dev-dir %s: want %q in\n%s", dir, why, stderr.String())
		}
		if after, _ := os.ReadDir(dir); len(after) != len(before) {
			t.Fatalf("a refused -dev-dir got %d entries, had %d", len(after), len(before))
		}
	}
	t.Run("files it did not make", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("mine"), 0o600)
		refused(t, dir, "holds files keywardd --dev did not make")
	})
	t.Run("a symbolic link", func(t *testing.T) {
		link := filepath.Join(t.TempDir(), "dev")
		os.Symlink(t.TempDir(), link)
		refused(t, link, "is not a directory (or is a symbolic link)")
	})
	t.Run("a file others may write", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "dev")
		cmd, _, stderr := startDev(t, bin, "-dev-dir", dir)
		stopDev(t, cmd, stderr)
		if err := os.Chmod(filepath.Join(dir, "keywardd.yaml"), 0o666); err != nil {
			t.Fatal(err)
		}
		refused(t, dir, "writable by others")
	})
	t.Run("another user's", func(t *testing.T) {
		// As root, one made for nobody; as anyone else, root's own.
		dir := "/usr"
		if os.Geteuid() == 0 {
			dir = filepath.Join(t.TempDir(), "dev")
			os.Mkdir(dir, 0o700)
			if err := os.Chown(dir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}
		refused(t, dir, "belongs to another user")
	})
}
