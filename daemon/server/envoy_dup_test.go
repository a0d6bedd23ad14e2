package server

import (
	"testing"

	"github.com/keyward/keyward/daemon/api/envoyauth"
)

// TestEnvoyDuplicateKeyHeader: the same HTTP request with two
// Authorization headers reaches keywardd as Envoy encodes it either way:
// in headers (a map, the values joined by ",") or, with
// encode_raw_headers, in header_map (one entry each). Its verdict must
// not depend on that filter setting; today the map's joined value is no
// key keywardd knows (refused), while header_map's first entry is
// verified alone and the request admitted, the second Authorization
// forwarded to the service all the same.
func TestEnvoyDuplicateKeyHeader(t *testing.T) {
	asMap := &envoyauth.HttpRequest{Headers: []*envoyauth.StringPair{{Key: "authorization", Value: "Bearer kw_first,Bearer kw_second"}}}
	asList := &envoyauth.HttpRequest{HeaderMap: &envoyauth.HeaderMap{Headers: []*envoyauth.HeaderValue{
		{Key: "authorization", RawValue: []byte("Bearer kw_first")}, {Key: "authorization", RawValue: []byte("Bearer kw_second")}}}}
	if m, l := keyFrom(asMap, "authorization"), keyFrom(asList, "authorization"); m != l {
		t.Errorf("two Authorization headers: the key is %q from headers, %q from header_map", m, l)
	}
}
