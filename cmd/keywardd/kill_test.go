package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/store"
	"github.com/keyward/keyward/hsm"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestMain removes the keywardd the tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	daemontest.RemoveBuilt()
	os.Exit(code)
}

// TestKill9: keywardd is killed with SIGKILL in the middle of concurrent
// GenerateDataKey calls. After a restart every data key it acknowledged
// still decrypts, the store checks clean and the audit chain verifies.
// openStore opens keywardd's store in data as keywardd does: under the key
// derived from the HSM, refusing it if it is behind the audit log.
func openStore(h *hsm.HSM, data string) (*store.Store, error) {
	key, err := daemon.DeriveStoreKey(context.Background(), h)
	if err != nil {
		return nil, err
	}
	var acked uint64
	if f, err := os.Open(filepath.Join(data, "audit.log")); err == nil {
		audit.Records(f, func(r audit.Record) error { acked = r.StoreWrites; return nil })
		f.Close()
	}
	return store.Open(filepath.Join(data, "keyward.db"), store.Options{Key: key, Acknowledged: acked})
}

func TestKill9(t *testing.T) {
	bin := daemontest.Build(t)
	files := daemontest.NewFiles(t)
	tok, sock, data := files.Token, files.Socket, files.DataDir

	cmd := daemontest.Exec(t, bin, files)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := c.Keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: "k", Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}); err != nil {
		t.Fatal(err)
	}
	type acked struct{ plaintext, wrapped []byte }
	var mu sync.Mutex
	var keys []acked
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				dk, err := c.GenerateDataKey(ctx, "k", map[string]string{"n": "1"})
				if err != nil {
					return // the daemon is gone
				}
				mu.Lock()
				keys = append(keys, acked{dk.Plaintext, dk.Wrapped})
				mu.Unlock()
			}
		})
	}
	time.Sleep(400 * time.Millisecond)
	cmd.Kill()
	wg.Wait()
	c.Close()
	if len(keys) < 10 {
		t.Fatalf("only %d data keys before the kill", len(keys))
	}

	second := daemontest.Exec(t, bin, files)
	c, _ = client.Dial(sock)
	for i, k := range keys {
		pt, err := c.Decrypt(ctx, k.wrapped, map[string]string{"n": "1"})
		if err != nil || string(pt) != string(k.plaintext) {
			t.Fatalf("acknowledged data key %d of %d does not decrypt after the kill: %v", i, len(keys), err)
		}
	}
	c.Close()
	t.Logf("%d data keys acknowledged before SIGKILL all decrypt after the restart", len(keys))
	// Stop it cleanly, then check the store and the audit log.
	if err := second.Stop(); err != nil {
		t.Fatal(err)
	}
	h, err := hsm.Open(hsm.Config{Module: tok.Module, Token: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	st, err := openStore(h, data)
	if err != nil {
		t.Fatalf("store after the kill: %v", err)
	}
	st.Close()
	f, _ := os.Open(filepath.Join(data, "audit.log"))
	defer f.Close()
	rep, err := audit.Verify(ctx, f, h)
	if err != nil || rep.BadLine != 0 || int(rep.Records) < len(keys) {
		t.Fatalf("audit after the kill: %+v, %v (want at least %d records)", rep, err, len(keys))
	}
}

// TestKill9APIKeys: revocations and rotations are on disk when their call
// returns: after SIGKILL and a restart a revoked key stays revoked (also
// keys revoked in bulk), a rotated-out secret stays expired and the new one
// works. The kill comes in the middle of verifications and of rotations
// (hint, index and record are separate writes): every rotation
// acknowledged before it holds after it, and the store checks clean.
func TestKill9APIKeys(t *testing.T) {
	bin := daemontest.Build(t)
	files := daemontest.NewFiles(t)
	sock := files.Socket

	cmd := daemontest.Exec(t, bin, files)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	mk := func(tag string) (string, string) {
		r, err := c.APIKeys.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "o", Name: "n", Environment: "prod", Permissions: []string{"read-only"}, Tags: []string{tag}, Unlimited: true})
		if err != nil {
			t.Fatal(err)
		}
		return r.Secret, r.Key.Id
	}
	verify := func(key string) keywardv1.APIKeyCode {
		r, err := c.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod"})
		if err != nil {
			t.Fatal(err)
		}
		return r.Code
	}
	revoked, revokedID := mk("single")
	rotated, rotatedID := mk("rotated")
	var bulk []string
	for range 50 {
		k, _ := mk("bulk")
		bulk = append(bulk, k)
	}
	for _, k := range append([]string{revoked, rotated}, bulk...) {
		if verify(k) != keywardv1.APIKeyCode_API_KEY_CODE_VALID { // now cached by digest
			t.Fatal("a new key is not valid")
		}
	}
	if _, err := c.APIKeys.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: revokedID}); err != nil {
		t.Fatal(err)
	}
	rot, err := c.APIKeys.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: rotatedID, Overlap: durationpb.New(0)})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := c.APIKeys.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Tag: "bulk"}); err != nil || r.Count != 50 {
		t.Fatalf("bulk revoke: %v %v", r, err)
	}
	// Rotations, each ending the secret before, until the kill.
	spinning, spinID := mk("spin")
	acked := []string{spinning}
	var rotMu sync.Mutex
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			r, err := c.APIKeys.RotateAPIKey(ctx, &keywardv1.RotateAPIKeyRequest{Id: spinID, Overlap: durationpb.New(0)})
			if err != nil {
				return
			}
			rotMu.Lock()
			acked = append(acked, r.Secret)
			rotMu.Unlock()
		}
	})
	for range 3 {
		wg.Go(func() {
			for {
				if _, err := c.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: rot.Secret, Environment: "prod"}); err != nil {
					return
				}
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	cmd.Kill()
	wg.Wait()
	c.Close()

	if len(acked) < 3 {
		t.Fatalf("only %d rotations before the kill", len(acked)-1)
	}
	second := daemontest.Exec(t, bin, files)
	c, _ = client.Dial(sock)
	defer c.Close()
	// The last rotation acknowledged holds (or one after it, done but not
	// acknowledged, ended it); none before it works.
	if got := verify(acked[len(acked)-1]); got != keywardv1.APIKeyCode_API_KEY_CODE_VALID && got != keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED {
		t.Errorf("the last acknowledged rotation's secret after SIGKILL: %v", got)
	}
	for i, k := range acked[:len(acked)-1] {
		if got := verify(k); got == keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Errorf("secret %d of %d, rotated out before the kill, is VALID after it", i, len(acked))
		}
	}
	t.Logf("%d rotations acknowledged before SIGKILL", len(acked)-1)
	defer func() {
		if err := second.Stop(); err != nil {
			t.Error(err)
		}
		h, err := hsm.Open(hsm.Config{Module: files.Token.Module, Token: files.Token.Label, PINFile: files.Token.PINFile})
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		st, err := openStore(h, files.DataDir)
		if err != nil {
			t.Fatalf("the store after the kill: %v", err)
		}
		st.Close()
	}()
	for name, want := range map[string]struct {
		key  string
		code keywardv1.APIKeyCode
	}{
		"revoked":           {revoked, keywardv1.APIKeyCode_API_KEY_CODE_REVOKED},
		"rotated out":       {rotated, keywardv1.APIKeyCode_API_KEY_CODE_EXPIRED},
		"rotated in":        {rot.Secret, keywardv1.APIKeyCode_API_KEY_CODE_VALID},
		"revoked in bulk":   {bulk[0], keywardv1.APIKeyCode_API_KEY_CODE_REVOKED},
		"revoked in bulk 2": {bulk[49], keywardv1.APIKeyCode_API_KEY_CODE_REVOKED},
	} {
		if got := verify(want.key); got != want.code {
			t.Errorf("%s after SIGKILL: %v, want %v", name, got, want.code)
		}
	}
}

