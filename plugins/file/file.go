// Package file is the file plugin's logic: it keeps a managed credential's
// current secret in a file, for applications that can only read one. The
// file is replaced atomically (a temporary file in the same directory,
// written, synced and renamed), mode 0600, owned by keywardd's user; a
// reader sees the old secret or the new one, never a mix.
//
// Rotation: Create writes the new secret beside the file (PATH.keyward-new),
// Test reads it back, Activate renames it over PATH, Retire has nothing left
// to do (the old secret went with Activate) and removes a leftover.
package file

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/keyward/keyward/plugins/sdk"
)

// Config is a credential's configuration: {"path": "/etc/app/db-password"}.
type Config struct {
	Path string `json:"path"`
}

// Rotator is the file plugin's rotator. Dirs are the directories it may
// write in (KEYWARD_FILE_DIRS, colon-separated): whoever may register a
// credential chooses its path, and keywardd's own files (its store, its
// audit log, its PIN) must be out of reach.
type Rotator struct {
	Dirs []string
}

// FromEnv reads KEYWARD_FILE_DIRS.
func FromEnv() (*Rotator, error) {
	r := &Rotator{}
	for _, d := range strings.Split(os.Getenv("KEYWARD_FILE_DIRS"), ":") {
		if d == "" {
			continue
		}
		if !filepath.IsAbs(d) || filepath.Clean(d) != d {
			return nil, fmt.Errorf("KEYWARD_FILE_DIRS: %q is not an absolute, clean directory", d)
		}
		r.Dirs = append(r.Dirs, d)
	}
	if len(r.Dirs) == 0 {
		return nil, errors.New("set KEYWARD_FILE_DIRS to the directories credentials may be written in (colon-separated)")
	}
	return r, nil
}

func (r *Rotator) parse(c sdk.Credential) (Config, error) {
	var cfg Config
	if err := json.Unmarshal(c.Config, &cfg); err != nil {
		return cfg, fmt.Errorf("credential %s: the configuration is not {\"path\": \"/abs/path\"}: %v: %w", c.Name, err, sdk.ErrPermanent)
	}
	if !filepath.IsAbs(cfg.Path) || filepath.Clean(cfg.Path) != cfg.Path {
		return cfg, fmt.Errorf("credential %s: path %q must be absolute and clean: %w", c.Name, cfg.Path, sdk.ErrPermanent)
	}
	if !slices.Contains(r.Dirs, filepath.Dir(cfg.Path)) {
		return cfg, fmt.Errorf("credential %s: %s is not in a directory this plugin may write in (KEYWARD_FILE_DIRS): %w", c.Name, cfg.Path, sdk.ErrPermanent)
	}
	if fi, err := os.Lstat(cfg.Path); err == nil && !fi.Mode().IsRegular() {
		return cfg, fmt.Errorf("credential %s: %s exists and is not a regular file: %w", c.Name, cfg.Path, sdk.ErrPermanent)
	}
	return cfg, nil
}

// CheckConfig checks a credential's configuration: an absolute path in an
// allowed, existing directory.
func (r *Rotator) CheckConfig(_ context.Context, c sdk.Credential) error {
	cfg, err := r.parse(c)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(filepath.Dir(cfg.Path)); err != nil || !fi.IsDir() {
		return fmt.Errorf("credential %s: no directory %s: %w", c.Name, filepath.Dir(cfg.Path), sdk.ErrPermanent)
	}
	return nil
}

func staged(cfg Config) string { return cfg.Path + ".keyward-new" }

// Create writes the new secret beside the file. Done again for the same
// operation, it writes the same secret again: idempotent.
func (rt *Rotator) Create(_ context.Context, r sdk.CreateRequest) (sdk.CreateResult, error) {
	cfg, err := rt.parse(r.Credential)
	if err != nil {
		return sdk.CreateResult{}, err
	}
	if r.Secret.Empty() {
		return sdk.CreateResult{}, fmt.Errorf("credential %s: no secret to write: %w", r.Credential.Name, sdk.ErrPermanent)
	}
	if err := writeAtomic(staged(cfg), r.Secret.Reveal()); err != nil {
		return sdk.CreateResult{}, err
	}
	return sdk.CreateResult{Handle: r.OperationID}, nil
}

// Test reads the new secret back.
func (rt *Rotator) Test(_ context.Context, r sdk.TestRequest) error {
	cfg, err := rt.parse(r.Credential)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(staged(cfg))
	if errors.Is(err, os.ErrNotExist) {
		// Activated already (a retry after Activate): the file holds it.
		b, err = os.ReadFile(cfg.Path)
	}
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare(b, r.Secret.Reveal()) != 1 {
		return fmt.Errorf("credential %s: %s does not hold the new secret", r.Credential.Name, staged(cfg))
	}
	return nil
}

// Activate renames the new secret over the file.
func (rt *Rotator) Activate(_ context.Context, r sdk.ActivateRequest) error {
	cfg, err := rt.parse(r.Credential)
	if err != nil {
		return err
	}
	err = os.Rename(staged(cfg), cfg.Path)
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(cfg.Path); serr == nil {
			return nil // done before: this is a retry
		}
	}
	if err != nil {
		return err
	}
	return syncDir(filepath.Dir(cfg.Path))
}

// Retire removes a new secret never activated; the old one is gone.
func (rt *Rotator) Retire(_ context.Context, r sdk.RetireRequest) error {
	cfg, err := rt.parse(r.Credential)
	if err != nil {
		return err
	}
	if err := os.Remove(staged(cfg)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// writeAtomic writes b to path through a synced temporary file, mode 0600.
func writeAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".keyward-tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // gone by rename when all went well
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
