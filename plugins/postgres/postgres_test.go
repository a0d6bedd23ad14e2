package postgres_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/keyward/keyward/plugins/conformance"
	"github.com/keyward/keyward/plugins/postgres/pgtest"
)

// Env is the plugin's environment for a server.
func Env(t *testing.T, s *pgtest.Server) map[string]string {
	pw := filepath.Join(t.TempDir(), "admin-password")
	os.WriteFile(pw, []byte(s.AdminPassword+"\n"), 0o600)
	return map[string]string{"KEYWARD_POSTGRES_DSN": "host=127.0.0.1 port=" + strconv.Itoa(s.Port) + " user=" + s.AdminUser + " dbname=postgres sslmode=disable",
		"KEYWARD_POSTGRES_PASSWORD_FILE": pw, "KEYWARD_POSTGRES_ROLES": "orders"}
}

// TestConformance: the PostgreSQL plugin, the real binary, against a real
// PostgreSQL server: after each rotation the new login works with the new
// password, and after Retire the old login is refused.
func TestConformance(t *testing.T) {
	s := pgtest.Start(t)
	conformance.Run(t, conformance.Config{
		Binary:    conformance.Build(t, "github.com/keyward/keyward/cmd/keyward-plugin-postgres"),
		Name:      "postgres",
		Env:       Env(t, s),
		Config:    []byte(`{"role": "orders"}`),
		BadConfig: []byte(`{"role": "postgres"}`), // not an allowed role
		Current: func(t *testing.T, handle string, secret []byte) {
			if err := s.Login(handle, secret); err != nil {
				t.Fatalf("the new login %s does not work: %v", handle, err)
			}
		},
		Retired: func(t *testing.T, handle string, secret []byte) {
			if err := s.Login(handle, secret); err == nil {
				t.Fatalf("the retired login %s still works", handle)
			}
		},
	})
	// The password is not in the server's catalog in the clear: only a
	// SCRAM verifier.
	c := s.Connect(t)
	var v string
	if err := c.QueryRow(context.Background(), "SELECT rolpassword FROM pg_authid WHERE rolname IN ('orders_a', 'orders_b') AND rolpassword IS NOT NULL").Scan(&v); err != nil {
		t.Fatal(err)
	}
	if len(v) < 14 || v[:14] != "SCRAM-SHA-256$" {
		t.Errorf("the stored password is %.14s..., not a SCRAM verifier", v)
	}
}
