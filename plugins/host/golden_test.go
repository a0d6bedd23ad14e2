package host

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/keyward/keyward/daemon/outbox"
	pluginv1 "github.com/keyward/keyward/plugins/proto/v1"
)

// goldenKinds is which outbox kind each golden revocation of
// plugins/proto/v1/testdata/golden.json is delivered from: the mapping a
// plugin built against keyward.plugin.v1 relies on.
var goldenKinds = map[string]string{
	"revoke api_key_revoked":     outbox.APIKeyRevoked,
	"revoke token_revoked":       outbox.TokenRevoked,
	"revoke key_version_revoked": outbox.KeyVersionRevoked,
	"revoke credential_revoked":  outbox.CredentialRevoked,
	"revoke rotation_due":        outbox.RotationDue,
	"revoke anomaly":             outbox.Anomaly,
	"revoke key_version_retired": outbox.KeyVersionRetired,
	"revoke api_key_leaked":      outbox.APIKeyLeaked,
}

// TestGoldenRevocations: Deliver sends a real plugin the golden
// revocations of the plugin protocol (plugins/proto/v1's golden file, which
// go test -update there rewrites) from outbox events of the same kind, ID,
// subject, time and detail: every outbox kind reaches the plugin as its
// EventKind, and the request the plugin's SDK hands on, encoded again, is
// the golden bytes.
func TestGoldenRevocations(t *testing.T) {
	path := filepath.Join("..", "proto", "v1", "testdata", "golden.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var vectors []struct {
		Name string `json:"name"`
		Wire string `json:"wire_hex"`
	}
	if err := json.Unmarshal(b, &vectors); err != nil {
		t.Fatal(err)
	}
	cfg, _, _ := setup(t, "")
	wire := filepath.Join(t.TempDir(), "wire")
	cfg.Env["TESTPLUGIN_WIRE"] = wire
	set := Set{"test": start(t, cfg)}
	var want []string
	for _, v := range vectors {
		if !strings.HasPrefix(v.Name, "revoke ") {
			continue
		}
		kind, ok := goldenKinds[v.Name]
		if !ok {
			t.Fatalf("%s has a revocation %q that no outbox kind is delivered as", path, v.Name)
		}
		raw, _ := hex.DecodeString(v.Wire)
		var r pluginv1.RevokeRequest
		if err := proto.Unmarshal(raw, &r); err != nil {
			t.Fatal(err)
		}
		e := r.GetEvent()
		err := set.Deliver(context.Background(), "test", r.GetOperationId(),
			outbox.Event{Kind: kind, ID: e.GetId(), Subject: e.GetSubject(), Time: e.GetTime().AsTime(), Detail: e.GetDetail(), Nonce: "0001020304050607"})
		if err != nil {
			t.Fatalf("Deliver of %s: %v", v.Name, err)
		}
		want = append(want, v.Wire)
	}
	if len(want) != len(goldenKinds) {
		t.Fatalf("%s holds %d revocations, want one per outbox kind (%d)", path, len(want), len(goldenKinds))
	}
	got, err := os.ReadFile(wire)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(got))
	for i, w := range want {
		reached := "(nothing)"
		if i < len(lines) {
			reached = lines[i]
		}
		if reached != w {
			t.Fatalf("revocation %d reached the plugin with other %s:\n%s\nnot as %s holds it\n%s", i+1, revokeFields(reached, w), reached, path, w)
		}
	}
}

// revokeFields names the fields of two encoded RevokeRequests that differ.
func revokeFields(gotHex, wantHex string) string {
	var g, w pluginv1.RevokeRequest
	gb, _ := hex.DecodeString(gotHex)
	wb, _ := hex.DecodeString(wantHex)
	if proto.Unmarshal(gb, &g) != nil || proto.Unmarshal(wb, &w) != nil {
		return "bytes (not a RevokeRequest)"
	}
	var out []string
	for _, f := range []struct {
		name string
		g, w any
	}{
		{"operation_id", g.GetOperationId(), w.GetOperationId()}, {"event.kind", g.GetEvent().GetKind(), w.GetEvent().GetKind()},
		{"event.id", g.GetEvent().GetId(), w.GetEvent().GetId()}, {"event.subject", g.GetEvent().GetSubject(), w.GetEvent().GetSubject()},
		{"event.time", g.GetEvent().GetTime().AsTime(), w.GetEvent().GetTime().AsTime()}, {"event.detail", g.GetEvent().GetDetail(), w.GetEvent().GetDetail()},
	} {
		if f.g != f.w {
			out = append(out, fmt.Sprintf("%s (%v, not %v)", f.name, f.g, f.w))
		}
	}
	if len(out) == 0 {
		return "bytes (the same fields)"
	}
	return strings.Join(out, ", ")
}
