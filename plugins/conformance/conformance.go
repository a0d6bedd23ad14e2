// Package conformance is the test suite a plugin author runs against their
// own plugin, as a real process under keywardd's host: the handshake and
// Describe, CheckConfig on a good and a bad configuration, two full
// rotations with every step sent twice (each must be idempotent for its
// operation ID), the revocations the plugin subscribes to, sent twice, and
// no secret in any log line. Plugin-specific checks (can the new password
// log in, does the file hold the secret) come in as functions:
//
//	func TestConformance(t *testing.T) {
//		conformance.Run(t, conformance.Config{
//			Binary: conformance.Build(t, "example.com/my-plugin/cmd/my-plugin"),
//			Name:   "my-plugin",
//			Config: []byte(`{"role": "app"}`),
//			Current: func(t *testing.T, handle string, secret []byte) { /* log in with it */ },
//		})
//	}
package conformance

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/plugins/host"
	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// Config is the plugin under test.
type Config struct {
	// Binary is the plugin's executable; Build makes one.
	Binary string
	// Interpreter, if set, runs Binary, a script: a Python plugin's
	// interpreter (its own file, not a link), pinned as keywardd pins it.
	Interpreter string
	// InterpreterArgs: options between the interpreter and the script
	// (-I for Python).
	InterpreterArgs []string
	// Name is the name it must give itself.
	Name string
	// Env is its environment.
	Env map[string]string
	// Config is a good configuration for a test credential.
	Config json.RawMessage
	// BadConfig, if set, is one CheckConfig must refuse.
	BadConfig json.RawMessage
	// Current, if set, checks after each activation that the credential
	// handle names, with secret, is the current one in the external system.
	Current func(t *testing.T, handle string, secret []byte)
	// Retired, if set, checks after Retire that handle with secret no
	// longer works.
	Retired func(t *testing.T, handle string, secret []byte)
	// CallTimeout bounds each call; default 30 s.
	CallTimeout time.Duration
}

// Build compiles a Go package (an import path or ./dir) into a fresh
// directory of the test and returns the executable's path.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "plugin")
	if b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// Run runs the suite.
