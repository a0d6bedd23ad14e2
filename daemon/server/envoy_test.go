package server_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/apikeys"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/policy"
	"github.com/keyward/keyward/daemon/server"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// gatewayPolicy grants the test's uid the operations ops on the owners
// keys (YAML lists).
func gatewayPolicy(ops, keys string) string {
	return fmt.Sprintf("version: 1\nroles:\n  r:\n    permissions:\n      - operations: %s\n        keys: %s\nbindings:\n  - role: r\n    callers:\n      - uid: %d\n",
		ops, keys, os.Getuid())
}

// envoyCheck is the CheckRequest an Envoy sends for a request with
// headers from source, on a route whose context_extensions are ext.
func envoyCheck(headers, ext map[string]string, source string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: source, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40000}}}}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: "/orders/1", Host: "api.example", Headers: headers}},
		ContextExtensions: ext}}
}

// header is the value of the header name among hs, and whether Envoy is
// told to overwrite one the request already has.
func header(hs []*corev3.HeaderValueOption, name string) (string, bool) {
	for _, h := range hs {
		if strings.EqualFold(h.GetHeader().GetKey(), name) {
			return h.GetHeader().GetValue(), h.GetAppendAction() == corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
		}
	}
	return "", false
}

// auditRecords is every record keywardd's audit log holds now.
func auditRecords(t *testing.T, in *daemontest.Daemon) ([]audit.Record, []byte) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []audit.Record
	if err := audit.Records(strings.NewReader(string(raw)), func(r audit.Record) error { out = append(out, r); return nil }); err != nil {
		t.Fatal(err)
	}
	return out, raw
}

