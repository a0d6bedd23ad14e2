package leaks

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyward/keyward/daemon/apikeys"
)

// serveDirect hands the intake one request from addr, as the HTTP server
// would, and gives its answer.
func (f *fixture) serveDirect(t testing.TB, addr, keyID, sig string, body []byte) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, Path, bytes.NewReader(body))
	req.RemoteAddr = addr
	req.Header.Set("Github-Public-Key-Identifier", keyID)
	if sig == "" {
		sig = f.scan.sign(t, body)
	}
	req.Header.Set("Github-Public-Key-Signature", sig)
	w := httptest.NewRecorder()
	f.in.ServeHTTP(w, req)
	return w
}

// TestIntakeVerifiedNeverLimited: however much garbage came before, from
// however many addresses or from the scanner's own (a proxy's), a report
// whose signature verifies is handled. The limits only turn the garbage's
// answers into 429 and keep it out of the log.
func TestIntakeVerifiedNeverLimited(t *testing.T) {
	for _, tc := range []struct {
		name    string
		garbage func(i int) string // the address of the i-th bad request
		n       int
		from    string // the scanner's address
		over    string // the 429's reason
		logged  int    // refusals logged
	}{
		{"spread over many addresses", func(i int) string { return fmt.Sprintf("203.0.113.%d:1234", i%250) }, 5 * allBurst, "140.82.112.1:443", "from all addresses", allBurst},
		{"from the proxy the scanner comes through", func(int) string { return "127.0.0.1:40000" }, 5 * perSourceBurst, "127.0.0.1:40001", "from this address", perSourceBurst},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, apikeys.LeakRevoke)
			secret, _ := f.create(t, "shop")
			codes := map[int]int{}
			var last string
			for i := range tc.n {
				sig := "AAAA" // parses, does not verify
				if i%2 == 1 {
					sig = f.scan.sign(t, []byte("another body"))
				}
				w := f.serveDirect(t, tc.garbage(i), "kid-1", sig, payload(secret))
				codes[w.Code]++
				if w.Code == http.StatusTooManyRequests {
					last = w.Body.String()
					if w.Header().Get("Retry-After") == "" {
						t.Fatal("429 without Retry-After")
					}
				}
			}
			if codes[http.StatusUnauthorized] != tc.logged || codes[http.StatusTooManyRequests] != tc.n-tc.logged {
				t.Fatalf("the garbage's answers = %v, want %d 401 then 429", codes, tc.logged)
			}
			if !strings.Contains(last, "does not verify") || !strings.Contains(last, tc.over) {
				t.Fatalf("429 says %q, want the reason and %q", last, tc.over)
			}
			if n := strings.Count(f.logs.String(), "was refused"); n != tc.logged {
				t.Fatalf("%d refusals logged, want %d: past the limits none is", n, tc.logged)
			}

			w := f.serveDirect(t, tc.from, "kid-1", "", payload(secret))
			if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), TruePositive) {
				t.Fatalf("the scanner's signed report after the garbage = %d %s, want 200", w.Code, w.Body)
			}
			if c := f.verify(t, secret); c != apikeys.Revoked {
				t.Fatalf("the reported key verifies %s, want REVOKED", c)
			}
			// Once the buckets refill, refusals are logged again, with a
			// count of those that were not.
			f.clk.add(time.Minute)
			if w := f.serveDirect(t, tc.garbage(0), "kid-1", "AAAA", payload(secret)); w.Code != http.StatusUnauthorized {
				t.Fatalf("garbage after a quiet minute = %d, want 401", w.Code)
			}
			if want := fmt.Sprintf("refused_unlogged_before=%d", tc.n-tc.logged); !strings.Contains(f.logs.String(), want) {
				t.Fatalf("the log does not say %s:\n%s", want, f.logs.String())
			}
		})
	}
}

