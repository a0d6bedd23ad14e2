// Command testplugin is a keyward plugin for the host's tests: a rotator and
// a revoker that record what they are asked in TESTPLUGIN_RECORD (and the
// revocations' wire form in TESTPLUGIN_WIRE, if set), and misbehave as
// TESTPLUGIN_MODE says.
package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
	"github.com/keyward/keyward/plugins/sdk"
)

var mode = os.Getenv("TESTPLUGIN_MODE")

type impl struct {
	mu   sync.Mutex
	done map[string]string // operation ID -> handle
}

func record(format string, a ...any) {
	f, err := os.OpenFile(os.Getenv("TESTPLUGIN_RECORD"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, format+"\n", a...)
}

func (p *impl) Create(ctx context.Context, r sdk.CreateRequest) (sdk.CreateResult, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if h, ok := p.done[r.OperationID]; ok {
		return sdk.CreateResult{Handle: h}, nil
	}
	if mode == "crash" {
		os.Exit(3)
	}
	if marker := os.Getenv("TESTPLUGIN_RECORD") + ".crashed"; mode == "crash-once" {
		if _, err := os.Stat(marker); err != nil {
			os.WriteFile(marker, nil, 0o600)
			record("crashed in %s", r.OperationID)
			os.Exit(3)
		}
	}
	if mode == "refuse" {
		return sdk.CreateResult{}, fmt.Errorf("the system refuses new credentials for %s: %w", r.Credential.Name, sdk.ErrPermanent)
	}
	sdk.Logger().Info("creating", "credential", r.Credential.Name, "secret", r.Secret, "password", string(r.Secret.Reveal()))
	h := fmt.Sprintf("%s-%d", r.Credential.Name, len(p.done)+1)
	p.done[r.OperationID] = h
	record("create %s %s %d", r.OperationID, h, len(r.Secret.Reveal()))
	if mode == "leak" {
		return sdk.CreateResult{}, fmt.Errorf("the system refused password %s", r.Secret.Reveal())
	}
	return sdk.CreateResult{Handle: h}, nil
}

func (p *impl) Test(ctx context.Context, r sdk.TestRequest) error {
	if mode == "hang" {
		<-ctx.Done()
		return ctx.Err()
	}
	record("test %s %s", r.OperationID, r.Handle)
	return nil
}

func (p *impl) Activate(ctx context.Context, r sdk.ActivateRequest) error {
	record("activate %s %s", r.OperationID, r.Handle)
	return nil
}

func (p *impl) Retire(ctx context.Context, r sdk.RetireRequest) error {
	if r.Handle == "permanent" {
		return fmt.Errorf("no such handle: %w", sdk.ErrPermanent)
	}
	record("retire %s %s", r.OperationID, r.Handle)
	return nil
}

func (p *impl) Revoke(ctx context.Context, op string, e sdk.Event) error {
	if _, err := os.Stat(os.Getenv("TESTPLUGIN_RECORD") + ".down"); err == nil {
		return fmt.Errorf("the system behind the plugin is down")
	}
	record("revoke %s %v %s %s", op, e.Kind, e.ID, e.Subject)
	if path := os.Getenv("TESTPLUGIN_WIRE"); path != "" {
		// The request as the SDK handed it on, encoded again: what
		// keywardd sent, for the host's golden test.
		b, err := proto.Marshal(&pluginv1.RevokeRequest{OperationId: op,
			Event: &pluginv1.Event{Kind: e.Kind, Id: e.ID, Subject: e.Subject, Time: timestamppb.New(e.Time), Detail: e.Detail}})
		if err != nil {
			return err
		}
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		fmt.Fprintf(f, "%x\n", b)
	}
	return nil
}

func main() {
	if mode == "stdout" {
		fmt.Println("hello from a careless plugin, password hunter2")
	}
	if mode == "traceback" || mode == "chatty" {
		// As a script's interpreter does: plain lines on standard error.
		fmt.Fprintln(os.Stderr, "Traceback (most recent call last):")
		fmt.Fprintln(os.Stderr, `  File "plugin.py", line 12, in <module>`)
		fmt.Fprintln(os.Stderr, "ModuleNotFoundError: No module named 'grpc'")
		if mode == "traceback" {
			os.Exit(1)
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		env = append(env, k)
	}
	record("env %s", strings.Join(env, ","))
	name := os.Getenv("TESTPLUGIN_NAME")
	if len(os.Args) == 2 && os.Args[1] == "/dev/fd/3" {
		// Run as a script's interpreter: the script is fd 3, and says
		// its name.
		b, err := os.ReadFile(os.Args[1])
		if err != nil || !strings.HasPrefix(string(b), "#!keyward-test-script\n") {
			fmt.Fprintf(os.Stderr, "not a test script: %v\n", err)
			os.Exit(2)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "name="); ok {
				name = v
			}
		}
		record("script %s as %s", os.Args[1], os.Args[0])
	}
	if name == "" {
		name = "test"
	}
	p := &impl{done: map[string]string{}}
	sdk.Serve(sdk.Plugin{Name: name, Version: "0.0.1", Rotator: p, Revoker: p, Events: []pluginv1.EventKind{pluginv1.EventKind_EVENT_KIND_API_KEY_REVOKED}})
}
