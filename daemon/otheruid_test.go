package daemon_test

import (
	"context"
	"fmt"
	softhsmtest "github.com/keyward/keyward/softhsm-test"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestMain doubles as the clients that the tests run as another user: with
// KEYWARD_TEST_DIAL set it pings keywardd and asks it for a data key, prints
// the two status codes, and exits; with KEYWARD_TEST_CGROUP_CLIENT set it is
// the client of the cgroup tests (cgroupClient); with KEYWARD_TEST_FLOOD set it is a
// hostile caller (see flood).
func TestMain(m *testing.M) {
	if sock := os.Getenv("KEYWARD_TEST_FLOOD"); sock != "" {
		os.Exit(flood(sock))
	}
	if sock := os.Getenv("KEYWARD_TEST_CGROUP_CLIENT"); sock != "" {
		os.Exit(cgroupClient(sock))
	}
	if sock := os.Getenv("KEYWARD_TEST_DIAL"); sock != "" {
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fmt.Println(err)
			os.Exit(3)
		}
		ctx := context.Background()
		_, err1 := keywardv1.NewStatusServiceClient(conn).Ping(ctx, &keywardv1.PingRequest{})
		_, err2 := keywardv1.NewEnvelopeServiceClient(conn).GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: "app"})
		fmt.Printf("ping=%s datakey=%s %s\n", status.Code(err1), status.Code(err2), status.Convert(err2).Message())
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestOtherUser: a client running as another user (nobody) reaches the
// socket through its group and gets exactly what the policy grants its uid.
func TestOtherUser(t *testing.T) {
	softhsmtest.RequireRoot(t, "runs a client as another user")
	policy := uidPolicy(allowAll) + `  - role: pinger
    callers:
      - uid: 65534
`
	policy = strings.Replace(policy, "bindings:", `  pinger:
    permissions:
      - operations: [StatusService.Ping]
        keys: ["*"]
bindings:`, 1)
	in := daemontest.Start(t, daemontest.Policy(policy))
	bin := openToNobody(t, in)
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(in.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "app", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	cmd := asNobody(bin, "KEYWARD_TEST_DIAL="+in.Config.Socket.Path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as nobody: %v\n%s", err, out)
	}
	want := `ping=OK datakey=PermissionDenied permission denied: this caller is not granted EnvelopeService.GenerateDataKey on key "app"`
	if strings.TrimSpace(string(out)) != want {
		t.Fatalf("client as nobody:\n got %s\nwant %s", out, want)
	}
	in.Stop()
	auditLog, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if !strings.Contains(string(auditLog), `"caller":{"uid":65534,"gid":65534`) || !strings.Contains(string(auditLog), `"outcome":"denied"`) {
		t.Fatal("the other user's calls are not in the audit log")
	}
}

// openToNobody restarts in with its socket reachable by nobody (through
// the socket's group, nogroup: the directory and the socket belong to it,
// mode 0750 and 0660), and returns a copy of this test binary that nobody
// may run.
func openToNobody(t testing.TB, in *daemontest.Daemon) string {
	t.Helper()
	in.Stop()
	run := filepath.Dir(in.Config.Socket.Path)
	os.Chown(run, 0, 65534)
	in.Config.Socket.Group = "nogroup"
	for d := filepath.Dir(run); strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	in.Restart()
	self, _ := os.Executable()
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	binDir := t.TempDir()
	os.Chmod(binDir, 0o755)
	bin := filepath.Join(binDir, "client")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// asNobody is a command running bin as nobody, with env its whole
// environment.
func asNobody(bin string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	return cmd
}