// slowPost opens a connection to addr and sends a request's headers and
// part of its body, the rest never coming.
func slowPost(t *testing.T, addr string, header map[string]string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var b strings.Builder
	fmt.Fprintf(&b, "POST %s HTTP/1.1\r\nHost: intake\r\nContent-Length: 4000\r\n", Path)
	for k, v := range header {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	b.WriteString("\r\n[{\"token\":\"")
	if _, err := c.Write([]byte(b.String())); err != nil {
		t.Fatal(err)
	}
	return c
}

// answer reads the response on c. The deadline only turns a hang (the
// handler waiting for a body that never comes) into a failure.
func answer(t *testing.T, c net.Conn) (*http.Response, string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer before the body was sent: %v", err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp, b.String()
}

// waitSlots waits until n of the intake's slots are taken; the deadline
// only turns "never" into a failure.
func waitSlots(t *testing.T, in *Intake, n int) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); len(in.slots) != n; {
		if time.Now().After(end) {
			t.Fatalf("%d requests in flight, want %d", len(in.slots), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestIntakeRefusesBeforeBody: what the headers alone condemn is answered
// without waiting for the body, and takes no slot.
func TestIntakeRefusesBeforeBody(t *testing.T) {
	f := newFixture(t, apikeys.LeakRevoke)
	addr := strings.TrimPrefix(f.srv.URL, "http://")
	sig := f.scan.sign(t, []byte("x"))
	for _, tc := range []struct {
		name   string
		header map[string]string
		code   int
		msg    string
	}{
		{"unknown key identifier", map[string]string{"Github-Public-Key-Identifier": "kid-9", "Github-Public-Key-Signature": sig}, http.StatusUnauthorized, "does not know"},
		{"no signature header", map[string]string{"Github-Public-Key-Identifier": "kid-1"}, http.StatusUnauthorized, "not signed"},
		{"no identifier header", map[string]string{"Github-Public-Key-Signature": sig}, http.StatusUnauthorized, "not signed"},
		{"signature not base64", map[string]string{"Github-Public-Key-Identifier": "kid-1", "Github-Public-Key-Signature": "!!!"}, http.StatusUnauthorized, "not base64"},
		{"identifier too long", map[string]string{"Github-Public-Key-Identifier": strings.Repeat("k", maxKeyID+1), "Github-Public-Key-Signature": sig}, http.StatusUnauthorized, "does not know"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := answer(t, slowPost(t, addr, tc.header))
			if resp.StatusCode != tc.code || !strings.Contains(body, tc.msg) {
				t.Fatalf("= %d %q, want %d saying %q", resp.StatusCode, body, tc.code, tc.msg)
			}
			if n := len(f.in.slots); n != 0 {
				t.Fatalf("a request refused by its headers holds a slot (%d)", n)
			}
		})
	}
}

// TestIntakeInFlight: requests reading their body hold a slot each; with
// every slot taken one more is answered 503 at once, unread, and a
// signed report goes through again once a slot is free.
func TestIntakeInFlight(t *testing.T) {
	f := newFixture(t, apikeys.LeakRevoke)
	o := f.opts
	o.MaxInFlight = 3
	f.serve(t, o)
	addr := strings.TrimPrefix(f.srv.URL, "http://")
	secret, _ := f.create(t, "shop")
	header := map[string]string{"Github-Public-Key-Identifier": "kid-1", "Github-Public-Key-Signature": f.scan.sign(t, []byte("x"))}

	var slow []net.Conn
	for range o.MaxInFlight {
		slow = append(slow, slowPost(t, addr, header))
	}
	waitSlots(t, f.in, o.MaxInFlight)
	// Many more, at once: each is answered 503 while the slots are taken.
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			resp, body := answer(t, slowPost(t, addr, header))
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, "leaks.max_in_flight") {
				t.Errorf("a request past max_in_flight = %d %q (Retry-After %q), want 503", resp.StatusCode, body, resp.Header.Get("Retry-After"))
			}
		})
	}
	wg.Wait()
	if n := len(f.in.slots); n != o.MaxInFlight {
		t.Fatalf("%d in flight, want %d", n, o.MaxInFlight)
	}
	if code, b := f.post(t, http.MethodPost, "kid-1", "", payload(secret)); code != http.StatusServiceUnavailable {
		t.Fatalf("a signed report with every slot taken = %d %s, want 503", code, b)
	}
	// One slow sender gives up: its slot is free, the report goes through.
	slow[0].Close()
	waitSlots(t, f.in, o.MaxInFlight-1)
	if code, b := f.post(t, http.MethodPost, "kid-1", "", payload(secret)); code != http.StatusOK {
		t.Fatalf("a signed report with a slot free = %d %s, want 200", code, b)
	}
	if c := f.verify(t, secret); c != apikeys.Revoked {
		t.Fatalf("the reported key verifies %s, want REVOKED", c)
	}
	for _, c := range slow[1:] {
		c.Close()
	}
	waitSlots(t, f.in, 0)
}

// TestIntakeNoReplayMemory: with a replay window of 0 a report sent again
// is handled again (and audited again), not answered from memory.
func TestIntakeNoReplayMemory(t *testing.T) {
	f := newFixture(t, apikeys.LeakRevoke)
	o := f.opts
	o.ReplayWindow = 0
	f.serve(t, o)
	secret, _ := f.create(t, "shop")
	body := payload(secret)
	for i := range 2 {
		if code, b := f.post(t, http.MethodPost, "kid-1", "", body); code != http.StatusOK {
			t.Fatalf("report %d = %d %s", i, code, b)
		}
	}
	if r := f.audited(t, "keywardd.LeakReport"); len(r) != 2 {
		t.Fatalf("%d reports audited, want 2: the second was answered from memory", len(r))
	}
}

