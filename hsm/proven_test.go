package hsm

import (
	"context"
	"testing"
	"time"
)

// TestCacheAnswersProveNothing: an answer from the key cache (a key not
// found: no token work) does not count as the connection having served a
// call, so a connection that did no work on the token is not made again at
// once each time the token says the login is gone: at most one login
// however many times it is lost within the reconnect interval.
func TestCacheAnswersProveNothing(t *testing.T) {
	h, f := faultToken(t, func(c *Config) { c.ReconnectInterval = time.Hour })
	ctx := context.Background()
	exercise(t, h, 0)
	n := f.Calls("C_Login")
	for range 10 {
		f.Set()
		h.Encrypt(ctx, KeyID{"nope", 1}, []byte("x"), nil) // the cache answers, or the call fails fast
		f.Set("C_Encrypt 0x101", "C_GetSessionInfo 0x101 once")
		h.Encrypt(ctx, KeyID{"kek", 1}, []byte("x"), nil)
	}
	f.Set()
	if got := f.Calls("C_Login") - n; got > 1 {
		t.Fatalf("%d logins for 10 losses of a connection that did nothing on the token, within the reconnect interval", got)
	}
}
