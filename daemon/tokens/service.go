package tokens

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"

	rootkeys "github.com/keyward/keyward/daemon/keys"
	"github.com/keyward/keyward/hsm"
)

// Config is keywardd's side of tokens (the tokens section of its
// configuration).
type Config struct {
	Issuer     string        // iss of every token; default "keyward"
	DefaultTTL time.Duration // default 5 minutes
	MaxTTL     time.Duration // the ceiling, whatever a role allows; default 1 hour
	Leeway     time.Duration // clock skew Verify allows; default 30 s, at most MaxLeeway
	// NoCache turns off reusing a token for repeated identical mints by the
	// same caller (see Service.Mint).
	NoCache bool
}

// WithDefaults is c with what it leaves out filled in.
func (c Config) WithDefaults() Config {
	if c.Issuer == "" {
		c.Issuer = "keyward"
	}
	if c.DefaultTTL <= 0 {
		c.DefaultTTL = 5 * time.Minute
	}
	if c.MaxTTL <= 0 {
		c.MaxTTL = time.Hour
	}
	if c.Leeway <= 0 {
		c.Leeway = 30 * time.Second
	}
	return c
}

// Keys are the signing keys a Service uses: keywardd's key manager.
type Keys interface {
	// Cached is a key, from memory when it can be; the Key is shared and
	// must not be changed.
	Cached(name string) (*rootkeys.Key, error)
	List() ([]*rootkeys.Key, error)
	// Generation changes whenever a key does.
	Generation() uint64
}

// Signers make the HSM signer of a key version.
type Signers interface {
	Signer(ctx context.Context, id hsm.KeyID) (*hsm.Signer, error)
}

// Service is keywardd's token service: it picks the version a key signs
// with now, mints (reusing a recent identical token), verifies (remembering
// what verified), revokes, and assembles the published key set. Who may
// mint what is the policy's business, decided before Mint is called.
type Service struct {
	cfg     Config
	keys    Keys
	signers Signers
	revoked *Revoked
	now     func() time.Time

	kmu   sync.Mutex
	tkeys map[hsm.KeyID]*Key // a version's public key never changes

	mints mintCache

	vmu    sync.Mutex
	vcache *Verifier
	vgen   uint64
	vsec   int64

	verified *Cache
}

// NewService makes a token service; now is keywardd's clock (nil:
// time.Now).
func NewService(cfg Config, k Keys, s Signers, revoked *Revoked, now func() time.Time) *Service {
	if now == nil {
		now = time.Now
	}
	return &Service{cfg: cfg.WithDefaults(), keys: k, signers: s, revoked: revoked, now: now,
		tkeys: map[hsm.KeyID]*Key{}, mints: mintCache{m: map[string]mintEntry{}}, verified: NewCache()}
}

// Lifetime is the lifetime a token asked for with requested gets (0: the
// default), or ErrInvalid past the ceiling.
func (s *Service) Lifetime(requested time.Duration) (time.Duration, error) {
	ttl := requested
	if ttl == 0 {
		ttl = s.cfg.DefaultTTL
	}
	if ttl <= 0 || ttl > s.cfg.MaxTTL {
		return 0, fmt.Errorf("%w: a lifetime of %v; keywardd mints tokens of up to %v", ErrInvalid, ttl, s.cfg.MaxTTL)
	}
	return ttl, nil
}

// MintRequest is a token to mint, as the policy allowed it.
type MintRequest struct {
	Key       string // the signing key's name
	Subject   string
	Audiences []string
	Scopes    []string
	Custom    map[string]any
	TTL       time.Duration // from Lifetime
	// Caller names who asks, for the reuse of identical tokens: a token is
	// reused only for the same Caller.
	Caller string
}

// MintedBy is a minted token and the key version that signed it.
type MintedBy struct {
	Minted
	Key hsm.KeyID
}