// TestEnvoyCheck: Envoy's external authorization over keywardd's socket,
// with Envoy's own messages: each verdict's answer (the status, headers and
// body of gateway.AnswerOf, or the key's ID and owner for the service),
// the route's settings, the policy deciding who may ask, and one audit
// record per Check, naming Envoy and never the key.
func TestEnvoyCheck(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(gatewayPolicy(`["*"]`, `["*"]`)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	create := func(r *keywardv1.CreateAPIKeyRequest) (string, string) {
		t.Helper()
		r.Name, r.Environment = "orders-api", "prod"
		if r.Owner == "" {
			r.Owner = "team-a"
		}
		if r.Permissions == nil {
			r.Permissions = []string{"orders:read"}
		}
		if r.RateLimits == nil {
			r.Unlimited = true
		}
		resp, err := ac.CreateAPIKey(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return resp.Secret, resp.Key.Id
	}
	key, keyID := create(&keywardv1.CreateAPIKeyRequest{})
	limited, limitedID := create(&keywardv1.CreateAPIKeyRequest{RateLimits: []*keywardv1.RateLimit{{Limit: 1, Per: durationpb.New(time.Hour), Burst: 1}}})
	fenced, _ := create(&keywardv1.CreateAPIKeyRequest{AllowedIps: []string{"192.0.2.0/24"}})
	teamB, _ := create(&keywardv1.CreateAPIKeyRequest{Owner: "team-b"})
	revoked, revokedID := create(&keywardv1.CreateAPIKeyRequest{})
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: revokedID}); err != nil {
		t.Fatal(err)
	}
	unknown, err := apikeys.Generate(apikeys.DefaultPrefix, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{key, limited, fenced, teamB, revoked, unknown}

	route := map[string]string{"keyward_environment": "prod", "keyward_permission": "orders:read"}
	bearer := func(k string) map[string]string {
		return map[string]string{"authorization": "Bearer " + k, "keyward-key-id": "ak_forged", ":path": "/orders/1"}
	}
	ec := authv3.NewAuthorizationClient(in.Conn)
	type want struct {
		status  int    // 0: passed
		code    string // the body's "code"
		id      string // the key's ID, passed; and in the audit record
		result  string // the audit record's verdict
		headers []string
	}
	for _, c := range []struct {
		name    string
		headers map[string]string
		ext     map[string]string
		source  string
		want    want
	}{
		{"valid", bearer(key), route, "198.51.100.7", want{id: keyID, result: "VALID"}},
		{"bearer scheme in any case", map[string]string{"authorization": "bearer  " + key}, route, "198.51.100.7", want{id: keyID, result: "VALID"}},
		{"several permissions", bearer(key), map[string]string{"keyward_environment": "prod", "keyward_permission": "orders:read, orders:write"}, "198.51.100.7",
			want{status: 403, code: "forbidden", id: keyID, result: "FORBIDDEN"}},
		{"own header", map[string]string{"x-api-key": key}, map[string]string{"keyward_environment": "prod", "keyward_header": "X-API-Key"}, "198.51.100.7",
			want{id: keyID, result: "VALID"}},
		{"own header missing", bearer(key), map[string]string{"keyward_environment": "prod", "keyward_header": "x-api-key"}, "198.51.100.7",
			want{status: 401, code: "missing", result: "MALFORMED", headers: []string{"WWW-Authenticate"}}},
		{"no header", map[string]string{}, route, "198.51.100.7", want{status: 401, code: "missing", result: "MALFORMED", headers: []string{"WWW-Authenticate"}}},
		{"basic scheme", map[string]string{"authorization": "Basic " + key}, route, "198.51.100.7", want{status: 401, code: "missing", result: "MALFORMED"}},
		{"unknown", bearer(unknown), route, "198.51.100.7", want{status: 401, code: "not_found", result: "NOT_FOUND", headers: []string{"WWW-Authenticate"}}},
		{"revoked", bearer(revoked), route, "198.51.100.7", want{status: 401, code: "revoked", id: revokedID, result: "REVOKED"}},
		{"wrong permission", bearer(key), map[string]string{"keyward_environment": "prod", "keyward_permission": "orders:delete"}, "198.51.100.7",
			want{status: 403, code: "forbidden", id: keyID, result: "FORBIDDEN"}},
		{"wrong environment", bearer(key), map[string]string{"keyward_environment": "staging"}, "198.51.100.7",
			want{status: 403, code: "wrong_environment", id: keyID, result: "WRONG_ENVIRONMENT"}},
		{"address allowed", bearer(fenced), route, "192.0.2.9", want{result: "VALID"}},
		{"address not allowed", bearer(fenced), route, "198.51.100.7", want{status: 403, code: "ip_not_allowed", result: "IP_NOT_ALLOWED"}},
		{"within the rate limit", bearer(limited), route, "198.51.100.7",
			want{id: limitedID, result: "VALID", headers: []string{"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Keyward-Near-Limit"}}},
		{"rate limited", bearer(limited), route, "198.51.100.7",
			want{status: 429, id: limitedID, result: "RATE_LIMITED", headers: []string{"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before, _ := auditRecords(t, in)
			resp, err := ec.Check(ctx, envoyCheck(c.headers, c.ext, c.source))
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			var answered []*corev3.HeaderValueOption
			if c.want.status == 0 {
				ok := resp.GetOkResponse()
				if resp.GetStatus().GetCode() != int32(codes.OK) || ok == nil {
					t.Fatalf("Check = %v, want OK", resp)
				}
				for name, want := range map[string]string{"Keyward-Key-Id": c.want.id, "Keyward-Owner": "team-a"} {
					if got, overwrite := header(ok.GetHeaders(), name); (want != "" && got != want) || got == "" || !overwrite {
						t.Errorf("%s = %q (overwriting the client's: %v), want %q, overwriting", name, got, overwrite, want)
					}
				}
				answered = ok.GetResponseHeadersToAdd()
			} else {
				d := resp.GetDeniedResponse()
				if resp.GetStatus().GetCode() == int32(codes.OK) || d == nil || int(d.GetStatus().GetCode()) != c.want.status {
					t.Fatalf("Check = %v, want a denial with HTTP %d", resp, c.want.status)
				}
				if ct, _ := header(d.GetHeaders(), "Content-Type"); ct != "application/json" {
					t.Errorf("Content-Type = %q", ct)
				}
				var body map[string]any
				if err := json.Unmarshal([]byte(d.GetBody()), &body); err != nil {
					t.Fatalf("body %q: %v", d.GetBody(), err)
				}
				if c.want.status == 429 {
					ra, _ := header(d.GetHeaders(), "Retry-After")
					if ra == "" || ra == "0" || body["error"] != "rate limit exceeded" || fmt.Sprint(body["retry_after"]) != ra ||
						body["limit"] != float64(1) || body["current_usage"] != float64(1) || body["reset_time"] == nil {
						t.Errorf("429: Retry-After %q, body %v", ra, body)
					}
				} else if body["code"] != c.want.code {
					t.Errorf("body %v, want code %q", body, c.want.code)
				}
				answered = d.GetHeaders()
			}
			for _, h := range c.want.headers {
				if v, _ := header(answered, h); v == "" {
					t.Errorf("no %s among %v", h, answered)
				}
			}
			after, raw := auditRecords(t, in)
			if len(after) != len(before)+1 {
				t.Fatalf("%d audit records for one Check, want 1", len(after)-len(before))
			}
			r := after[len(after)-1]
			if r.Op != "APIKeyService.VerifyAPIKey" || r.Outcome != "ok" || r.Result != c.want.result || !strings.Contains(r.Detail, "Envoy's ext_authz Check") ||
				(c.want.id != "" && r.APIKey != c.want.id) {
				t.Errorf("audit record %+v, want VerifyAPIKey through Envoy, %s, key %q", r, c.want.result, c.want.id)
			}
			for _, s := range secrets {
				if strings.Contains(string(raw), s[len(s)-20:]) {
					t.Fatal("an API key's secret is in the audit log")
				}
			}
		})
	}

	// Bad settings, and callers not granted VerifyAPIKey: gRPC errors,
	// which Envoy turns into its status_on_error.
	for _, c := range []struct {
		name, policy string
		ext          map[string]string
		code         codes.Code
		msg          string
		outcome      string
	}{
		{"no environment", "", map[string]string{"keyward_permission": "orders:read"}, codes.InvalidArgument, "keyward_environment", "error"},
		{"not granted", gatewayPolicy(`["APIKeyService.GetAPIKey"]`, `["*"]`), route, codes.PermissionDenied, "APIKeyService.VerifyAPIKey", "denied"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.policy != "" {
				in.SetPolicy(c.policy)
			}
			before, _ := auditRecords(t, in)
			_, err := ec.Check(ctx, envoyCheck(bearer(key), c.ext, "198.51.100.7"))
			if st := status.Convert(err); st.Code() != c.code || !strings.Contains(st.Message(), c.msg) {
				t.Fatalf("Check: %v, want %v naming %s", err, c.code, c.msg)
			}
			after, _ := auditRecords(t, in)
			if len(after) != len(before)+1 {
				t.Fatalf("%d audit records for one Check, want 1", len(after)-len(before))
			}
			if r := after[len(after)-1]; r.Op != "APIKeyService.VerifyAPIKey" || r.Outcome != c.outcome || !strings.Contains(r.Detail, "Envoy") {
				t.Errorf("audit record %+v, want VerifyAPIKey %s, through Envoy", r, c.outcome)
			}
		})
	}

	// A gateway role granted VerifyAPIKey on one owner admits that
	// owner's keys, and no other's.
	in.SetPolicy(gatewayPolicy(`["APIKeyService.VerifyAPIKey"]`, `["team-a"]`))
	for k, want := range map[string]int{key: 0, teamB: 401} {
		resp, err := ec.Check(ctx, envoyCheck(bearer(k), route, "198.51.100.7"))
		if err != nil {
			t.Fatal(err)
		}
		if got := int(resp.GetDeniedResponse().GetStatus().GetCode()); got != want {
			t.Errorf("a gateway granted team-a's keys: HTTP %d for a key of %s, want %d", got, map[bool]string{true: "team-a", false: "team-b"}[k == key], want)
		}
	}
}

// yamlBlock is the first YAML block of docs/gateways.md's Envoy section
// that contains marker.
func yamlBlock(t *testing.T, marker string) []byte {
	t.Helper()
	doc, err := os.ReadFile("../../docs/gateways.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(doc), "\n## Envoy\n")
	section, _, _ = strings.Cut(section, "\n## ") // the next section's are not Envoy's
	for rest := section; ; {
		var block string
		var ok bool
		if _, rest, ok = strings.Cut(rest, "```yaml\n"); !ok {
			break
		}
		block, rest, _ = strings.Cut(rest, "```\n")
		if strings.Contains(block, marker) {
			return []byte(block)
		}
	}
	t.Fatalf("docs/gateways.md's Envoy section has no YAML block with %q", marker)
	return nil
}

// TestEnvoyConfigInDocs: the Envoy configuration docs/gateways.md shows
// is one Envoy's API accepts (every field known, every typed config
// resolved, Envoy's validation rules met), it sends keywardd the key's
// header and routes' settings keyward reads, and the policy it shows
// parses and grants a gateway VerifyAPIKey.
func TestEnvoyConfigInDocs(t *testing.T) {
	var v any
	if err := yaml.Unmarshal(yamlBlock(t, "static_resources:"), &v); err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var bs bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(js, &bs); err != nil {
		t.Fatalf("Envoy's API refuses the configuration: %v", err)
	}
	if err := bs.ValidateAll(); err != nil {
		t.Fatalf("Envoy's validation refuses the configuration: %v", err)
	}
	text := string(js)
	for _, want := range []string{server.EnvoyEnvironment, server.EnvoyPermission, `"failure_mode_allow":false`, `"path":"/run/keyward/keyward.sock"`,
		`"exact":"authorization"`, "http2_protocol_options"} {
		if !strings.Contains(text, want) {
			t.Errorf("the configuration has no %s", want)
		}
	}
	// No user envoy here: the policy is read for uid 4242.
	pol, err := policy.Parse([]byte(strings.Replace(string(yamlBlock(t, "roles:")), "user: envoy", "uid: 4242", 1)), server.Ops())
	if err != nil {
		t.Fatalf("the policy in docs/gateways.md: %v", err)
	}
	envoy := policy.Subject{UID: 4242}
	if err := pol.Allow(envoy, "APIKeyService.VerifyAPIKey", "team-a"); err != nil {
		t.Errorf("the gateway may not verify team-a's keys: %v", err)
	}
	if err := pol.Allow(envoy, "APIKeyService.VerifyAPIKey", "team-c"); err == nil {
		t.Error("the gateway may verify the keys of an owner the policy does not name")
	}
}

// FuzzEnvoyCheck sends Check requests of arbitrary headers, route
// settings and source addresses to a keywardd on a real token, socket,
// store and audit log. Whatever they are, the answer is a verdict's (OK
// with the key's ID and owner, or 401, 403 or 429 with a JSON body) or
// INVALID_ARGUMENT naming what is wrong, and keywardd goes on serving.
func FuzzEnvoyCheck(f *testing.F) {
	in := daemontest.Start(f, daemontest.Policy(gatewayPolicy(`["*"]`, `["*"]`)))
	ctx := context.Background()
	r, err := keywardv1.NewAPIKeyServiceClient(in.Conn).CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "fuzz",
		Environment: "prod", Permissions: []string{"orders:read"}, Unlimited: true})
	if err != nil {
		f.Fatal(err)
	}
	ec := authv3.NewAuthorizationClient(in.Conn)
	f.Add("authorization", "Bearer "+r.Secret, "", "prod", "orders:read", "192.0.2.1")
	f.Add("x-api-key", r.Secret, "X-API-Key", "prod", "orders:read,orders:write", "2001:db8::1")
	f.Add("authorization", "Basic "+r.Secret, "", "prod", "", "")
	f.Add("authorization", "Bearer", "authorization", "", ",,", "not an address")
	f.Fuzz(func(t *testing.T, name, value, keyHeader, env, perms, source string) {
		// Envoy's strings are UTF-8: it replaces what is not with '!' (and
		// a proto3 string must be, or the client cannot send it).
		for _, s := range []*string{&name, &value, &keyHeader, &env, &perms, &source} {
			*s = strings.ToValidUTF8(*s, "!")
		}
		ext := map[string]string{"keyward_environment": env, "keyward_permission": perms, "keyward_header": keyHeader}
		resp, err := ec.Check(ctx, envoyCheck(map[string]string{name: value}, ext, source))
		if err != nil {
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || st.Message() == "" {
				t.Fatalf("Check: %v, want a verdict or INVALID_ARGUMENT", err)
			}
			return
		}
		if ok := resp.GetOkResponse(); ok != nil {
			if id, _ := header(ok.GetHeaders(), "Keyward-Key-Id"); id != r.Key.Id || resp.GetStatus().GetCode() != int32(codes.OK) {
				t.Fatalf("passed without the key's ID: %v", resp)
			}
			return
		}
		d := resp.GetDeniedResponse()
		switch d.GetStatus().GetCode() {
		case 401, 403, 429:
		default:
			t.Fatalf("Check = %v, want OK or a denial with 401, 403 or 429", resp)
		}
		if !json.Valid([]byte(d.GetBody())) || resp.GetStatus().GetCode() == int32(codes.OK) {
			t.Fatalf("denial %v", resp)
		}
	})
}
