// Package postgres is the PostgreSQL plugin's logic: it rotates the
// password of an application's database login with an overlap, using two
// login roles that take turns (ROLE_a and ROLE_b, both members of the group
// role ROLE that holds the application's privileges). A rotation sets a new
// password on the login role not in use (Create), logs in with it (Test);
// the application then gets the new login (the credential's handle is the
// role name, the secret its password); after the overlap the other login
// role is disabled (Retire: NOLOGIN, no password). The database always has
// a working login.
//
// Passwords reach PostgreSQL only as SCRAM-SHA-256 verifiers computed here,
// never in the clear, so a server that logs statements does not log them.
//
// Configuration of a credential: {"role": "orders", "database": "orders"}
// (role: the group role; its login roles are made if missing; database: the
// one Test logs in to, default postgres). The plugin's environment:
// KEYWARD_POSTGRES_DSN, how to reach the server as a role allowed to
// CREATEROLE (without a password: "host=db port=5432 user=keyward
// dbname=postgres sslmode=verify-full"), and KEYWARD_POSTGRES_PASSWORD_FILE,
// that role's password (mode 0600).
package postgres

import (
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/keyward/keyward/plugins/sdk"
)

// Config is a credential's configuration.
type Config struct {
	Role     string `json:"role"`
	Database string `json:"database"`
}

