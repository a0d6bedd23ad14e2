package tokens

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
)

// Cache remembers tokens whose signature and form a Verifier accepted, so
// that a token verified again (a client sends the same one with every
// request) costs a map lookup instead of parsing and a signature check. What
// depends on the time or the request is checked again on every hit: expiry,
// not-before, the audience asked for, and revocation. Entries belong to one
// generation of the published keys: a new generation (a key rotated,
// withdrawn or deleted) empties the cache. Bounded: emptied when full.
type Cache struct {
	mu  sync.Mutex
	gen uint64
	m   map[[32]byte]*Verified
}

const cacheMax = 10000

// NewCache returns an empty cache.
func NewCache() *Cache { return &Cache{m: map[[32]byte]*Verified{}} }

// Verify is v.Verify with the cache: gen names the generation of the keys
// behind v.
func (c *Cache) Verify(v *Verifier, gen uint64, token, audience string, now time.Time) (*Verified, error) {
	if audience == "" {
		return nil, fmt.Errorf("%w: a verifier needs an audience", ErrInvalid)
	}
	h := sha256.Sum256([]byte(token))
	c.mu.Lock()
	if c.gen != gen {
		clear(c.m)
		c.gen = gen
	}
	hit := c.m[h]
	c.mu.Unlock()
	if hit == nil {
		got, err := v.verify(token, "", now) // everything but the audience
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		if c.gen == gen {
			if len(c.m) >= cacheMax {
				clear(c.m)
			}
			c.m[h] = got
		}
		c.mu.Unlock()
		hit = got
	}
	if v.Revoked != nil && v.Revoked(hit.Claims.ID) {
		return nil, fmt.Errorf("%w: jti %s", ErrRevoked, hit.Claims.ID)
	}
	err := hit.Claims.ValidateWithLeeway(jwt.Expected{Issuer: v.Issuer, AnyAudience: jwt.Audience{audience}, Time: now}, v.Leeway)
	switch {
	case errors.Is(err, jwt.ErrExpired):
		return nil, fmt.Errorf("%w: at %s", ErrExpired, hit.Claims.Expiry.Time().UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrNotValidYet):
		return nil, fmt.Errorf("%w: from %s", ErrNotYet, hit.Claims.NotBefore.Time().UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrIssuedInTheFuture):
		return nil, ErrIssuedAt
	case errors.Is(err, jwt.ErrInvalidAudience):
		return nil, fmt.Errorf("%w: not for %q", ErrAudience, audience)
	case err != nil:
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	out := *hit
	out.Scopes = slices.Clone(hit.Scopes)
	return &out, nil
}
