package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/fieldmaskpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// syncBuffer is a buffer written by one goroutine and read by another.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestWatchCommand: keyward watch prints each event as a line (JSON with
// --output json), and on Ctrl-C the cursor to resume from, which resumes.
func TestWatchCommand(t *testing.T) {
	d := daemontest.Start(t)
	ac := keywardv1.NewAPIKeyServiceClient(d.Conn)
	watchFor := func(args []string, until string, during func()) (string, string) {
		ctx, cancel := context.WithCancel(context.Background())
		var out, errb syncBuffer
		done := make(chan int)
		go func() {
			done <- run(ctx, append([]string{"--socket", d.Socket}, args...), strings.NewReader(""), &out, &errb)
		}()
		for deadline := time.Now().Add(5 * time.Second); !strings.Contains(errb.String(), "watching from"); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("keyward watch did not start: %s", errb.String())
			}
		}
		during()
		for deadline := time.Now().Add(5 * time.Second); !strings.Contains(out.String(), until); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("keyward watch printed %q; want %q", out.String(), until)
			}
		}
		cancel()
		if code := <-done; code != 0 {
			t.Fatalf("keyward watch exited %d: %s", code, errb.String())
		}
		return out.String(), errb.String()
	}
	var id string
	out, errs := watchFor([]string{"watch", "-kind", "api_key"}, " api_key ", func() {
		k, err := ac.CreateAPIKey(context.Background(), &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "n", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		id = k.Key.Id
		if _, err := ac.RevokeAPIKey(context.Background(), &keywardv1.RevokeAPIKeyRequest{Id: id}); err != nil {
			t.Fatal(err)
		}
	})
	if !strings.Contains(out, " api_key "+id+" shop") {
		t.Errorf("the revocation's line: %q", out)
	}
	_, resume, ok := strings.Cut(errs, "resume with: keyward watch -cursor ")
	if !ok {
		t.Fatalf("no cursor to resume from: %q", errs)
	}
	cursor := strings.TrimSpace(resume)
	// Resumed with --output json: the next event, as JSON.
	out, _ = watchFor([]string{"--output", "json", "watch", "-cursor", cursor}, `"kind":"api_key_disabled"`, func() {
		k, err := ac.CreateAPIKey(context.Background(), &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "m", Environment: "prod", Permissions: []string{"orders:read"}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ac.UpdateAPIKey(context.Background(), &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: k.Key.Id, State: keywardv1.APIKeyState_API_KEY_STATE_DISABLED},
			UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"state"}}}); err != nil {
			t.Fatal(err)
		}
	})
	if strings.Contains(out, id) || !strings.HasPrefix(out, `{"cursor":"`) {
		t.Errorf("resumed after the revocation, as JSON: %q", out)
	}
}