func Run(t *testing.T, c Config) {
	pin := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		return hex.EncodeToString(sum[:])
	}
	hc := host.Config{Name: c.Name, Path: c.Binary, SHA256: pin(c.Binary), Env: c.Env, CallTimeout: c.CallTimeout}
	if c.Interpreter != "" {
		hc.Interpreter, hc.InterpreterSHA256, hc.InterpreterArgs = c.Interpreter, pin(c.Interpreter), c.InterpreterArgs
	}
	logs := &syncBuffer{}
	hc.Log = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := host.Start(hc)
	if err != nil {
		if p != nil {
			p.Close()
		}
		t.Fatalf("the plugin does not start: %v", err)
	}
	defer p.Close()
	desc := p.Describe()
	ctx := context.Background()
	cred := &pluginv1.Credential{Name: "conformance", Config: c.Config}
	call := func(what string, fn func(ctx context.Context, api *pluginv1.Clients) error) {
		t.Helper()
		if err := p.Call(ctx, fn); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	t.Run("CheckConfig", func(t *testing.T) {
		call("CheckConfig of the good configuration", func(ctx context.Context, api *pluginv1.Clients) error {
			_, err := api.Plugin.CheckConfig(ctx, &pluginv1.CheckConfigRequest{Credential: cred})
			return err
		})
		if c.BadConfig == nil {
			return
		}
		err := p.Call(ctx, func(ctx context.Context, api *pluginv1.Clients) error {
			_, err := api.Plugin.CheckConfig(ctx, &pluginv1.CheckConfigRequest{Credential: &pluginv1.Credential{Name: "conformance", Config: c.BadConfig}})
			return err
		})
		if code := status.Code(err); code != codes.FailedPrecondition && code != codes.InvalidArgument {
			t.Errorf("CheckConfig of a bad configuration: %v; want FAILED_PRECONDITION or INVALID_ARGUMENT (wrap sdk.ErrPermanent)", err)
		}
	})

	var secrets [][]byte
	if slices.Contains(desc.GetCapabilities(), pluginv1.Capability_CAPABILITY_ROTATOR) {
		t.Run("Rotate", func(t *testing.T) {
			current := ""
			for round := 1; round <= 3; round++ { // three: handles that take turns come back
				op := fmt.Sprintf("conformance-%d-%d", time.Now().UnixNano(), round)
				secret := newSecret(desc.GetSecret())
				var handle string
				for try := range 2 {
					call(fmt.Sprintf("round %d: Create (try %d)", round, try+1), func(ctx context.Context, api *pluginv1.Clients) error {
						r, err := api.Rotator.Create(ctx, &pluginv1.CreateRequest{OperationId: op, Credential: cred, Secret: secret, CurrentHandle: current})
						if err != nil {
							return err
						}
						if desc.GetSecret().GetPluginGenerates() {
							secret = r.GetSecret()
						}
						if handle != "" && r.GetHandle() != handle {
							return fmt.Errorf("not idempotent: a second Create of the same operation gave handle %q, the first %q", r.GetHandle(), handle)
						}
						handle = r.GetHandle()
						return nil
					})
				}
				for try := range 2 {
					call(fmt.Sprintf("round %d: Test (try %d)", round, try+1), func(ctx context.Context, api *pluginv1.Clients) error {
						_, err := api.Rotator.Test(ctx, &pluginv1.TestRequest{OperationId: op, Credential: cred, Handle: handle, Secret: secret})
						return err
					})
				}
				for try := range 2 {
					call(fmt.Sprintf("round %d: Activate (try %d)", round, try+1), func(ctx context.Context, api *pluginv1.Clients) error {
						_, err := api.Rotator.Activate(ctx, &pluginv1.ActivateRequest{OperationId: op, Credential: cred, Handle: handle, PreviousHandle: current})
						return err
					})
				}
				if c.Current != nil {
					c.Current(t, handle, secret)
				}
				if current != "" {
					for try := range 2 {
						call(fmt.Sprintf("round %d: Retire (try %d)", round, try+1), func(ctx context.Context, api *pluginv1.Clients) error {
							_, err := api.Rotator.Retire(ctx, &pluginv1.RetireRequest{OperationId: op + "-retire", Credential: cred, Handle: current})
							return err
						})
					}
					if c.Retired != nil {
						c.Retired(t, current, secrets[len(secrets)-1])
					}
				}
				secrets = append(secrets, secret)
				current = handle
			}
		})
	}

	if slices.Contains(desc.GetCapabilities(), pluginv1.Capability_CAPABILITY_REVOKER) {
		t.Run("Revoke", func(t *testing.T) {
			if len(desc.GetEvents()) == 0 {
				t.Fatal("a revoker that subscribes to no event")
			}
			for _, k := range desc.GetEvents() {
				for try := range 2 {
					call(fmt.Sprintf("Revoke %v (try %d)", k, try+1), func(ctx context.Context, api *pluginv1.Clients) error {
						_, err := api.Revoker.Revoke(ctx, &pluginv1.RevokeRequest{OperationId: "conformance-revoke-" + k.String(),
							Event: &pluginv1.Event{Kind: k, Id: "conformance", Subject: "conformance", Time: timestamppb.Now()}})
						return err
					})
				}
			}
		})
	}

	t.Run("Logs", func(t *testing.T) {
		l := logs.String()
		for _, s := range secrets {
			if bytes.Contains([]byte(l), s) {
				t.Errorf("a secret is in the plugin's log lines")
			}
		}
		for line := range strings.Lines(l) {
			if !strings.Contains(line, `"plugin":"`+c.Name+`"`) {
				t.Errorf("a log line without the plugin's name: %s", line)
			}
		}
	})
}

// newSecret makes a secret as keywardd does: spec's length of spec's
// alphabet (32 of A-Z a-z 0-9 by default), none if the plugin makes its own.
func newSecret(spec *pluginv1.SecretSpec) []byte {
	if spec.GetPluginGenerates() {
		return nil
	}
	n, alphabet := int(spec.GetLength()), spec.GetAlphabet()
	if n == 0 {
		n = 32
	}
	if alphabet == "" {
		alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	}
	out := make([]byte, n)
	for i := range out {
		b := make([]byte, 1)
		for {
			rand.Read(b)
			if int(b[0]) < 256-256%len(alphabet) {
				break
			}
		}
		out[i] = alphabet[int(b[0])%len(alphabet)]
	}
	return out
}
