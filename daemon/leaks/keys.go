package leaks

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync/atomic"
	"time"
)

// Errors of a report's signature.
var (
	ErrNoSignature  = errors.New("leaks: the report is not signed: it needs the headers Github-Public-Key-Identifier and Github-Public-Key-Signature")
	ErrUnknownKey   = errors.New("leaks: the report is signed by a key keywardd does not know (leaks.public_keys_file, public_keys_url)")
	ErrBadSignature = errors.New("leaks: the report's signature does not verify")
	ErrKeys         = errors.New("leaks: the public keys document is not usable")
)

// Bounds of what a report's headers and the keys document may hold.
const (
	maxKeyID      = 256
	maxSignature  = 256 // base64 of an ASN.1 P-256 signature is at most 96 bytes
	maxKeys       = 64
	maxKeysDoc    = 1 << 20
	fetchDeadline = 30 * time.Second
)

// keysDocument is the format of GitHub's secret scanning public keys
// (https://api.github.com/meta/public_keys/secret_scanning).
type keysDocument struct {
	PublicKeys []struct {
		KeyIdentifier string `json:"key_identifier"`
		Key           string `json:"key"`
		IsCurrent     bool   `json:"is_current"`
	} `json:"public_keys"`
}

// ParseKeys reads a public keys document: each key an ECDSA P-256 key in
// PEM (SubjectPublicKeyInfo), named by its identifier. Keys no longer
// current are kept: a report signed a moment before a rotation still
// verifies.
func ParseKeys(b []byte) (map[string]*ecdsa.PublicKey, error) {
	ks, err := parseKeys(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeys, err)
	}
	return ks, nil
}

// parseKeys is ParseKeys, its errors saying what is wrong and no more.
func parseKeys(b []byte) (map[string]*ecdsa.PublicKey, error) {
	var doc keysDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, err
	}
	if len(doc.PublicKeys) == 0 {
		return nil, errors.New("it has no public_keys")
	}
	if len(doc.PublicKeys) > maxKeys {
		return nil, fmt.Errorf("more than %d keys", maxKeys)
	}
	out := map[string]*ecdsa.PublicKey{}
	for i, k := range doc.PublicKeys {
		if k.KeyIdentifier == "" || len(k.KeyIdentifier) > maxKeyID {
			return nil, fmt.Errorf("public_keys[%d] has no key_identifier, or one over %d bytes", i, maxKeyID)
		}
		blk, _ := pem.Decode([]byte(k.Key))
		if blk == nil || blk.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("public_keys[%d] (%q): key is not a PEM PUBLIC KEY", i, k.KeyIdentifier)
		}
		pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("public_keys[%d] (%q): %v", i, k.KeyIdentifier, err)
		}
		ec, ok := pub.(*ecdsa.PublicKey)
		if !ok || ec.Curve != elliptic.P256() {
			return nil, fmt.Errorf("public_keys[%d] (%q) is not an ECDSA P-256 key", i, k.KeyIdentifier)
		}
		out[k.KeyIdentifier] = ec
	}
	return out, nil
}

// Keys are the scanner's public keys in use: the file's and the URL's,
// held apart so that one source failing never costs the other's keys. An
// identifier in both is the file's: the operator's copy wins. Safe for
// concurrent use; a refresh replaces each source's keys at once.
type Keys struct {
	file, url string
	client    *http.Client
	log       *slog.Logger
	fromFile  atomic.Pointer[map[string]*ecdsa.PublicKey]
	fromURL   atomic.Pointer[map[string]*ecdsa.PublicKey]
}

