package sdk

import (
	"fmt"
	"log/slog"
)

// Secret holds a credential's secret. It prints as [redacted] however it is
// printed (fmt's verbs, slog, JSON), so that a log line or an error that
// names it by mistake shows nothing; Reveal gives the bytes to the code that
// must send them to the external system.
type Secret struct{ b []byte }

// NewSecret wraps b (not copied).
func NewSecret(b []byte) Secret { return Secret{b: b} }

// Reveal returns the secret's bytes.
func (s Secret) Reveal() []byte { return s.b }

// Empty says whether there is no secret.
func (s Secret) Empty() bool { return len(s.b) == 0 }

const redacted = "[redacted]"

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { f.Write([]byte(redacted)) }
func (Secret) LogValue() slog.Value         { return slog.StringValue(redacted) }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
