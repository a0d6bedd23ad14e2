package daemon_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/keyward/keyward/daemon"
	"github.com/keyward/keyward/daemon/anomaly"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/geo/geotest"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// startGeo starts keywardd with a GeoIP database of geotest.Networks
// (DE, FR, JP) and more configuration; it returns the database's path.
func startGeo(t *testing.T, more func(*daemon.Config)) (*daemontest.Daemon, string) {
	t.Helper()
	path := geotest.Write(t, t.TempDir(), geotest.Networks...)
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)), daemontest.Configure(func(c *daemon.Config) {
		c.GeoIP.Database = path
		if more != nil {
			more(c)
		}
	}))
	return in, path
}

func from(ip string) *keywardv1.VerifyAPIKeyRequest {
	return &keywardv1.VerifyAPIKeyRequest{Environment: "prod", Permissions: []string{"orders:read"}, SourceIp: ip}
}

// TestGeoIPCountries: through keywardd's socket, a key limited to
// countries is valid from them only and IP_NOT_ALLOWED (naming the
// country) from elsewhere, from an address the database does not place
// and from none; an update changes its countries; GetAPIKeyUsage counts
// the countries; a SIGHUP reloads the database, and a bad file keeps the
// one in use.
func TestGeoIPCountries(t *testing.T) {
	in, path := startGeo(t, nil)
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	resp, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "eu", Environment: "prod",
		Permissions: []string{"orders:read"}, AllowedCountries: []string{"DE"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Key.AllowedCountries; len(got) != 1 || got[0] != "DE" {
		t.Fatalf("created with allowed_countries %v", got)
	}
	key := resp.Secret
	for _, c := range []struct {
		ip     string
		want   keywardv1.APIKeyCode
		reason string
	}{
		{"192.0.2.1", keywardv1.APIKeyCode_API_KEY_CODE_VALID, ""},
		{"2001:db8:1::9", keywardv1.APIKeyCode_API_KEY_CODE_VALID, ""},
		{"198.51.100.1", keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED, "in FR"},
		{"203.0.113.200", keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED, "country is unknown"},
		{"", keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED, "country is unknown"},
	} {
		if r := verifyCode(t, ac, key, from(c.ip), c.want); !strings.Contains(r.Reason, c.reason) {
			t.Errorf("from %q: reason %q, want it to say %q", c.ip, r.Reason, c.reason)
		}
	}
	u, err := ac.GetAPIKeyUsage(ctx, &keywardv1.GetAPIKeyUsageRequest{Id: resp.Key.Id, Window: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if c := u.Total.Countries; len(c) != 3 || c["DE"] != 2 || c["FR"] != 1 || c["unknown"] != 2 {
		t.Errorf("usage by country %v, want DE 2, FR 1, unknown 2", c)
	}
	if len(u.Hours) != 1 || u.Hours[0].Usage.Countries["DE"] != 2 {
		t.Errorf("the hour's countries: %v", u.Hours)
	}

	_, err = ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "bad", Environment: "prod",
		Permissions: []string{"orders:read"}, AllowedCountries: []string{"de"}})
	wantCode(t, err, codes.InvalidArgument, "ISO 3166-1 alpha-2")
	up, err := ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: resp.Key.Id, AllowedCountries: []string{"FR"}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"allowed_countries"}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := up.Key.AllowedCountries; len(got) != 1 || got[0] != "FR" {
		t.Fatalf("updated to allowed_countries %v", got)
	}
	verifyCode(t, ac, key, from("198.51.100.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	verifyCode(t, ac, key, from("192.0.2.1"), keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED)

	// 192.0.2.0/24 moves to France; SIGHUP reads the file again.
	if err := os.WriteFile(path, geotest.Build(t, geotest.Network{Prefix: "192.0.2.0/24", Country: "FR"}), 0o644); err != nil {
		t.Fatal(err)
	}
	reload(t, in, "GeoIP database reloaded")
	verifyCode(t, ac, key, from("192.0.2.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	verifyCode(t, ac, key, from("198.51.100.1"), keywardv1.APIKeyCode_API_KEY_CODE_IP_NOT_ALLOWED) // not in the new file
	if err := os.WriteFile(path, []byte("not a database"), 0o644); err != nil {
		t.Fatal(err)
	}
	reload(t, in, "GeoIP database reload failed; the database before stays in use")
	verifyCode(t, ac, key, from("192.0.2.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
}

// reload has keywardd reload (SIGHUP) and waits until its log says want
// once more than before.
func reload(t *testing.T, in *daemontest.Daemon, want string) {
	t.Helper()
	n := strings.Count(in.Log.String(), want)
	in.Reload()
	for range 500 {
		if strings.Count(in.Log.String(), want) > n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("keywardd's log does not say %q after a reload:\n%s", want, in.Log)
}

// TestGeoIPNone: without a GeoIP database, a key cannot be limited to
// countries (INVALID_ARGUMENT naming geoip.database), usage counts no
// country, and a database that cannot be read stops keywardd at start.
func TestGeoIPNone(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	_, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "eu", Environment: "prod",
		Permissions: []string{"orders:read"}, AllowedCountries: []string{"DE"}})
	wantCode(t, err, codes.InvalidArgument, "geoip.database")
	resp, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "any", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ac.UpdateAPIKey(ctx, &keywardv1.UpdateAPIKeyRequest{Key: &keywardv1.APIKey{Id: resp.Key.Id, AllowedCountries: []string{"DE"}},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"allowed_countries"}}})
	wantCode(t, err, codes.InvalidArgument, "geoip.database")
	verifyCode(t, ac, resp.Secret, from("192.0.2.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	u, err := ac.GetAPIKeyUsage(ctx, &keywardv1.GetAPIKeyUsageRequest{Id: resp.Key.Id})
	if err != nil {
		t.Fatal(err)
	}
	if u.Total.Counts["VALID"] != 1 || len(u.Total.Countries) != 0 {
		t.Errorf("usage %v, want one VALID and no countries", u.Total)
	}

	in.Stop()
	in.Config.GeoIP.Database = filepath.Join(t.TempDir(), "missing.mmdb")
	if err := in.RunOnce(); err == nil || !strings.Contains(err.Error(), "geoip.database") {
		t.Errorf("start with a missing database: %v, want an error naming geoip.database", err)
	}
}

// TestAnomalyNewCountry: with anomaly.new_countries and new_country under
// anomaly.disable, past its learning time a key's first use from a
// country it was not used from is refused (DISABLED), keywardd disables
// it, and the audit record names the country.
func TestAnomalyNewCountry(t *testing.T) {
	clk := &testClock{t: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	in, _ := startGeo(t, func(c *daemon.Config) {
		c.Anomaly = anomaly.Config{Enabled: true, Learn: time.Hour, MinRate: 1e6, NewCountries: true,
			Disable: []string{anomaly.NewCountry}, FlushEvery: 50 * time.Millisecond}
	})
	in.Now = clk.now
	in.Stop()
	in.Restart()
	ctx := context.Background()
	ac := keywardv1.NewAPIKeyServiceClient(in.Conn)
	k, err := ac.CreateAPIKey(ctx, &keywardv1.CreateAPIKeyRequest{Owner: "team-a", Name: "de", Environment: "prod", Permissions: []string{"orders:read"}})
	if err != nil {
		t.Fatal(err)
	}
	verifyCode(t, ac, k.Secret, from("192.0.2.1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID)
	clk.add(2 * time.Hour)
	verifyCode(t, ac, k.Secret, from("2001:db8:1::1"), keywardv1.APIKeyCode_API_KEY_CODE_VALID) // DE again, another network
	verifyCode(t, ac, k.Secret, from("203.0.113.200"), keywardv1.APIKeyCode_API_KEY_CODE_VALID) // unknown: no alert
	r := verifyCode(t, ac, k.Secret, from("198.51.100.1"), keywardv1.APIKeyCode_API_KEY_CODE_DISABLED)
	if !strings.Contains(r.Reason, "anomaly: new_country") || strings.Contains(r.Reason, "FR") {
		t.Errorf("reason %q: want the kind, not the country (the caller may be the attacker)", r.Reason)
	}
	var rec string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && rec == ""; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join(in.Config.DataDir, "audit.log"))
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, `"keywardd.APIKeyAnomaly"`) && strings.Contains(line, k.Key.Id) {
				rec = line
			}
		}
	}
	if !strings.Contains(rec, "new_country") || !strings.Contains(rec, "a use from FR, a country the key was not used from before") || !strings.Contains(rec, "keywardd disabled the key") {
		t.Errorf("the new country's audit record: %s", rec)
	}
	got, err := ac.GetAPIKey(ctx, &keywardv1.GetAPIKeyRequest{Id: k.Key.Id})
	if err != nil {
		t.Fatal(err)
	}
	if got.Key.State != keywardv1.APIKeyState_API_KEY_STATE_DISABLED {
		t.Errorf("the key is %v, want disabled", got.Key.State)
	}
}