// signing is the version of name signing now, checked to be usable.
func (s *Service) signing(name string, ttl time.Duration, now time.Time) (hsm.KeyID, error) {
	k, err := s.keys.Cached(name)
	if err != nil {
		return hsm.KeyID{}, err
	}
	if k.Purpose != rootkeys.Sign {
		return hsm.KeyID{}, fmt.Errorf("%w: %q is a %s key, not a signing key", rootkeys.ErrWrongPurpose, k.Name, k.Purpose)
	}
	if err := k.Usable(); err != nil {
		return hsm.KeyID{}, err
	}
	if k.Labels[rootkeys.UseLabel] == rootkeys.UseRaw {
		return hsm.KeyID{}, fmt.Errorf("%w: %q is made for CryptoService.Sign (%s=%s); tokens are signed with a key of their own", rootkeys.ErrWrongPurpose, k.Name, rootkeys.UseLabel, rootkeys.UseRaw)
	}
	v, ok := k.Signing(now)
	if !ok {
		return hsm.KeyID{}, fmt.Errorf("%w: %q has no version signing now", rootkeys.ErrVersion, k.Name)
	}
	if !v.RemoveAt.IsZero() && now.Add(ttl).After(v.RemoveAt) {
		// Cannot happen while the keep-published time covers the ceiling.
		return hsm.KeyID{}, fmt.Errorf("%w: a token of %v would outlive the publication of %q v%d", rootkeys.ErrVersion, ttl, k.Name, v.Number)
	}
	return hsm.KeyID{Name: k.Name, Version: v.Number}, nil
}

// Mint signs the token r asks for with the version of r.Key signing now.
// A caller that asks for the same token again (same caller, key version,
// audiences, scopes, claims, lifetime, subject) gets the one it got before,
// until half its lifetime has passed, instead of an HSM signature each
// time, unless it was revoked or Config.NoCache. An error once the version
// was chosen comes with a MintedBy of that Key alone (for the audit record).
func (s *Service) Mint(ctx context.Context, r MintRequest) (*MintedBy, error) {
	now := s.now()
	id, err := s.signing(r.Key, r.TTL, now)
	if err != nil {
		return nil, err
	}
	var cacheKey string
	if !s.cfg.NoCache {
		ck, _ := json.Marshal([]any{r.Caller, id, r.Audiences, r.Scopes, r.Custom, r.TTL, r.Subject})
		cacheKey = string(ck)
		if hit := s.mints.get(cacheKey, now); hit != nil && !s.revoked.Is(hit.ID) {
			return hit, nil
		}
	}
	tk, err := s.tokenKey(ctx, id)
	if err != nil {
		return &MintedBy{Key: id}, err
	}
	m, err := Mint(ctx, tk, Spec{Issuer: s.cfg.Issuer, Subject: r.Subject, Audience: r.Audiences,
		TTL: r.TTL, Scopes: r.Scopes, Custom: r.Custom}, now)
	if err != nil {
		return &MintedBy{Key: id}, err
	}
	out := &MintedBy{Minted: *m, Key: id}
	if cacheKey != "" {
		s.mints.put(cacheKey, out, now, r.TTL)
	}
	return out, nil
}

// Verify checks token for audience against the keys published now.
func (s *Service) Verify(ctx context.Context, token, audience string) (*Verified, error) {
	if audience == "" {
		return nil, fmt.Errorf("%w: the audience to verify for is required", ErrInvalid)
	}
	now := s.now()
	v, gen, err := s.verifier(ctx, now)
	if err != nil {
		return nil, err
	}
	return s.verified.Verify(v, publishedGen(gen, v), token, audience, now)
}

// Own checks that token is one of keyward's, valid now, whatever its
// audience (Verifier.Own).
func (s *Service) Own(ctx context.Context, token string) (*Verified, error) {
	now := s.now()
	v, _, err := s.verifier(ctx, now)
	if err != nil {
		return nil, err
	}
	return v.Own(token, now)
}

// Revoke revokes the token id, signed by the key keyName, until exp.
func (s *Service) Revoke(id string, exp time.Time, keyName string) error {
	return s.revoked.Revoke(id, exp, keyName)
}

// RevokeUnknown revokes the token id, whose key and expiry are unknown,
// for as long as any token can live; it returns when the revocation ends.
func (s *Service) RevokeUnknown(id string) (time.Time, error) {
	exp := s.now().Add(s.cfg.MaxTTL)
	return exp, s.revoked.Revoke(id, exp, "")
}

