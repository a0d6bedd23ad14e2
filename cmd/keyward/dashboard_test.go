package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/keyward/keyward/daemon"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/geo/geotest"
	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// browser is a headless Chromium (Debian's chromium package, which make
// deps installs) driven through chromedp, with a profile of its own.
func browser(t *testing.T) context.Context {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("the browser tests need Chromium: make deps installs Debian's chromium package (%v)", err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path), chromedp.UserDataDir(t.TempDir()), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-background-networking", true), chromedp.WindowSize(1280, 900))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	bctx, cancel2 := chromedp.NewContext(actx)
	t.Cleanup(cancel2)
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("chromium did not start: %v", err)
	}
	return bctx
}

// startDashboard runs keyward dashboard against socket until the test
// ends, and returns its address and login URL as it printed them.
func startDashboard(t *testing.T, socket string) (base, login string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	var errb strings.Builder
	go func() {
		done <- run(ctx, []string{"--socket", socket, "dashboard", "-open=false"}, strings.NewReader(""), pw, &errb)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("keyward dashboard exited %d: %s", code, errb.String())
		}
	})
	sc := bufio.NewScanner(pr)
	re := regexp.MustCompile(`^  (http://127\.0\.0\.1:\d+)/login\?token=\S+$`)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			go io.Copy(io.Discard, pr)
			return m[1], strings.TrimSpace(sc.Text())
		}
	}
	t.Fatalf("keyward dashboard printed no login URL: %s", errb.String())
	return "", ""
}

// shots saves each page's screenshot under the test's directory and, with
// KEYWARD_SCREENSHOTS set (make screenshots), there too (docs/dashboard/).
type shots struct{ dirs []string }

func newShots(t *testing.T) *shots {
	s := &shots{dirs: []string{filepath.Join(t.TempDir(), "screenshots")}}
	if d := os.Getenv("KEYWARD_SCREENSHOTS"); d != "" {
		s.dirs = append(s.dirs, d)
	}
	for _, d := range s.dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (s *shots) take(name string) chromedp.Action[chromedp.Void] { return s.save(name, s.dirs) }

// takeHere saves a screenshot under the test's directory only: one that
// shows a secret (a test key's, but a secret scanner cannot tell).
func (s *shots) takeHere(name string) chromedp.Action[chromedp.Void] { return s.save(name, s.dirs[:1]) }

func (s *shots) save(name string, dirs []string) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		b, err := chromedp.FullScreenshot(100)(ctx, tg)
		if err != nil {
			return chromedp.Void{}, err
		}
		for _, d := range dirs {
			if err := os.WriteFile(filepath.Join(d, name+".png"), b, 0o644); err != nil {
				return chromedp.Void{}, err
			}
		}
		return chromedp.Void{}, nil
	}
}