// TestKill9LeavesNoPlugin: keywardd runs the file plugin (the real binary);
// GetStatus shows it running; keywardd killed with SIGKILL leaves no plugin
// process behind.
func TestKill9LeavesNoPlugin(t *testing.T) {
	bin := daemontest.Build(t)
	files := daemontest.NewFiles(t)
	pluginDir := filepath.Join(files.Dir, "plugins")
	os.Mkdir(pluginDir, 0o755)
	pluginBin := filepath.Join(pluginDir, "keyward-plugin-file")
	if out, err := exec.Command("go", "build", "-o", pluginBin, "../keyward-plugin-file").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	b, _ := os.ReadFile(pluginBin)
	sum := sha256.Sum256(b)
	f, _ := os.OpenFile(files.ConfigFile, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "plugins:\n  - name: file\n    path: %s\n    sha256: %s\n    env: {KEYWARD_FILE_DIRS: %s}\n", pluginBin, hex.EncodeToString(sum[:]), files.Dir)
	f.Close()

	cmd := daemontest.Exec(t, bin, files)
	c, err := client.Dial(files.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var pid int
	for range 100 {
		st, err := c.Status.GetStatus(context.Background(), &keywardv1.GetStatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Plugins) == 1 && st.Plugins[0].State == "running" {
			if p := st.Plugins[0]; p.Name != "file" || p.Pid == 0 || p.Launches != 1 || len(p.Capabilities) != 1 || p.Capabilities[0] != "rotator" {
				t.Fatalf("plugin status %v", p)
			}
			pid = int(st.Plugins[0].Pid)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if pid == 0 || syscall.Kill(pid, 0) != nil {
		t.Fatalf("the plugin is not running (pid %d)", pid)
	}
	cmd.Kill()
	for range 100 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("plugin %d outlived keywardd killed with SIGKILL", pid)
}

// TestKill9BulkRevoke: keywardd is killed with SIGKILL in the middle of
// a bulk revocation of 10 000 API keys (ten transactions). Started again,
// it finishes the revocation from its recorded intent: every key is
// revoked, none half, and the audit log says the revocation was resumed.
func TestKill9BulkRevoke(t *testing.T) {
	const keys = 10_000
	bin := daemontest.Build(t)
	files := daemontest.NewFiles(t)
	ctx := context.Background()
	// keywardd makes its keys; then the API keys go straight into its
	// store, as many as a bulk revocation must take in several transactions.
	if err := daemontest.Exec(t, bin, files).Stop(); err != nil {
		t.Fatal(err)
	}
	h, err := hsm.Open(hsm.Config{Module: files.Token.Module, Token: files.Token.Label, PINFile: files.Token.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(h, files.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	akm, err := apikeys.NewManager(st, h, daemon.PepperKey, apikeys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	type issued struct{ id, secret string }
	var all []issued
	for len(all) < keys {
		specs := make([]apikeys.Spec, apikeys.MaxCreateBatch)
		for i := range specs {
			specs[i] = apikeys.Spec{Owner: "team-bulk", Name: fmt.Sprint("k", len(all)+i), Environment: "prod", Permissions: []string{"read-only"}, Tags: []string{"leaked"}}
		}
		secrets, recs, err := akm.CreateMany(ctx, specs)
		if err != nil {
			t.Fatal(err)
		}
		for i := range recs {
			all = append(all, issued{recs[i].ID, secrets[i]})
		}
	}
	st.Close()
	h.Close()
	slices.SortFunc(all, func(a, b issued) int { return strings.Compare(a.id, b.id) }) // the order revocation goes in

	cmd := daemontest.Exec(t, bin, files)
	c, err := client.Dial(files.Socket)
	if err != nil {
		t.Fatal(err)
	}
	verify := func(c *client.Client, key string) keywardv1.APIKeyCode {
		r, err := c.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: key, Environment: "prod"})
		if err != nil {
			return keywardv1.APIKeyCode_API_KEY_CODE_UNSPECIFIED
		}
		return r.Code
	}
	for _, k := range []issued{all[0], all[keys-1]} {
		if got := verify(c, k.secret); got != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
			t.Fatalf("a key made in keywardd's store: %v", got)
		}
	}
	go c.APIKeys.RevokeAPIKeys(ctx, &keywardv1.RevokeAPIKeysRequest{Tag: "leaked"})
	// The first batch is in when the first key in ID order is revoked.
	within(t, "the bulk revocation's first batch did not land", func() (bool, string) {
		got := verify(c, all[0].secret)
		return got == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, got.String()
	})
	cmd.Kill()
	c.Close()
	// What the kill left, read from the store itself.
	h, err = hsm.Open(hsm.Config{Module: files.Token.Module, Token: files.Token.Label, PINFile: files.Token.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	st, err = openStore(h, files.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	revokedAtKill, intents := 0, 0
	st.ForEach(store.BucketAPIKeys, "", func(_ string, b []byte) error {
		if strings.Contains(string(b), `"state":"revoked"`) {
			revokedAtKill++
		}
		return nil
	})
	st.ForEach(store.BucketSchedule, apikeys.IntentPrefix, func(string, []byte) error { intents++; return nil })
	st.Close()
	h.Close()
	t.Logf("SIGKILL left %d of %d keys revoked", revokedAtKill, keys)
	if revokedAtKill == keys || intents != 1 {
		t.Fatalf("the kill did not cut the revocation short (%d of %d revoked, %d intents recorded): the test tests nothing", revokedAtKill, keys, intents)
	}

	second := daemontest.Exec(t, bin, files)
	c, err = client.Dial(files.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	within(t, "the last key of the revocation cut short is still valid", func() (bool, string) {
		got := verify(c, all[keys-1].secret)
		return got == keywardv1.APIKeyCode_API_KEY_CODE_REVOKED, got.String()
	})
	revoked, after := 0, ""
	for {
		r, err := c.APIKeys.ListAPIKeys(ctx, &keywardv1.ListAPIKeysRequest{Owner: "team-bulk", PageSize: 1000, PageToken: after})
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range r.Keys {
			if k.State == keywardv1.APIKeyState_API_KEY_STATE_REVOKED {
				revoked++
			}
		}
		if after = r.NextPageToken; after == "" {
			break
		}
	}
	if revoked != keys {
		t.Fatalf("after the restart %d of %d keys are revoked", revoked, keys)
	}
	// The restart finished it, audited, and dropped its intent.
	if err := second.Stop(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(files.DataDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	resumed := 0
	audit.Records(f, func(r audit.Record) error {
		if r.Op == "keywardd.RevokeAPIKeys" && r.Outcome == "ok" {
			resumed += r.Items
		}
		return nil
	})
	f.Close()
	if resumed != keys-revokedAtKill {
		t.Errorf("the audit log records %d keys revoked by the resumption; %d were left", resumed, keys-revokedAtKill)
	}
	h, err = hsm.Open(hsm.Config{Module: files.Token.Module, Token: files.Token.Label, PINFile: files.Token.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if st, err = openStore(h, files.DataDir); err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	intents = 0
	st.ForEach(store.BucketSchedule, apikeys.IntentPrefix, func(string, []byte) error { intents++; return nil })
	if intents != 0 {
		t.Errorf("%d intents left after the revocation was finished", intents)
	}
}