// TestConfigReplayWindow: replay_window absent is 10m, 0 is no memory,
// and Check, WithDefaults and the YAML agree.
func TestConfigReplayWindow(t *testing.T) {
	for _, tc := range []struct {
		yaml string
		want time.Duration
		err  string
	}{
		{"action: revoke", DefaultReplayWindow, ""},
		{"replay_window: 0s", 0, ""},
		{"replay_window: 90s", 90 * time.Second, ""},
		{"replay_window: -1s", 0, "from 0 (no replay memory) to 24h"},
		{"replay_window: 25h", 0, "from 0 (no replay memory) to 24h"},
	} {
		var c Config
		if err := yaml.Unmarshal([]byte(tc.yaml), &c); err != nil {
			t.Fatalf("%s: %v", tc.yaml, err)
		}
		err := c.Check()
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: Check = %v, want %q", tc.yaml, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: Check = %v", tc.yaml, err)
		}
		if got := *c.WithDefaults().ReplayWindow; got != tc.want {
			t.Errorf("%s: the replay window is %v, want %v", tc.yaml, got, tc.want)
		}
	}
}

// keysServer serves a keys document at url, set by setDoc; nil (at
// first) answers 502, as a server that is down.
func keysServer(t *testing.T) (url string, setDoc func([]byte)) {
	t.Helper()
	var mu sync.Mutex
	var doc []byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if doc == nil {
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		w.Write(doc)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func(b []byte) { mu.Lock(); doc = b; mu.Unlock() }
}

// TestKeysFileAndURL: the file's keys and the URL's are kept apart. A URL
// that is down neither stops the start nor throws away a file just read
// again; a bad file is an error that names the file, at start; an
// identifier in both is the file's.
func TestKeysFileAndURL(t *testing.T) {
	url, setURL := keysServer(t)
	ctx := context.Background()
	file := filepath.Join(t.TempDir(), "keys.json")
	write := func(b []byte) {
		if err := os.WriteFile(file, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a, b, c := newScanner(t, "a"), newScanner(t, "b"), newScanner(t, "c")
	otherB := newScanner(t, "b") // the URL's key named b
	write(document(t, a))

	// At start: the file good, the URL down.
	keys, err := NewKeys(ctx, file, url, nil)
	if err != nil {
		t.Fatalf("NewKeys with a good file and the URL down = %v", err)
	}
	check := func(step string, want map[*scanner]bool) {
		t.Helper()
		body := []byte(`[{"token":"x"}]`)
		for s, ok := range want {
			sig, _ := ParseSignature(s.sign(t, body))
			if err := keys.Verify(s.id, body, sig); (err == nil) != ok {
				t.Errorf("%s: Verify by %s's key = %v, want ok=%v", step, s.id, err, ok)
			}
		}
	}
	check("start", map[*scanner]bool{a: true, b: false})

	// The file read again, the URL still down: the file's new keys count.
	write(document(t, a, b))
	err = keys.Refresh(ctx)
	if err == nil || !strings.Contains(err.Error(), "leaks.public_keys_url "+url) || strings.Contains(err.Error(), "public_keys_file") {
		t.Fatalf("Refresh with the URL down = %v, want an error naming the URL alone", err)
	}
	check("file re-read, URL down", map[*scanner]bool{a: true, b: true})

	// The URL back, with c and another key named b: the file's b wins.
	setURL(document(t, c, otherB))
	if err := keys.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	check("URL up", map[*scanner]bool{a: true, b: true, c: true, otherB: false})
	if n := keys.Len(); n != 3 {
		t.Fatalf("Len = %d, want 3 (a, b, c)", n)
	}

	// The URL down again: its keys stay. The file broken: its keys stay,
	// and the error names the file.
	setURL(nil)
	write([]byte("nope"))
	err = keys.Refresh(ctx)
	if err == nil || !strings.Contains(err.Error(), "leaks.public_keys_file "+file) || !strings.Contains(err.Error(), "leaks.public_keys_url") {
		t.Fatalf("Refresh with both failing = %v, want both named", err)
	}
	check("both failing", map[*scanner]bool{a: true, b: true, c: true})

	// At start a bad file is an error that names the file, not the URL,
	// even with the URL up.
	setURL(document(t, c))
	_, err = NewKeys(ctx, file, url, nil)
	if err == nil || !strings.Contains(err.Error(), "leaks.public_keys_file "+file) || strings.Contains(err.Error(), "public_keys_url") {
		t.Fatalf("NewKeys with a bad file = %v, want an error naming the file", err)
	}
}
