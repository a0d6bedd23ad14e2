package leaks

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrPayload: a signed report's body is not a list of found tokens.
var ErrPayload = errors.New("leaks: the report is not a JSON array of {token, type, url, source}")

// Bounds of a report.
const (
	// MaxTokens is the most tokens one report may hold.
	MaxTokens = 1000
	// maxToken bounds a token: an API key is at most some 70 bytes, and a
	// scanner's match is not much more.
	maxToken = 1024
)

// Found is one token a scanner found, as GitHub's secret scanning partner
// program sends it.
type Found struct {
	Token  string `json:"token"`
	Type   string `json:"type"`
	URL    string `json:"url"`
	Source string `json:"source"`
}

// Label is the answer about one token.
type Label struct {
	TokenRaw  string `json:"token_raw"`
	TokenType string `json:"token_type"`
	Label     string `json:"label"`
}

// The labels.
const (
	TruePositive  = "true_positive"
	FalsePositive = "false_positive"
)

// ParsePayload reads a report's body: a JSON array of 1 to MaxTokens
// objects, each with a token of 1 to 1024 bytes. Fields it does not know
// are passed over (the sender may add some); a field of the wrong type, a
// second JSON value after the array, or anything else is refused.
func ParsePayload(b []byte) ([]Found, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	var out []Found
	if err := d.Decode(&out); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrPayload, err)
	}
	if d.More() {
		return nil, fmt.Errorf("%w: something follows the array", ErrPayload)
	}
	if _, err := d.Token(); err == nil {
		return nil, fmt.Errorf("%w: something follows the array", ErrPayload)
	}
	if out == nil {
		return nil, fmt.Errorf("%w: it is null", ErrPayload)
	}
	if len(out) == 0 || len(out) > MaxTokens {
		return nil, fmt.Errorf("%w: it holds %d tokens, not 1 to %d", ErrPayload, len(out), MaxTokens)
	}
	for i, f := range out {
		if f.Token == "" || len(f.Token) > maxToken {
			return nil, fmt.Errorf("%w: item %d has no token, or one over %d bytes", ErrPayload, i, maxToken)
		}
	}
	return out, nil
}