// get runs one action in the browser b, with a deadline, and returns its value.
func get[T any](t *testing.T, b context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	c, cancel := context.WithTimeout(b, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(c, a)
	if err != nil {
		// Say where the browser is, and what it shows.
		c, cancel := context.WithTimeout(b, 5*time.Second)
		defer cancel()
		url, _ := chromedp.Run(c, chromedp.Location())
		text, _ := chromedp.Run(c, chromedp.Text(chromedp.CSS("body")))
		t.Fatalf("%s: %v; the browser is at %s, showing:\n%s", what, err, url, text)
	}
	return v
}

// do runs actions in the browser b, with a deadline.
func do(t *testing.T, b context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	get(t, b, what, chromedp.Steps(steps...))
}

// TestDashboard drives the dashboard in a real browser: it logs in with
// the one-time URL, reads known traffic off a key's chart, creates an API
// key and sees its secret once, revokes it (and the CLI sees it refused),
// runs a bulk revocation's dry run and then the revocation, shows every
// page, and shows a caller the policy denies the denial, not the data.
func TestDashboard(t *testing.T) {
	// The file plugin, for a managed credential.
	plugin := conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-file")
	sum, err := fileSHA256(plugin)
	if err != nil {
		t.Fatal(err)
	}
	secrets := t.TempDir()
	d := daemontest.Start(t, daemontest.Configure(func(c *daemon.Config) {
		c.Plugins = []daemon.PluginConfig{{Name: "file", Path: plugin, SHA256: sum, Env: map[string]string{"KEYWARD_FILE_DIRS": secrets}}}
		c.GeoIP.Database = geotest.Write(t, t.TempDir(), geotest.Networks...) // 192.0.2.0/24 in DE, 198.51.100.0/24 in FR
	}))
	api := keywardv1.NewAPIKeyServiceClient(d.Conn)
	ctx := context.Background()
	if _, err := keywardv1.NewCredentialServiceClient(d.Conn).RegisterCredential(ctx, &keywardv1.RegisterCredentialRequest{Name: "orders-db", Plugin: "file",
		Config: fmt.Sprintf(`{"path": %q}`, filepath.Join(secrets, "orders-db-password")), RotationPeriod: durationpb.New(30 * 24 * time.Hour),
		Overlap: durationpb.New(time.Hour)}); err != nil {
		t.Fatal(err)
	}

	// Known traffic on one key: 5 valid, 2 forbidden, 1 wrong environment,
	// from two networks in two countries, which the key is limited to.
	k, err := api.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "shop", Name: "checkout", Environment: "prod",
		Permissions: []string{"orders:read"}, Tags: []string{"checkout"}, Ttl: durationpb.New(90 * 24 * time.Hour), AllowedCountries: []string{"DE", "FR"}})
	if err != nil {
		t.Fatal(err)
	}
	verify := func(secret, env, perm, ip string) keywardv1.APIKeyCode {
		t.Helper()
		r, err := api.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: secret, Environment: env, Permissions: []string{perm}, SourceIp: ip})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetCode()
	}
	for i := range 5 {
		verify(k.GetSecret(), "prod", "orders:read", fmt.Sprintf("192.0.2.%d", i+1))
	}
	verify(k.GetSecret(), "prod", "orders:write", "198.51.100.7")
	verify(k.GetSecret(), "prod", "orders:write", "198.51.100.8")
	verify(k.GetSecret(), "dev", "orders:read", "198.51.100.9")
	for i := range 3 {
		if _, err := api.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "batch", Name: fmt.Sprintf("job-%d", i), Environment: "prod",
			Permissions: []string{"read-only"}, Tags: []string{"leaked"}, Ttl: durationpb.New(24 * time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}

	keys := keywardv1.NewKeyServiceClient(d.Conn)
	for name, every := range map[string]time.Duration{"orders": 30 * 24 * time.Hour, "payments": 60 * 24 * time.Hour} {
		if _, err := keys.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: name, Purpose: keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT,
			Algorithm: keywardv1.KeyAlgorithm_KEY_ALGORITHM_AES256_GCM, RotationPeriod: durationpb.New(every)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := keywardv1.NewEnvelopeServiceClient(d.Conn).Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: "orders", Plaintext: []byte("x")}); err != nil {
		t.Fatal(err)
	}

	base, login := startDashboard(t, d.Socket)
	b := browser(t)
	shot := newShots(t)
	css := func(s string) chromedp.CSS { return chromedp.CSS(s) }

	// Log in; the overview shows the HSM and the store.
	do(t, b, "log in", chromedp.Navigate(login), chromedp.WaitVisible(css(`#alerts`)), shot.take("overview"))
	// The pages are under a path of the session's own (its cookie is sent
	// there only): base is that, from here on.
	home := get(t, b, "where the login led", chromedp.Location())
	if !strings.HasPrefix(home, base+"/s/") {
		t.Fatalf("the login led to %s; want a page under %s/s/", home, base)
	}
	base = strings.TrimSuffix(home, "/")
	if hsm := get(t, b, "the HSM card", chromedp.Text(css(`.card`))); !strings.Contains(hsm, "healthy") {
		t.Errorf("overview: the HSM card says %q", hsm)
	}

	// The key's chart: the bars' numbers add up to the traffic.
	do(t, b, "a key's usage", chromedp.Navigate(base+"/apikeys/"+k.GetKey().GetId()), chromedp.WaitVisible(css(`#usage-chart`)), shot.take("apikey"))
	got := map[string]int{}
	for _, a := range get(t, b, "the bars", chromedp.AttributesAll(chromedp.CSSAll(`#usage-chart rect[data-result]`))) {
		n, _ := strconv.Atoi(a["data-count"])
		got[a["data-result"]] += n
	}
	if want := map[string]int{"VALID": 5, "FORBIDDEN": 2, "WRONG_ENVIRONMENT": 1}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("the usage chart's bars: %v; want %v", got, want)
	}
	nets := get(t, b, "networks", chromedp.AttributesAll(chromedp.CSSAll(`#networks-chart rect[data-name]`)))
	if len(nets) != 2 || nets[0]["data-name"] != "192.0.2.0/24" || nets[0]["data-count"] != "5" || nets[1]["data-count"] != "3" {
		t.Errorf("the networks chart: %v; want 192.0.2.0/24 5, 198.51.100.0/24 3", nets)
	}

	countries := get(t, b, "countries", chromedp.AttributesAll(chromedp.CSSAll(`#countries-chart rect[data-name]`)))
	if len(countries) != 2 || countries[0]["data-name"] != "DE" || countries[0]["data-count"] != "5" || countries[1]["data-name"] != "FR" || countries[1]["data-count"] != "3" {
		t.Errorf("the countries chart: %v; want DE 5, FR 3", countries)
	}
	if c := get(t, b, "the key's countries", chromedp.Text(css(`#key-countries`))); c != "DE, FR" {
		t.Errorf("the key's allowed countries: %q, want DE, FR", c)
	}

	byNet := map[string]int{}
	for _, a := range get(t, b, "networks by hour", chromedp.AttributesAll(chromedp.CSSAll(`#networks-by-hour rect[data-network]`))) {
		n, _ := strconv.Atoi(a["data-count"])
		byNet[a["data-network"]] += n
	}
	if want := map[string]int{"192.0.2.0/24": 5, "198.51.100.0/24": 3}; fmt.Sprint(byNet) != fmt.Sprint(want) {
		t.Errorf("the networks-by-hour chart: %v; want %v", byNet, want)
	}

	// Latency: every verification of the key is in the histogram, and the
	// quantiles are buckets' bounds.
	var measured int
	for _, a := range get(t, b, "latency", chromedp.AttributesAll(chromedp.CSSAll(`#latency-histogram rect[data-name]`))) {
		n, _ := strconv.Atoi(a["data-count"])
		measured += n
	}
	p50 := get(t, b, "p50", chromedp.Text(css(`#p50`)))
	if measured != 8 || !strings.HasPrefix(p50, "≤") {
		t.Errorf("latency: %d verifications in the histogram, p50 %q; want 8, ≤ a bound", measured, p50)
	}
	if dots := get(t, b, "latency by hour", chromedp.AttributesAll(chromedp.CSSAll(`#latency-chart circle[data-quantile]`))); len(dots) != 2 {
		t.Errorf("latency by hour: %v; want this hour's p50 and p99", dots)
	}

	// Create a key with a preset: its secret shows once, and works.
	do(t, b, "create", chromedp.Navigate(base+"/apikeys/new"), chromedp.WaitVisible(css(`#create`)),
		chromedp.SendKeys(css(`input[name=owner]`), "shop"), chromedp.SendKeys(css(`input[name=name]`), "made-in-browser"),
		chromedp.Click(css(`input[name=preset][value=standard]`)), shot.take("apikey-new"),
		chromedp.Submit(css(`#create`)), chromedp.WaitVisible(css(`#secret`)), shot.takeHere("apikey-secret"))
	secret := get(t, b, "the secret", chromedp.Text(css(`#secret`)))
	id := get(t, b, "the key's ID", chromedp.Text(css(`#key-id`)))
	// A reload shows it no more, and makes no second key.
	do(t, b, "reload the secret", chromedp.Reload(), chromedp.WaitVisible(css(`#gone`)))
	if page := get(t, b, "the secret page again", chromedp.OuterHTML(css(`html`))); strings.Contains(page, secret) {
		t.Errorf("the secret page shows the secret again after a reload")
	}
	if code := verify(secret, "prod", "orders:write", ""); code != keywardv1.APIKeyCode_API_KEY_CODE_VALID {
		t.Fatalf("the secret the page showed verifies %v", code)
	}
	do(t, b, "the key's page", chromedp.Navigate(base+"/apikeys/"+id), chromedp.WaitVisible(css(`#key`)))
	if page := get(t, b, "the key's page", chromedp.OuterHTML(css(`html`))); strings.Contains(page, secret) {
		t.Errorf("the key's page shows its secret again")
	}

	// Revoke it from its page; the CLI sees it refused.
	do(t, b, "revoke", chromedp.Submit(css(`#revoke`)), chromedp.WaitVisible(css(`#flash`)))
	if flash := get(t, b, "flash", chromedp.Text(css(`#flash`))); !strings.Contains(flash, "revoked") {
		t.Errorf("after revoking: %q", flash)
	}
	var out, errb strings.Builder
	if code := runCLI(d.Socket, secret, &out, &errb, "apikey", "verify", "-env", "prod", "-perm", "orders:read"); code != exitError || !strings.Contains(out.String()+errb.String(), "REVOKED") {
		t.Errorf("keyward apikey verify of the revoked key: exit %d, %q %q", code, out.String(), errb.String())
	}

	// Bulk revocation: the dry run's count, nothing revoked, then the button.
	do(t, b, "bulk dry run", chromedp.Navigate(base+"/apikeys/revoke?tag=leaked"), chromedp.WaitVisible(css(`#dry-run`)), shot.take("bulk-revoke"))
	if count := get(t, b, "count", chromedp.Text(css(`#count`))); count != "3" {
		t.Errorf("the dry run counts %q keys; want 3", count)
	}
	if n := activeKeys(t, api, "leaked"); n != 3 {
		t.Errorf("after the dry run, %d keys tagged leaked are active; want 3", n)
	}
	do(t, b, "bulk revoke", chromedp.Click(css(`#revoke-all`)), chromedp.WaitVisible(css(`#flash`)))
	if flash := get(t, b, "flash", chromedp.Text(css(`#flash`))); !strings.Contains(flash, "3 API keys revoked") || activeKeys(t, api, "leaked") != 0 {
		t.Errorf("after the bulk revocation: %q, %d still active", flash, activeKeys(t, api, "leaked"))
	}

	// The keys: encryptions counted against the limit; a rewrap job's
	// report; a rotation.
	if _, err := keywardv1.NewKeyServiceClient(d.Conn).ReportRewrap(ctx, &keywardv1.ReportRewrapRequest{KeyName: "orders",
		Report: &keywardv1.RewrapReport{Source: "dir:/var/lib/shop", Ciphertexts: map[uint32]uint64{1: 7}, Failed: 2, Complete: true}}); err != nil {
		t.Fatal(err)
	}
	do(t, b, "keys", chromedp.Navigate(base+"/keys"), chromedp.WaitVisible(css(`#key-orders`)), shot.take("keys"))
	if rw := get(t, b, "the rewrap report", chromedp.Text(css(`#key-orders table.rewrap tbody`))); !strings.Contains(rw, "dir:/var/lib/shop") ||
		!strings.Contains(rw, "complete") || !strings.Contains(rw, "v1: 7") || !strings.Contains(rw, "2") {
		t.Errorf("orders' rewrap report: %q", rw)
	}
	meter := get(t, b, "the meter", chromedp.Attributes(css(`#key-orders svg.meter`)))
	if meter["data-used"] == "0" || meter["data-used"] == "" || meter["data-limit"] != "4278190080" {
		t.Errorf("orders' encryption meter: %v; want some used of 4278190080", meter)
	}
	do(t, b, "rotate", chromedp.Submit(css(`#key-orders form[action$="/rotate"]`)), chromedp.WaitVisible(css(`#flash`)))
	if flash := get(t, b, "flash", chromedp.Text(css(`#flash`))); !strings.Contains(flash, "version 2 is the newest") {
		t.Errorf("after rotating orders: %q", flash)
	}

	// Every page renders, and refuses nothing to an operator granted everything.
	for _, p := range []struct{ path, name, wait string }{
		{"/apikeys", "apikeys", "#apikeys"}, {"/tokens", "tokens", "#jwks"},
		{"/credentials", "credentials", "#credential-orders-db"}, {"/rotation", "rotation", "#plan"}, {"/review", "review", "#audit-part"},
	} {
		do(t, b, p.name, chromedp.Navigate(base+p.path), chromedp.WaitVisible(css(p.wait)), shot.take(p.name))
		if page := get(t, b, p.name, chromedp.OuterHTML(css(`main`))); strings.Contains(page, `class="denied"`) {
			t.Errorf("%s shows a refusal to an operator granted everything: %s", p.path, page)
		}
	}

	// The rotation plan's timeline has the two keys and the credential
	// (API keys join it at the scheduler's next survey of them).
	do(t, b, "rotation", chromedp.Navigate(base+"/rotation"), chromedp.WaitVisible(css(`#plan`)))
	due := map[string]bool{}
	for _, a := range get(t, b, "the timeline", chromedp.AttributesAll(chromedp.CSSAll(`svg.timeline circle[data-id]`))) {
		due[a["data-id"]] = true
	}
	if !due["orders"] || !due["payments"] || !due["orders-db"] {
		t.Errorf("the rotation timeline shows %v; want orders, payments and orders-db", due)
	}

	// The audit log: the browser's revocation is there under the
	// operator's uid; the chain verifies.
	do(t, b, "audit", chromedp.Navigate(base+"/audit?op=APIKeyService.RevokeAPIKey"), chromedp.WaitVisible(css(`#records`)))
	rows := get(t, b, "audit rows", chromedp.AttributesAll(chromedp.CSSAll(`#records tr[data-seq]`)))
	if len(rows) != 1 || rows[0]["data-outcome"] != "ok" {
		t.Errorf("audit records of APIKeyService.RevokeAPIKey: %v; want the one the page made", rows)
	}
	if row := get(t, b, "audit row", chromedp.Text(css(`#records tr[data-seq]`))); !strings.Contains(row, id) || !strings.Contains(row, fmt.Sprintf("uid %d", os.Getuid())) {
		t.Errorf("the revocation's record: %q; want %s by uid %d", row, id, os.Getuid())
	}
	do(t, b, "verify", chromedp.Submit(css(`#chain form`)), chromedp.WaitVisible(css(`#verified`)), shot.take("audit"))
	if v := get(t, b, "verified", chromedp.Text(css(`#verified`))); !strings.Contains(v, "holds") {
		t.Errorf("the chain's verification: %q", v)
	}

	// A caller the policy does not grant ListAPIKeys sees the denial, and
	// no key.
	d.SetPolicy(fmt.Sprintf(`version: 1
roles:
  viewer:
    permissions:
      - operations: ["StatusService.*", "KeyService.ListKeys", "KeyService.GetKey", "AuditService.*"]
        keys: ["*"]
bindings:
  - role: viewer
    callers:
      - uid: %d
`, os.Getuid()))
	do(t, b, "denied", chromedp.Navigate(base+"/apikeys"), chromedp.WaitVisible(css(`#error`)), shot.take("denied"))
	if denial := get(t, b, "denial", chromedp.Text(css(`#error`))); !strings.Contains(denial, "PermissionDenied") || !strings.Contains(denial, "APIKeyService.ListAPIKeys") {
		t.Errorf("the denied operator sees %q", denial)
	}
	if page := get(t, b, "denied page", chromedp.OuterHTML(css(`html`))); strings.Contains(page, k.GetKey().GetId()) {
		t.Errorf("the denied operator's page names a key")
	}
	// The denial is in the audit log, which this operator may read.
	do(t, b, "denials", chromedp.Navigate(base+"/audit?outcome=denied&since=1h"), chromedp.WaitVisible(css(`#records`)))
	rows = get(t, b, "denials", chromedp.AttributesAll(chromedp.CSSAll(`#records tr[data-seq]`)))
	if len(rows) == 0 || rows[0]["data-op"] != "APIKeyService.ListAPIKeys" || rows[0]["data-outcome"] != "denied" {
		t.Errorf("the newest denial on record: %v; want APIKeyService.ListAPIKeys", rows)
	}
}

