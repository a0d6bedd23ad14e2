package credentials

import (
	"context"
	"fmt"

	"github.com/keyward/keyward/daemon/envelope"
)

// EnvelopeSealer seals secrets with envelope encryption under Key, an
// encryption key in the HSM, bound to the credential's name: a sealed secret
// copied to another credential's record does not open.
type EnvelopeSealer struct {
	Envelope *envelope.Service
	Key      string
}

func sealContext(name string) map[string]string {
	return map[string]string{"keyward": "managed credential", "credential": name}
}

// Seal encrypts a secret of the named credential.
func (s EnvelopeSealer) Seal(ctx context.Context, name string, secret []byte) ([]byte, error) {
	return s.Envelope.Encrypt(ctx, s.Key, secret, sealContext(name))
}

// Open decrypts a secret of the named credential.
func (s EnvelopeSealer) Open(ctx context.Context, name string, sealed []byte) ([]byte, error) {
	b, _, err := s.Envelope.Decrypt(ctx, sealed, sealContext(name))
	if err != nil {
		return nil, fmt.Errorf("credentials: the secret of %q does not open: %w", name, err)
	}
	return b, nil
}
