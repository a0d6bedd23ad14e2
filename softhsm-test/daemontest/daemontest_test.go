package daemontest_test

import (
	"bytes"
	"context"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/ratelimit"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestMain removes the keywardd TestExec built.
func TestMain(m *testing.M) {
	code := m.Run()
	daemontest.RemoveBuilt()
	os.Exit(code)
}

// TestExec: the keywardd binary runs on the files, answers once Exec
// returns, and stops on SIGTERM with exit code 0, having logged.
func TestExec(t *testing.T) {
	bin := daemontest.Build(t)
	f := daemontest.NewFiles(t)
	p := daemontest.Exec(t, bin, f)
	if p.Exited() {
		t.Fatal("keywardd exited")
	}
	if _, err := os.Lstat(f.Socket); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	if !p.Exited() {
		t.Fatal("keywardd runs after Stop")
	}
	if !strings.Contains(p.Log(), `"msg":"keywardd serving"`) {
		t.Fatalf("the log lacks keywardd serving:\n%s", p.Log())
	}
	if strings.Contains(p.Log(), f.Token.PIN) {
		t.Fatal("the log shows the PIN")
	}
}

// TestMarshalConfig: what MarshalConfig writes reads back, strictly, as
// the same configuration, and holds no field that is not set.
func TestMarshalConfig(t *testing.T) {
	var cfg daemon.Config
	cfg.Socket.Path, cfg.DataDir, cfg.PolicyFile = "/run/k.sock", "/var/lib/keyward", "/etc/keyward/policy.yaml"
	cfg.HSM.Module, cfg.HSM.Token, cfg.HSM.PINFile, cfg.HSM.Sessions = "/usr/lib/softhsm/libsofthsm2.so", "t", "/etc/keyward/pin", 4
	cfg.Connections.WriteTimeout = 300 * time.Millisecond
	cfg.Tokens.NoCache = true
	cfg.Plugins = []daemon.PluginConfig{{Name: "file", Path: "/bin/p", SHA256: "ab", Env: map[string]string{"A": "b"}, CallTimeout: time.Second}}
	cfg.APIKeys.DefaultLimits = map[string][]ratelimit.Layer{"prod": {{Limit: 10, Per: time.Minute, Burst: 20}}}

	b, err := daemontest.MarshalConfig(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var got daemon.Config
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("%v:\n%s", err, b)
	}
	if !reflect.DeepEqual(got, cfg) {
		t.Fatalf("read back as %+v, want %+v:\n%s", got, cfg, b)
	}
	for _, unset := range []string{"pin_env", "pin_credential", "uri", "mode:", "metrics", "rotation", "idle_timeout", `""`, ": 0\n", "false"} {
		if strings.Contains(string(b), unset) {
			t.Errorf("the file holds %q, which is not set:\n%s", unset, b)
		}
	}
}

// TestStart: Start serves on the socket of its files until Stop, which
// removes the socket; Restart serves again on the same store.
func TestStart(t *testing.T) {
	d := daemontest.Start(t)
	if _, err := daemon.LoadConfig(d.ConfigFile); err != nil {
		t.Fatalf("keywardd.yaml: %v", err)
	}
	ctx := context.Background()
	if _, err := keywardv1.NewKeyServiceClient(d.Conn).CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(d.Socket); !os.IsNotExist(err) {
		t.Fatalf("the socket is left after Stop: %v", err)
	}
	d.Restart()
	if _, err := keywardv1.NewKeyServiceClient(d.Conn).GetKey(ctx, &keywardv1.GetKeyRequest{Name: "k"}); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	if !strings.Contains(d.Log.String(), "keywardd serving") {
		t.Fatalf("the log lacks keywardd serving:\n%s", d.Log)
	}
}

// TestPolicy: the policy given is keywardd's, and SetPolicy replaces it.
func TestPolicy(t *testing.T) {
	d := daemontest.Start(t, daemontest.Policy(strings.Replace(daemontest.AllowAll(), `["*"]`, "[StatusService.Ping]", 1)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(d.Conn)
	if _, err := kc.ListKeys(ctx, &keywardv1.ListKeysRequest{}); err == nil || !strings.Contains(err.Error(), "not granted KeyService.ListKeys") {
		t.Fatalf("ListKeys under a policy granting Ping alone: %v", err)
	}
	d.SetPolicy(daemontest.AllowAll())
	if _, err := kc.ListKeys(ctx, &keywardv1.ListKeysRequest{}); err != nil {
		t.Fatalf("ListKeys once everything is granted: %v", err)
	}
}