var nameForm = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,40}$`)

func (r *Rotator) parse(c sdk.Credential) (Config, error) {
	var cfg Config
	if err := json.Unmarshal(c.Config, &cfg); err != nil {
		return cfg, fmt.Errorf("credential %s: the configuration is not {\"role\": ..., \"database\": ...}: %v: %w", c.Name, err, sdk.ErrPermanent)
	}
	if cfg.Database == "" {
		cfg.Database = "postgres"
	}
	if !nameForm.MatchString(cfg.Role) || !nameForm.MatchString(cfg.Database) {
		return cfg, fmt.Errorf("credential %s: role and database are 1 to 41 of a-z 0-9 _, not a digit first: %w", c.Name, sdk.ErrPermanent)
	}
	if !slices.Contains(r.Roles, cfg.Role) {
		return cfg, fmt.Errorf("credential %s: role %q is not one this plugin may rotate (KEYWARD_POSTGRES_ROLES): %w", c.Name, cfg.Role, sdk.ErrPermanent)
	}
	return cfg, nil
}

// Rotator is the PostgreSQL plugin's rotator.
type Rotator struct {
	DSN          string // the administrator's connection, without password
	PasswordFile string
	// Roles are the group roles credentials may name
	// (KEYWARD_POSTGRES_ROLES, comma-separated): whoever may register a
	// credential chooses its role, and the administrator's other roles
	// must be out of reach.
	Roles []string
}

// FromEnv reads the plugin's environment.
func FromEnv() (*Rotator, error) {
	r := &Rotator{DSN: os.Getenv("KEYWARD_POSTGRES_DSN"), PasswordFile: os.Getenv("KEYWARD_POSTGRES_PASSWORD_FILE")}
	if r.DSN == "" || r.PasswordFile == "" {
		return nil, errors.New("set KEYWARD_POSTGRES_DSN and KEYWARD_POSTGRES_PASSWORD_FILE")
	}
	for _, role := range strings.Split(os.Getenv("KEYWARD_POSTGRES_ROLES"), ",") {
		if role = strings.TrimSpace(role); role == "" {
			continue
		}
		if !nameForm.MatchString(role) {
			return nil, fmt.Errorf("KEYWARD_POSTGRES_ROLES: %q is not a role name", role)
		}
		r.Roles = append(r.Roles, role)
	}
	if len(r.Roles) == 0 {
		return nil, errors.New("set KEYWARD_POSTGRES_ROLES to the group roles credentials may rotate (comma-separated)")
	}
	cfg, err := pgx.ParseConfig(r.DSN)
	if err != nil {
		return nil, fmt.Errorf("KEYWARD_POSTGRES_DSN: %v", err)
	}
	if cfg.Password != "" {
		return nil, errors.New("KEYWARD_POSTGRES_DSN holds a password: put it in KEYWARD_POSTGRES_PASSWORD_FILE")
	}
	if ip := net.ParseIP(cfg.Host); (ip == nil || !ip.IsLoopback()) && !strings.HasPrefix(cfg.Host, "/") && !strings.Contains(r.DSN, "sslmode=verify-full") {
		// Test logs in with the new password: over a network, only to a
		// server whose certificate is checked.
		return nil, errors.New("KEYWARD_POSTGRES_DSN: a server off this host needs sslmode=verify-full")
	}
	fi, err := os.Stat(r.PasswordFile)
	if err != nil {
		return nil, fmt.Errorf("KEYWARD_POSTGRES_PASSWORD_FILE: %v", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("KEYWARD_POSTGRES_PASSWORD_FILE %s: readable by others (mode %04o); chmod 0600 it", r.PasswordFile, fi.Mode().Perm())
	}
	return r, nil
}

// admin connects as the administrator.
func (r *Rotator) admin(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(r.DSN)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", sdk.ErrPermanent, err)
	}
	pw, err := os.ReadFile(r.PasswordFile)
	if err != nil {
		return nil, err
	}
	cfg.Password = strings.TrimRight(string(pw), "\r\n")
	return pgx.ConnectConfig(ctx, cfg)
}

// CheckConfig checks a credential's configuration.
func (r *Rotator) CheckConfig(_ context.Context, c sdk.Credential) error {
	_, err := r.parse(c)
	return err
}

// other is the login role a rotation sets: the one that is not current.
func other(role, current string) string {
	if current == role+"_a" {
		return role + "_b"
	}
	return role + "_a"
}

// Create sets the new password on the login role not in use, making the
// roles if they are missing. Done again, it sets the same password again.
func (r *Rotator) Create(ctx context.Context, req sdk.CreateRequest) (sdk.CreateResult, error) {
	cfg, err := r.parse(req.Credential)
	if err != nil {
		return sdk.CreateResult{}, err
	}
	if req.CurrentHandle != "" && req.CurrentHandle != cfg.Role+"_a" && req.CurrentHandle != cfg.Role+"_b" {
		return sdk.CreateResult{}, fmt.Errorf("credential %s: the current login %q is not %s_a or %s_b: %w", req.Credential.Name, req.CurrentHandle, cfg.Role, cfg.Role, sdk.ErrPermanent)
	}
	handle := other(cfg.Role, req.CurrentHandle)
	verifier, err := scramVerifier(req.Secret.Reveal())
	if err != nil {
		return sdk.CreateResult{}, err
	}
	c, err := r.admin(ctx)
	if err != nil {
		return sdk.CreateResult{}, err
	}
	defer c.Close(context.Background())
	group, login := pgx.Identifier{cfg.Role}.Sanitize(), pgx.Identifier{handle}.Sanitize()
	var exists bool
	if err := c.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", cfg.Role).Scan(&exists); err != nil {
		return sdk.CreateResult{}, err
	}
	if !exists {
		if _, err := c.Exec(ctx, "CREATE ROLE "+group+" NOLOGIN"); err != nil {
			return sdk.CreateResult{}, err
		}
	}
	if err := c.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", handle).Scan(&exists); err != nil {
		return sdk.CreateResult{}, err
	}
	// The verifier is of our own alphabet (base64 and $ : digits): it
	// needs no escaping, and the password itself never reaches the server.
	stmt := "ALTER ROLE " + login + " WITH LOGIN PASSWORD '" + verifier + "'"
	if !exists {
		stmt = "CREATE ROLE " + login + " WITH LOGIN IN ROLE " + group + " PASSWORD '" + verifier + "'"
	}
	if _, err := c.Exec(ctx, stmt); err != nil {
		return sdk.CreateResult{}, err
	}
	return sdk.CreateResult{Handle: handle}, nil
}

// Test logs in as the new login with its password.
func (r *Rotator) Test(ctx context.Context, req sdk.TestRequest) error {
	cfg, err := r.parse(req.Credential)
	if err != nil {
		return err
	}
	ac, err := pgx.ParseConfig(r.DSN)
	if err != nil {
		return fmt.Errorf("%w: %v", sdk.ErrPermanent, err)
	}
	ac.User, ac.Password, ac.Database = req.Handle, string(req.Secret.Reveal()), cfg.Database
	c, err := pgx.ConnectConfig(ctx, ac)
	if err != nil {
		return fmt.Errorf("logging in as %s: %v", req.Handle, scrub(err, req.Secret.Reveal()))
	}
	defer c.Close(context.Background())
	var one int
	return c.QueryRow(ctx, "SELECT 1").Scan(&one)
}

// Activate has nothing to do: the application takes the new login (the
// handle) and password from keywardd.
func (r *Rotator) Activate(context.Context, sdk.ActivateRequest) error { return nil }

// Retire disables a login role: no login, no password. Its open sessions
// are left to end.
func (r *Rotator) Retire(ctx context.Context, req sdk.RetireRequest) error {
	cfg, err := r.parse(req.Credential)
	if err != nil {
		return err
	}
	if req.Handle != cfg.Role+"_a" && req.Handle != cfg.Role+"_b" {
		return fmt.Errorf("credential %s: %q is not a login of %s: %w", req.Credential.Name, req.Handle, cfg.Role, sdk.ErrPermanent)
	}
	c, err := r.admin(ctx)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	_, err = c.Exec(ctx, "ALTER ROLE "+pgx.Identifier{req.Handle}.Sanitize()+" WITH NOLOGIN PASSWORD NULL")
	return err
}

// scramVerifier is PostgreSQL's SCRAM-SHA-256 verifier of a password (RFC
// 5802, RFC 7677; the form pg_authid keeps): PostgreSQL takes it as an
// already-encrypted password.
func scramVerifier(password []byte) (string, error) {
	if len(password) == 0 {
		return "", fmt.Errorf("no password: %w", sdk.ErrPermanent)
	}
	const iterations = 4096
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	salted, err := pbkdf2.Key(sha256.New, string(password), salt, iterations, sha256.Size)
	if err != nil {
		return "", err
	}
	mac := func(key []byte, msg string) []byte {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(msg))
		return h.Sum(nil)
	}
	stored := sha256.Sum256(mac(salted, "Client Key"))
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iterations, b64(salt), b64(stored[:]), b64(mac(salted, "Server Key"))), nil
}

// scrub removes a secret from an error's text.
func scrub(err error, secret []byte) string {
	s := err.Error()
	if len(secret) > 0 {
		s = strings.ReplaceAll(s, string(secret), "[redacted]")
	}
	return s
}
