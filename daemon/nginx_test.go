package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/fcgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// nginxServer is the part of nginx.conf's server block that asks keywardd
// (docs/gateways.md#nginx shows it): SOCKET is gateway.http_socket.path.
const nginxServer = `
        # The subrequest to keywardd: of the client's headers, only its
        # key (Authorization or X-API-Key; no cookies, nothing too large
        # for keywardd); the environment and permissions are the
        # protected location's, the address nginx's.
        location = /_keyward {
            internal;
            proxy_pass http://unix:SOCKET:/verify;
            proxy_pass_request_body off;
            proxy_pass_request_headers off;
            proxy_set_header Authorization $http_authorization;
            proxy_set_header X-API-Key $http_x_api_key;
            proxy_set_header Content-Length "";
            # keywardd answers in milliseconds: one that does not answer
            # fails the request (503) at once, not after nginx's 60 s.
            proxy_read_timeout 2s;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Keyward-Environment $keyward_environment;
            proxy_set_header X-Keyward-Permission $keyward_permission;
        }

        # keywardd's refusal as keywardd gave it: auth_request passes on
        # 401 and 403 only (any other status is a 500), and never a body.
        location @keyward_refused {
            default_type application/json;
            add_header Retry-After $keyward_retry_after always;
            add_header RateLimit-Limit $keyward_ratelimit_limit always;
            add_header RateLimit-Remaining $keyward_ratelimit_remaining always;
            add_header RateLimit-Reset $keyward_ratelimit_reset always;
            add_header Keyward-Near-Limit $keyward_near_limit always;
            if ($keyward_status = 401) { return 401 $keyward_body; }
            if ($keyward_status = 403) { return 403 $keyward_body; }
            if ($keyward_status = 429) { return 429 $keyward_body; }
            return 503 '{"error":"the API key could not be checked"}';
        }
`

// nginxProtect is keyward.conf, included in each protected location after
// it sets $keyward_environment and $keyward_permission.
const nginxProtect = `auth_request /_keyward;
auth_request_set $keyward_status $upstream_status;
auth_request_set $keyward_key_id $upstream_http_keyward_key_id;
auth_request_set $keyward_owner $upstream_http_keyward_owner;
auth_request_set $keyward_body $upstream_http_keyward_body;
auth_request_set $keyward_retry_after $upstream_http_retry_after;
auth_request_set $keyward_ratelimit_limit $upstream_http_ratelimit_limit;
auth_request_set $keyward_ratelimit_remaining $upstream_http_ratelimit_remaining;
auth_request_set $keyward_ratelimit_reset $upstream_http_ratelimit_reset;
auth_request_set $keyward_near_limit $upstream_http_keyward_near_limit;
error_page 401 403 500 = @keyward_refused;
# Set, or removed when empty: a client's own never reach the service,
# behind proxy_pass or FastCGI (php-fpm reads HTTP_KEYWARD_OWNER, which
# the client's Keyward-Owner would be).
proxy_set_header Keyward-Key-Id $keyward_key_id;
proxy_set_header Keyward-Owner $keyward_owner;
fastcgi_param HTTP_KEYWARD_KEY_ID $keyward_key_id;
fastcgi_param HTTP_KEYWARD_OWNER $keyward_owner;
add_header RateLimit-Limit $keyward_ratelimit_limit;
add_header RateLimit-Remaining $keyward_ratelimit_remaining;
add_header RateLimit-Reset $keyward_ratelimit_reset;
add_header Keyward-Near-Limit $keyward_near_limit;
`

// nginxLocations protect the upstream (UPSTREAM): /orders/ with
// orders:read in prod, /admin/ with orders:write; and /php/, a FastCGI
// service (FASTCGI: php-fpm, say) with orders:read.
const nginxLocations = `
        location /orders/ {
            set $keyward_environment prod;
            set $keyward_permission orders:read;
            include keyward.conf;
            proxy_pass http://UPSTREAM;
        }
        location /admin/ {
            set $keyward_environment prod;
            set $keyward_permission orders:write;
            include keyward.conf;
            proxy_pass http://UPSTREAM;
        }
        location /php/ {
            set $keyward_environment prod;
            set $keyward_permission orders:read;
            include keyward.conf;
            include fastcgi_params;
            fastcgi_pass FASTCGI;
        }
`