func fileSHA256(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// runCLI runs keyward in this process against socket, stdin its input.
func runCLI(socket, stdin string, stdout, stderr io.Writer, args ...string) int {
	return run(context.Background(), append([]string{"--socket", socket}, args...), strings.NewReader(stdin), stdout, stderr)
}

func activeKeys(t *testing.T, api keywardv1.APIKeyServiceClient, tag string) int {
	t.Helper()
	r, err := api.ListAPIKeys(context.Background(), &keywardv1.ListAPIKeysRequest{Tag: tag, State: keywardv1.APIKeyState_API_KEY_STATE_ACTIVE})
	if err != nil {
		t.Fatal(err)
	}
	return len(r.GetKeys())
}

// TestOpenBrowser: keyward dashboard hands the login URL to the desktop's
// browser through a file only the user may read, never in the opener's
// arguments, and the file goes at the end.
func TestOpenBrowser(t *testing.T) {
	dir := t.TempDir()
	opener := filepath.Join(dir, "opener")
	// The stand-in records its arguments, and the file's mode and content.
	script := "#!/bin/sh\nprintf '%s\\n' \"$@\" > " + dir + "/argv\nstat -c %a \"$1\" > " + dir + "/mode\nstat -c %a \"$(dirname \"$1\")\" >> " + dir + "/mode\ncat \"$1\" > " + dir + "/page\n"
	if err := os.WriteFile(opener, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	old := browserOpener
	browserOpener = opener
	defer func() { browserOpener = old }()
	login := "http://127.0.0.1:1/login?token=SECRETTOKENSECRETTOKEN"
	cleanup, err := openBrowser(login)
	if err != nil {
		t.Fatal(err)
	}
	for range 100 { // the opener runs in the background: its last file is the page
		if b, err := os.ReadFile(filepath.Join(dir, "page")); err == nil && len(b) > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	argv, _ := os.ReadFile(filepath.Join(dir, "argv"))
	mode, _ := os.ReadFile(filepath.Join(dir, "mode"))
	page, _ := os.ReadFile(filepath.Join(dir, "page"))
	if strings.Contains(string(argv), "SECRETTOKEN") || !strings.HasSuffix(strings.TrimSpace(string(argv)), "login.html") {
		t.Errorf("the opener's arguments: %q; want the file's path alone", argv)
	}
	if string(mode) != "600\n700\n" {
		t.Errorf("the file's and its directory's modes: %q; want 600 and 700", mode)
	}
	if !strings.Contains(string(page), `http-equiv="refresh" content="0;url=`+login) {
		t.Errorf("the file does not lead to the login URL: %s", page)
	}
	path := strings.TrimSpace(string(argv))
	cleanup()
	if _, err := os.Stat(filepath.Dir(path)); !os.IsNotExist(err) {
		t.Errorf("the file's directory is left after cleanup: %v", err)
	}
}