// Published returns the Keys of every published signing key version.
func (s *Service) Published(ctx context.Context) ([]*Key, error) {
	return s.published(ctx, s.now())
}

func (s *Service) published(ctx context.Context, now time.Time) ([]*Key, error) {
	all, err := s.keys.List()
	if err != nil {
		return nil, err
	}
	var out []*Key
	for _, k := range all {
		if k.Purpose != rootkeys.Sign || k.State == rootkeys.PendingDeletion {
			continue
		}
		for _, v := range k.Published(now) {
			tk, err := s.tokenKey(ctx, hsm.KeyID{Name: k.Name, Version: v.Number})
			if err != nil {
				return nil, err
			}
			out = append(out, tk)
		}
	}
	return out, nil
}

// JWKS is the published key set as JSON.
func (s *Service) JWKS(ctx context.Context) ([]byte, error) {
	pub, err := s.Published(ctx)
	if err != nil {
		return nil, err
	}
	return json.Marshal(JWKS(pub...))
}

// tokenKey is the Key of a signing key version, made once.
func (s *Service) tokenKey(ctx context.Context, id hsm.KeyID) (*Key, error) {
	s.kmu.Lock()
	k := s.tkeys[id]
	s.kmu.Unlock()
	if k != nil {
		return k, nil
	}
	sg, err := s.signers.Signer(ctx, id)
	if err != nil {
		return nil, err
	}
	if k, err = NewKey(sg, id); err != nil {
		return nil, err
	}
	s.kmu.Lock()
	s.tkeys[id] = k
	s.kmu.Unlock()
	return k, nil
}

// verifier returns a Verifier over the keys published now, and the
// generation it belongs to. It is built again when a key changed or a second
// has passed (versions activate and leave the JWKS as time goes by).
func (s *Service) verifier(ctx context.Context, now time.Time) (*Verifier, uint64, error) {
	gen := s.keys.Generation()
	sec := now.Unix()
	s.vmu.Lock()
	if s.vcache != nil && s.vgen == gen && s.vsec == sec {
		v := s.vcache
		s.vmu.Unlock()
		return v, gen, nil
	}
	s.vmu.Unlock()
	pub, err := s.published(ctx, now)
	if err != nil {
		return nil, 0, err
	}
	v := &Verifier{Keys: map[string]*Key{}, Issuer: s.cfg.Issuer, Leeway: s.cfg.Leeway, Revoked: s.revoked.Is}
	for _, k := range pub {
		v.Keys[k.KID] = k
	}
	s.vmu.Lock()
	s.vcache, s.vgen, s.vsec = v, gen, sec
	s.vmu.Unlock()
	return v, gen, nil
}

// publishedGen names the published key set for the verification cache: the
// keys' generation and the set of key IDs (which changes as time activates
// or removes versions, without a key change).
func publishedGen(gen uint64, v *Verifier) uint64 {
	kids := make([]string, 0, len(v.Keys))
	for kid := range v.Keys {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	h := sha256.New()
	fmt.Fprint(h, gen, kids)
	var b [8]byte
	copy(b[:], h.Sum(nil))
	return binary.BigEndian.Uint64(b[:])
}

// mintCache holds recently minted tokens for reuse (Service.Mint). Only
// tokens minted after every check of the call are put in it. Bounded: it is
// emptied when full.
type mintCache struct {
	mu sync.Mutex
	m  map[string]mintEntry
}

type mintEntry struct {
	minted  *MintedBy
	reuseTo time.Time
}

const mintCacheMax = 10000

func (c *mintCache) get(key string, now time.Time) *MintedBy {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return nil
	}
	if !now.Before(e.reuseTo) {
		delete(c.m, key)
		return nil
	}
	return e.minted
}

func (c *mintCache) put(key string, m *MintedBy, now time.Time, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= mintCacheMax {
		clear(c.m)
	}
	c.m[key] = mintEntry{minted: m, reuseTo: now.Add(ttl / 2)}
}

// Sweep forgets the revocations of tokens past their expiry.
func (s *Service) Sweep() (int, error) { return s.revoked.Sweep() }