// NewKeys reads the file (if any) and fetches the URL (if any). A file
// that cannot be read or parsed is an error; a URL that fails is logged
// and tried again at the next Refresh, with or without a file.
func NewKeys(ctx context.Context, file, url string, log *slog.Logger) (*Keys, error) {
	k := &Keys{file: file, url: url, log: log, client: &http.Client{Timeout: fetchDeadline,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
	none := map[string]*ecdsa.PublicKey{}
	k.fromFile.Store(&none)
	k.fromURL.Store(&none)
	fileErr, urlErr := k.refresh(ctx)
	if fileErr != nil {
		return nil, fileErr
	}
	if urlErr != nil && k.log != nil {
		k.log.Error("fetching the secret scanner's public keys failed; it is tried again at the next refresh", "error", urlErr.Error())
	}
	return k, nil
}

// Refresh reads the file and fetches the URL again. A source that fails
// keeps the keys it gave last; the other's new keys are taken all the
// same. The error names the source that failed (both, if both did).
func (k *Keys) Refresh(ctx context.Context) error {
	return errors.Join(k.refresh(ctx))
}

func (k *Keys) refresh(ctx context.Context) (fileErr, urlErr error) {
	if k.file != "" {
		ks, err := k.read()
		if err != nil {
			fileErr = fmt.Errorf("%w (leaks.public_keys_file %s): %v", ErrKeys, k.file, err)
		} else {
			k.fromFile.Store(&ks)
		}
	}
	if k.url != "" {
		ks, err := k.fetch(ctx)
		if err != nil {
			urlErr = fmt.Errorf("%w (leaks.public_keys_url %s): %v", ErrKeys, k.url, err)
		} else {
			k.fromURL.Store(&ks)
		}
	}
	return fileErr, urlErr
}

func (k *Keys) read() (map[string]*ecdsa.PublicKey, error) {
	b, err := os.ReadFile(k.file)
	if err != nil {
		return nil, err
	}
	return parseKeys(b)
}

func (k *Keys) fetch(ctx context.Context) (map[string]*ecdsa.PublicKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("it answered %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxKeysDoc+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxKeysDoc {
		return nil, fmt.Errorf("it sent more than %d bytes", maxKeysDoc)
	}
	return parseKeys(b)
}

// key is the key named id, the file's before the URL's; nil if none.
func (k *Keys) key(id string) *ecdsa.PublicKey {
	if pub := (*k.fromFile.Load())[id]; pub != nil {
		return pub
	}
	return (*k.fromURL.Load())[id]
}

// Known says whether id names a key in use: a map lookup, cheap enough
// to make before a request's body is read.
func (k *Keys) Known(id string) bool { return k.key(id) != nil }

// Len is how many keys are in use.
func (k *Keys) Len() int {
	file := *k.fromFile.Load()
	n := len(file)
	for id := range *k.fromURL.Load() {
		if file[id] == nil {
			n++
		}
	}
	return n
}

// Run refreshes the keys every interval until ctx ends.
func (k *Keys) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := k.Refresh(ctx); err != nil && k.log != nil {
				k.log.Error("refreshing the secret scanner's public keys failed; the keys that source gave last stay in use", "error", err.Error())
			}
		}
	}
}

// ParseSignature decodes a Github-Public-Key-Signature header: base64 of
// an ASN.1 DER ECDSA signature.
func ParseSignature(h string) ([]byte, error) {
	if h == "" || len(h) > maxSignature {
		return nil, fmt.Errorf("%w: the signature header is empty or over %d bytes", ErrBadSignature, maxSignature)
	}
	sig, err := base64.StdEncoding.DecodeString(h)
	if err != nil {
		return nil, fmt.Errorf("%w: the signature is not base64", ErrBadSignature)
	}
	return sig, nil
}

// Verify checks that sig (ParseSignature's) is the key id's ECDSA
// P-256/SHA-256 signature of body, the raw bytes as received.
func (k *Keys) Verify(id string, body, sig []byte) error {
	if id == "" {
		return ErrNoSignature
	}
	pub := k.key(id)
	if pub == nil {
		return ErrUnknownKey
	}
	h := sha256.Sum256(body)
	if !ecdsa.VerifyASN1(pub, h[:], sig) {
		return ErrBadSignature
	}
	return nil
}
