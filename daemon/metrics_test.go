package daemon_test

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestMetrics: keywardd's Prometheus endpoint, scraped and parsed: calls
// by operation and code, their latency, API key verification results and
// the age of each key's newest version.
func TestMetrics(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	in := daemontest.Start(t, daemontest.Policy(uidPolicy("      - operations: [StatusService.Ping, APIKeyService.CreateAPIKey, APIKeyService.VerifyAPIKey, APIKeyService.ReportLeak, APIKeyService.ScheduleLimits]\n        keys: [\"*\"]")), daemontest.Configure(
		func(c *daemon.Config) {
			c.Metrics.Address = addr
			c.Metrics.Socket = filepath.Join(filepath.Dir(c.Socket.Path), "metrics", "metrics.sock")
			c.Plugins = []daemon.PluginConfig{filePlugin(t, t.TempDir())}
		}))
	ctx := context.Background()
	sc := keywardv1.NewStatusServiceClient(in.Conn)
	for range 3 {
		if _, err := sc.Ping(ctx, &keywardv1.PingRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sc.GetStatus(ctx, &keywardv1.GetStatusRequest{}); err == nil {
		t.Fatal("GetStatus was not denied")
	}
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "o", Name: "n", Environment: "prod", Permissions: []string{"read-only"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, env := range []string{"prod", "prod", "dev"} {
		if _, err := ac.VerifyAPIKey(ctx, &keywardv1.VerifyAPIKeyRequest{Key: k.Secret, Environment: env}); err != nil {
			t.Fatal(err)
		}
	}

	// A leak reported twice (stopped, then already stopped) and a string
	// that is no key's; a limit window active now.
	for _, secret := range []string{k.Secret, k.Secret, "kw_not_a_key_of_anyone"} {
		if _, err := ac.ReportLeak(ctx, &keywardv1.ReportLeakRequest{Secret: secret, Source: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ac.ScheduleLimits(ctx, &keywardv1.ScheduleLimitsRequest{Owner: "o", Factor: 2, EndTime: timestamppb.New(time.Now().Add(time.Hour)), Reason: "test"}); err != nil {
		t.Fatal(err)
	}

	families := scrape(t, http.DefaultClient, "http://"+addr+"/metrics")
	value := func(family string, labels map[string]string) float64 {
		t.Helper()
		return metricValue(t, families, family, labels)
	}
	for _, c := range []struct {
		family string
		labels map[string]string
		want   float64
	}{
		{"keyward_calls_total", map[string]string{"op": "StatusService.Ping", "code": "OK"}, 3},
		{"keyward_calls_total", map[string]string{"op": "StatusService.GetStatus", "code": "PermissionDenied"}, 1},
		{"keyward_calls_total", map[string]string{"op": "APIKeyService.VerifyAPIKey", "code": "OK"}, 3},
		{"keyward_call_duration_seconds", map[string]string{"op": "StatusService.Ping"}, 3},
		{"keyward_apikey_verifications_total", map[string]string{"result": "VALID"}, 2},
		{"keyward_apikey_verifications_total", map[string]string{"result": "WRONG_ENVIRONMENT"}, 1},
		{"keyward_hsm_errors_total", map[string]string{"op": "hmac"}, 0},
		{"keyward_rotations_overdue", map[string]string{"kind": "key"}, 0},
		{"keyward_apikey_leak_reports_total", map[string]string{"via": "api", "result": "stopped"}, 1},
		{"keyward_apikey_leak_reports_total", map[string]string{"via": "api", "result": "already_stopped"}, 1},
		{"keyward_apikey_leak_reports_total", map[string]string{"via": "api", "result": "false_positive"}, 1},
		{"keyward_apikey_leak_reports_total", map[string]string{"via": "scanner", "result": "stopped"}, 0},
		{"keyward_apikey_anomalies_total", map[string]string{"kind": "new_country", "disabled": "false"}, 0},
		{"keyward_limit_windows", map[string]string{"state": "active"}, 1},
		{"keyward_limit_windows", map[string]string{"state": "pending"}, 0},
		{"keyward_geoip_build_timestamp_seconds", nil, 0},
	} {
		if got := value(c.family, c.labels); got != c.want {
			t.Errorf("%s %v = %v, want %v", c.family, c.labels, got, c.want)
		}
	}
	// CreateAPIKey MACs the secret in the HSM, and so does the first verify.
	if n := value("keyward_hsm_operation_duration_seconds", map[string]string{"op": "hmac"}); n < 2 {
		t.Errorf("%v HSM hmac operations measured, want at least 2", n)
	}
	if age := value("keyward_key_version_age_seconds", map[string]string{"key": "keyward-audit"}); age < 0 || age > 600 {
		t.Errorf("the audit key's version is %v s old", age)
	}
	if up := value("keyward_plugin_up", map[string]string{"plugin": "file"}); up != 1 {
		t.Errorf("keyward_plugin_up{plugin=file} = %v", up)
	}
	// The same metrics on the Unix socket, which only keywardd's user may
	// reach (no metrics.group).
	sock := filepath.Join(filepath.Dir(in.Config.Socket.Path), "metrics", "metrics.sock")
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the metrics socket: %v, %v", fi, err)
	}
	if fams := scrapeSocket(t, sock); fams["keyward_calls_total"] == nil {
		t.Fatal("no keyward_calls_total over the Unix socket")
	}
	// The Grafana dashboard in docs/ asks only for metrics that exist.
	dash, err := os.ReadFile("../docs/grafana-keyward.json")
	if err != nil {
		t.Fatal(err)
	}
	names := regexp.MustCompile(`keyward_[a-z_]+`).FindAllString(string(dash), -1)
	if len(names) < 5 {
		t.Fatalf("the dashboard names %d metrics", len(names))
	}
	for _, n := range names {
		if families[strings.TrimSuffix(n, "_bucket")] == nil {
			t.Errorf("the dashboard asks for %s, which keywardd does not serve", n)
		}
	}
}

// metricValue is the value of the first of family's series whose labels
// include labels: a counter's or a gauge's, or a histogram's count.
func metricValue(t *testing.T, families map[string]*dto.MetricFamily, family string, labels map[string]string) float64 {
	t.Helper()
	f := families[family]
	if f == nil {
		t.Fatalf("no %s", family)
	}
	for _, m := range f.Metric {
		match := true
		for _, lp := range m.Label {
			if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
				match = false
			}
		}
		if match {
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
	}
	t.Fatalf("no %s %v", family, labels)
	return 0
}

// scrapeSocket reads the metrics keywardd serves on the Unix socket sock.
func scrapeSocket(t *testing.T, sock string) map[string]*dto.MetricFamily {
	t.Helper()
	uc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	return scrape(t, uc, "http://keywardd/metrics")
}

// scrape reads and parses the metrics at url.
func scrape(t *testing.T, c *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}
