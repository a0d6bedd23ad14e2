// The format of an API key:
//
//	<prefix>_<random><checksum>
//
// prefix is 2 to 16 lower-case letters and digits starting with a letter
// (default "kw"), so that a key says whose it is; random is 43 base62
// characters, 256 bits from the operating system's generator; checksum is the
// CRC-32 (IEEE) of "<prefix>_<random>" in 6 base62 characters. As with
// GitHub's tokens, the checksum lets a typo, a truncated paste or a secret
// scanner tell a real key offline, and lets keywardd refuse a malformed key
// before any store or HSM work. The checksum is no protection: the key's
// strength is its 256 random bits. docs/formats.md has test vectors.

package apikeys

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"regexp"
	"strings"
)

const (
	alphabet      = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	randomLen     = 43 // 62^43 > 2^256
	checksumLen   = 6  // 62^6 > 2^32
	DefaultPrefix = "kw"
	maxPrefixLen  = 16
)

// MaxLen is the length of the longest key; Parse refuses a longer string
// before it looks at it.
const MaxLen = maxPrefixLen + 1 + randomLen + checksumLen

// ErrMalformed: the string is not an API key of this format, or its
// checksum does not match (a typo). Such a key is refused before any lookup.
var ErrMalformed = errors.New("apikeys: malformed API key")

var prefixForm = regexp.MustCompile(`^[a-z][a-z0-9]{1,15}$`)

// CheckPrefix says whether a prefix can start keys.
func CheckPrefix(p string) error {
	if !prefixForm.MatchString(p) {
		return fmt.Errorf("apikeys: prefix %q: use 2 to 16 lower-case letters and digits, starting with a letter", p)
	}
	return nil
}

// Generate makes a new key with prefix, reading randomness from r
// (crypto/rand.Reader; tests pass a fixed stream for the vectors).
func Generate(prefix string, r io.Reader) (string, error) {
	if err := CheckPrefix(prefix); err != nil {
		return "", err
	}
	var b strings.Builder
	b.Grow(len(prefix) + 1 + randomLen + checksumLen)
	b.WriteString(prefix)
	b.WriteByte('_')
	buf := make([]byte, 64)
	for n := 0; n < randomLen; {
		if _, err := io.ReadFull(r, buf); err != nil {
			return "", fmt.Errorf("apikeys: randomness: %w", err)
		}
		for _, c := range buf {
			// 248 = 4 × 62: bytes from 248 up are dropped, so every
			// character is equally likely.
			if c < 248 && n < randomLen {
				b.WriteByte(alphabet[c%62])
				n++
			}
		}
	}
	body := b.String()
	return body + checksum(body), nil
}

// checksum is the CRC-32 of body in checksumLen base62 characters.
func checksum(body string) string {
	v := uint64(crc32.ChecksumIEEE([]byte(body)))
	out := make([]byte, checksumLen)
	for i := checksumLen - 1; i >= 0; i-- {
		out[i] = alphabet[v%62]
		v /= 62
	}
	return string(out)
}

// Parse checks a presented key's form and checksum and returns its prefix.
// It reads nothing but the string: no store, no HSM.
func Parse(key string) (prefix string, err error) {
	if len(key) > MaxLen {
		return "", fmt.Errorf("%w: %d characters, longer than any key", ErrMalformed, len(key))
	}
	prefix, rest, ok := strings.Cut(key, "_")
	switch {
	case !ok || CheckPrefix(prefix) != nil:
		return "", fmt.Errorf("%w: it does not start with a key prefix and '_'", ErrMalformed)
	case len(rest) != randomLen+checksumLen:
		return "", fmt.Errorf("%w: %d characters after the prefix, not %d", ErrMalformed, len(rest), randomLen+checksumLen)
	case strings.Trim(rest, alphabet) != "":
		return "", fmt.Errorf("%w: characters outside 0-9, A-Z, a-z", ErrMalformed)
	case checksum(key[:len(key)-checksumLen]) != rest[randomLen:]:
		return "", fmt.Errorf("%w: the checksum does not match (a typo, or a truncated key)", ErrMalformed)
	}
	return prefix, nil
}
