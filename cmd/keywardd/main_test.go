package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// TestDevMode builds keywardd, runs keywardd --dev, makes a call through the
// socket it prints, and stops it with SIGTERM: the socket and the throw-away
// directory are gone afterwards.
func TestDevMode(t *testing.T) {
	bin := buildDaemon(t)
	cmd := exec.Command(bin, "-dev")
	cmd.Env = append(os.Environ(), "TMPDIR="+t.TempDir())
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sock := ""
	sc := bufio.NewScanner(stdout)
	deadline := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
	defer deadline.Stop()
	for sc.Scan() {
		if s, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "export KEYWARD_SOCKET="); ok {
			sock = s
			break
		}
	}
	if sock == "" {
		t.Fatalf("keywardd --dev printed no socket; stderr:\n%s", stderr.String())
	}
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
	// The dev keys are on the moderate rotation policy, as it prints.
	plan, err := keywardv1.NewRotationServiceClient(c.Conn()).GetRotationPlan(ctx, &keywardv1.GetRotationPlanRequest{})
	if err != nil || len(plan.GetRotations()) != 3 || plan.GetRotations()[0].GetPolicy() != "moderate" {
		t.Fatalf("the dev rotation plan: %v, %v", plan, err)
	}
	c.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("keywardd --dev after SIGTERM: %v\n%s", err, stderr.String())
	}
	dir := filepath.Dir(filepath.Dir(sock))
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the dev directory %s is still there: %v", dir, err)
	}
	if !strings.Contains(stderr.String(), `"msg":"keywardd stopped"`) {
		t.Fatalf("no clean stop in the log:\n%s", stderr.String())
	}
}
