package tokens

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// JWKSHandler serves what verifiers elsewhere need, read-only and without
// authentication (it is all public): /.well-known/jwks.json, the published
// signing keys, cacheable for at most half the pre-publish time so that a
// verifier has a new key before it signs; and
// /.well-known/openid-configuration, naming the issuer and the JWKS URL.
// baseURL is how verifiers reach this listener (https://host:port).
func (s *Service) JWKSHandler(baseURL string, prePublish time.Duration) http.Handler {
	maxAge := int((prePublish / 2).Seconds())
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/jwks.json", func(w http.ResponseWriter, r *http.Request) {
		pub, err := s.Published(r.Context())
		if err != nil {
			http.Error(w, "keys unavailable", http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, JWKS(pub...), maxAge)
	})
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{
			"issuer":                                s.cfg.Issuer,
			"jwks_uri":                              baseURL + "/.well-known/jwks.json",
			"id_token_signing_alg_values_supported": []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.EdDSA},
		}, maxAge)
	})
	return http.MaxBytesHandler(mux, 4<<10)
}

func writeJSON(w http.ResponseWriter, v any, maxAge int) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", fmt.Sprintf("public, max-age=%d", maxAge))
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(b)
}