// TestNginxAuthRequest: Debian's nginx in front of a service, asking
// keywardd's gateway socket about each request (auth_request). A valid key,
// in Authorization or X-API-Key, reaches the service with its owner and ID
// (a client's own Keyward-Owner removed); a revoked one, no key, a key
// without the permission and one over its rate limit get keywardd's
// answer from nginx: status, headers and JSON body, the 429 with
// Retry-After. The client's address, the environment and the permissions
// are nginx's, whatever headers the client forges. Without keywardd (its
// socket gone, no one listening, or keywardd not answering) nginx answers
// 503 and the service is not reached. Each request is one VerifyAPIKey call in the audit log, by
// nginx's worker, whom the policy binds.
func TestNginxAuthRequest(t *testing.T) {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		if bin, err = exec.LookPath("/usr/sbin/nginx"); err != nil {
			t.Fatal("nginx is not installed: run make deps (Debian's nginx)")
		}
	}
	// As root (CI), nginx's workers run as nobody, reaching the socket
	// through its group; otherwise as this user.
	root := os.Getuid() == 0
	workerUID, user := os.Getuid(), ""
	gwDir := t.TempDir()
	if root {
		workerUID, user = 65534, "user nobody nogroup;"
		for d := gwDir; strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
			os.Chmod(d, 0o755)
		}
	}
	sock := filepath.Join(gwDir, "gw", "http.sock")
	pol := uidPolicy(allowAll)
	if root {
		pol = strings.Replace(pol, "bindings:", "  gateway:\n    permissions:\n      - operations: [APIKeyService.VerifyAPIKey]\n        keys: [\"*\"]\nbindings:", 1) +
			"  - role: gateway\n    callers:\n      - uid: 65534\n"
	}
	in := daemontest.Start(t, daemontest.Policy(pol), daemontest.Configure(func(c *daemon.Config) {
		c.Gateway.HTTPSocket.Path = sock
		if root {
			c.Gateway.HTTPSocket.Group = "nogroup"
		}
	}))

	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	create := func(name string, allowedIPs []string, limits ...*keywardv1.RateLimit) *keywardv1.CreateAPIKeyResponse {
		t.Helper()
		k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: name, Environment: "prod",
			Permissions: []string{"orders:read"}, RateLimits: limits, AllowedIps: allowedIPs})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	good := create("good", nil)
	revoked := create("revoked", nil)
	if _, err := ac.RevokeAPIKey(ctx, &keywardv1.RevokeAPIKeyRequest{Id: revoked.Key.Id}); err != nil {
		t.Fatal(err)
	}
	// Keys that only nginx's own client address (127.0.0.1) lets through,
	// and one it does not.
	local := create("local", []string{"127.0.0.1/32"})
	elsewhere := create("elsewhere", []string{"192.0.2.0/24"})
	limited := create("limited", nil, &keywardv1.RateLimit{Limit: 1, Per: durationpb.New(time.Hour), Burst: 1})

	type seen struct {
		owner, keyID []string
		other        []string // headers spelt otherwise that a CGI-style service reads as keyward's
		body         string
	}
	var mu sync.Mutex
	var upstream []seen
	service := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		s := seen{owner: r.Header.Values("Keyward-Owner"), keyID: r.Header.Values("Keyward-Key-Id")}
		for k := range r.Header {
			if n := strings.ToLower(strings.ReplaceAll(k, "_", "-")); (n == "keyward-owner" || n == "keyward-key-id") && k != http.CanonicalHeaderKey(n) {
				s.other = append(s.other, k)
			}
		}
		b, _ := io.ReadAll(r.Body)
		s.body = string(b)
		upstream = append(upstream, s)
		mu.Unlock()
		io.WriteString(w, "the service\n")
	})
	svc := httptest.NewServer(service)
	defer svc.Close()
	// The same service behind FastCGI, as php-fpm would be.
	fcgiDir := t.TempDir()
	os.Chmod(fcgiDir, 0o755)
	fcgiSock := filepath.Join(fcgiDir, "fcgi.sock")
	fl, err := net.Listen("unix", fcgiSock)
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	os.Chmod(fcgiSock, 0o666)
	go fcgi.Serve(fl, service)
	addr, nginxDir := startNginx(t, bin, user, sock, strings.TrimPrefix(svc.URL, "http://"), "unix:"+fcgiSock)

	type check struct {
		name, path string
		header     map[string]string
		status     int
		wantHeader map[string]string // "" for present, any value
		code       string            // the JSON body's code
		body       string            // sent with POST, chunked if chunked
		chunked    bool
	}
	checks := []check{
		{name: "valid, Bearer", path: "/orders/1", header: map[string]string{"Authorization": "Bearer " + good.Secret, "Keyward-Owner": "someone-else",
			"Keyward_Owner": "someone-else", "Keyward-Key-Id": "ak_forged", "keyward_key_id": "ak_forged"},
			status: 200, wantHeader: map[string]string{"RateLimit-Limit": ""}},
		{name: "valid, X-API-Key", path: "/orders/2", header: map[string]string{"X-API-Key": good.Secret}, status: 200},
		{name: "revoked", path: "/orders/3", header: map[string]string{"Authorization": "Bearer " + revoked.Secret},
			status: 401, wantHeader: map[string]string{"WWW-Authenticate": `Bearer error="invalid_token"`}, code: "revoked"},
		{name: "no key", path: "/orders/4", status: 401, code: "missing"},
		{name: "wrong permission", path: "/admin/1", header: map[string]string{"Authorization": "Bearer " + good.Secret}, status: 403, code: "forbidden"},
		{name: "within the limit", path: "/orders/5", header: map[string]string{"Authorization": "Bearer " + limited.Secret}, status: 200},
		{name: "over the limit", path: "/orders/6", header: map[string]string{"Authorization": "Bearer " + limited.Secret},
			status: 429, wantHeader: map[string]string{"Retry-After": "", "RateLimit-Remaining": "0", "RateLimit-Limit": "1"}},
		// The client's address is nginx's $remote_addr, whatever the
		// client says it is.
		{name: "its address allowed, another claimed", path: "/orders/7", header: map[string]string{"Authorization": "Bearer " + local.Secret,
			"X-Real-IP": "192.0.2.7", "X-Forwarded-For": "192.0.2.7"}, status: 200},
		{name: "a forged X-Real-IP and X-Forwarded-For", path: "/orders/8", header: map[string]string{"Authorization": "Bearer " + elsewhere.Secret,
			"X-Real-IP": "192.0.2.7", "X-Forwarded-For": "192.0.2.7", "X_Real_IP": "192.0.2.7", "Forwarded": "for=192.0.2.7"}, status: 403, code: "ip_not_allowed"},
		// What a key must allow is the location's, whatever the client says.
		{name: "a forged environment and permission", path: "/admin/2", header: map[string]string{"Authorization": "Bearer " + good.Secret,
			"X-Keyward-Permission": "orders:read", "X-Keyward-Environment": "prod"}, status: 403, code: "forbidden"},
		// The request's body goes to the service, never to keywardd.
		{name: "valid, a POST with a body", path: "/orders/10", header: map[string]string{"Authorization": "Bearer " + good.Secret}, body: "order=10", status: 200},
		{name: "valid, a chunked body", path: "/orders/11", header: map[string]string{"Authorization": "Bearer " + good.Secret}, body: "order=11", chunked: true, status: 200},
		// A client's other headers, 21 kB of them, are none of keywardd's business.
		{name: "valid, large cookies", path: "/orders/12", header: map[string]string{"Authorization": "Bearer " + good.Secret,
			"Cookie": "a=" + strings.Repeat("x", 7000), "X-Big": strings.Repeat("y", 7000), "X-Bigger": strings.Repeat("z", 7000)}, status: 200},
		// A FastCGI service gets keyward's Keyward-* (HTTP_KEYWARD_*), never the client's.
		{name: "valid, FastCGI", path: "/php/1", header: map[string]string{"Authorization": "Bearer " + good.Secret, "Keyward-Owner": "someone-else",
			"Keyward-Key-Id": "ak_forged"}, status: 200},
	}
	for _, c := range checks {
		req, _ := http.NewRequest("GET", "http://"+addr+c.path, nil)
		if c.body != "" {
			var body io.Reader = strings.NewReader(c.body)
			if c.chunked {
				body = io.MultiReader(body) // no length: sent chunked
			}
			req, _ = http.NewRequest("POST", "http://"+addr+c.path, body)
		}
		for k, v := range c.header {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Fatalf("%s: status %d, want %d; body %s\nnginx's error log:\n%s", c.name, resp.StatusCode, c.status, body, readFile(filepath.Join(nginxDir, "error.log")))
		}
		for k, v := range c.wantHeader {
			if got := resp.Header.Values(k); len(got) != 1 || v != "" && got[0] != v {
				t.Errorf("%s: %s is %q, want %q (headers %v)", c.name, k, got, v, resp.Header)
			}
		}
		if c.status == 200 {
			if string(body) != "the service\n" {
				t.Errorf("%s: body %q is not the service's", c.name, body)
			}
			continue
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s: Content-Type %q", c.name, ct)
		}
		var got map[string]any
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("%s: the body %q is not keywardd's JSON: %v", c.name, body, err)
		}
		if c.status == 429 {
			ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			if got["error"] != "rate limit exceeded" || got["limit"] != 1.0 || got["current_usage"] != 1.0 || got["retry_after"] != float64(ra) || ra <= 0 || got["reset_time"] == nil {
				t.Errorf("%s: body %s, Retry-After %d", c.name, body, ra)
			}
		} else if got["code"] != c.code {
			t.Errorf("%s: body %s, want code %q", c.name, body, c.code)
		}
	}
	mu.Lock()
	if len(upstream) != 8 {
		t.Fatalf("the service was reached %d times, want 8 (the valid keys)", len(upstream))
	}
	for i, s := range slices.Concat(upstream[:2], upstream[4:]) {
		if len(s.owner) != 1 || s.owner[0] != "shop" || len(s.keyID) != 1 || s.keyID[0] != good.Key.Id || len(s.other) > 0 {
			t.Errorf("request %d reached the service with Keyward-Owner %q, Keyward-Key-Id %q and %q; want shop and %s only", i, s.owner, s.keyID, s.other, good.Key.Id)
		}
	}
	if s := upstream[7]; len(s.owner) != 1 || s.owner[0] != "shop" || len(s.keyID) != 1 || s.keyID[0] != good.Key.Id {
		t.Errorf("the FastCGI service got Keyward-Owner %q and Keyward-Key-Id %q; want shop and %s only", s.owner, s.keyID, good.Key.Id)
	}
	if upstream[4].body != "order=10" || upstream[5].body != "order=11" {
		t.Errorf("the service got the bodies %q and %q, want order=10 and order=11", upstream[4].body, upstream[5].body)
	}
	mu.Unlock()

	// Without keywardd nginx fails closed: 503, and the service is not
	// reached. Its socket gone, a socket no one listens on, and a keywardd
	// that accepts and never answers.
	in.Stop()
	refusedWithout := func(why string) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+addr+"/orders/9", nil)
		req.Header.Set("Authorization", "Bearer "+good.Secret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", why, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var got map[string]any
		if resp.StatusCode != 503 || json.Unmarshal(body, &got) != nil || got["error"] == nil {
			t.Errorf("%s: %d %s; want 503 and a JSON error", why, resp.StatusCode, body)
		}
	}
	os.Remove(sock)
	refusedWithout("keywardd's socket gone")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sock, 0o666)
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	refusedWithout("keywardd not answering")
	ln.Close()
	refusedWithout("keywardd's socket with no one listening")
	mu.Lock()
	for _, c := range held {
		c.Close()
	}
	if len(upstream) != 8 {
		t.Errorf("the service was reached %d times, want 8: a request passed without keywardd", len(upstream))
	}
	mu.Unlock()

	// One VerifyAPIKey record per request, by nginx's worker.
	verifyAudit(t, in)
	f, err := os.Open(auditFile(in))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var results []string
	err = audit.Records(f, func(rec audit.Record) error {
		if rec.Op != "APIKeyService.VerifyAPIKey" {
			return nil
		}
		if rec.Caller.UID != uint32(workerUID) || rec.Outcome != "ok" {
			t.Errorf("a VerifyAPIKey record by uid %d, outcome %s; want nginx's worker's, %d, ok", rec.Caller.UID, rec.Outcome, workerUID)
		}
		results = append(results, rec.Result)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "VALID VALID REVOKED MALFORMED FORBIDDEN VALID RATE_LIMITED VALID IP_NOT_ALLOWED FORBIDDEN VALID VALID VALID VALID"
	if got := strings.Join(results, " "); got != want {
		t.Fatalf("the audit log's VerifyAPIKey verdicts:\n got %s\nwant %s", got, want)
	}

	// No key in keywardd's log, its audit log, or nginx's logs.
	logs := map[string]string{"keywardd's log": in.Log.String(), "the audit log": readFile(auditFile(in)),
		"nginx's error log": readFile(filepath.Join(nginxDir, "error.log")), "nginx's access log": readFile(filepath.Join(nginxDir, "access.log"))}
	for _, k := range []*keywardv1.CreateAPIKeyResponse{good, revoked, local, elsewhere, limited} {
		for name, text := range logs {
			if text == "" || strings.Contains(text, k.Secret) {
				t.Errorf("%s (%d bytes) holds the key %s's secret, or is empty", name, len(text), k.Key.Name)
			}
		}
	}
}

func readFile(path string) string { b, _ := os.ReadFile(path); return string(b) }

// startNginx runs nginx (bin) in the foreground on a free loopback port,
// with nginxServer and nginxLocations asking keywardd on sock and
// protecting upstream, until the test ends; it returns the address and
// nginx's directory (nginx.conf, error.log).
func startNginx(t *testing.T, bin, user, sock, upstream, fastcgi string) (addr, dir string) {
	t.Helper()
	dir = t.TempDir()
	os.Chmod(dir, 0o755)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = l.Addr().String()
	l.Close()
	conf := fmt.Sprintf(`daemon off;
%s
worker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log info;
events { worker_connections 64; }
http {
    access_log %[2]s/access.log;
    client_body_temp_path %[2]s/client_body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    server {
        listen %[3]s;
%[4]s%[5]s    }
}
`, user, dir, addr, strings.ReplaceAll(nginxServer, "SOCKET", sock), strings.NewReplacer("UPSTREAM", upstream, "FASTCGI", fastcgi).Replace(nginxLocations))
	// Debian's nginx's FastCGI parameters, for the FastCGI location.
	params, err := os.ReadFile("/etc/nginx/fastcgi_params")
	if err != nil {
		t.Fatalf("Debian's nginx installs /etc/nginx/fastcgi_params: %v", err)
	}
	for name, text := range map[string]string{"nginx.conf": conf, "keyward.conf": nginxProtect, "fastcgi_params": string(params)} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out := &daemontest.Log{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGQUIT)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr, dir
		}
		select {
		case <-exited:
			t.Fatalf("nginx exited:\n%s%s", out, readFile(filepath.Join(dir, "error.log")))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestNginxDocs: docs/gateways.md shows the configuration
// TestNginxAuthRequest runs, with the socket and the service named as in
// production.
func TestNginxDocs(t *testing.T) {
	doc, err := os.ReadFile("../docs/gateways.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{
		"the server block's locations": strings.ReplaceAll(nginxServer, "SOCKET", "/run/keyward-gateway/http.sock"),
		"keyward.conf":                 nginxProtect,
		"the protected locations":      strings.NewReplacer("UPSTREAM", "orders", "FASTCGI", "unix:/run/php/php-fpm.sock").Replace(nginxLocations),
	} {
		if !strings.Contains(string(doc), "```nginx"+text+"```") && !strings.Contains(string(doc), "```nginx\n"+text+"```") {
			t.Errorf("docs/gateways.md does not show %s as the test runs it:\n%s", name, text)
		}
	}
}
