package server

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/daemon/api/gateway"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// Envoy's external authorization (envoy.service.auth.v3.Authorization,
// docs/gateways.md#envoy): an Envoy in front of a service asks keywardd
// whether a request's API key may pass. The route says what it needs in
// its check_settings' context_extensions (the keys below); the source
// address is Envoy's downstream address. Check is a VerifyAPIKey in all
// but its wire format: the same policy operation, the same verification,
// the same audit record (whose detail says it came through Envoy), and
// the answer gateway.AnswerOf gives every keyward gateway.

// The context_extensions a route sets for keyward.
const (
	// EnvoyEnvironment is the environment the service runs in (required).
	EnvoyEnvironment = "keyward_environment"
	// EnvoyPermission are the permissions the route needs, comma-separated.
	EnvoyPermission = "keyward_permission"
	// EnvoyHeader names the header holding the key: "authorization" (the
	// default) with the Bearer scheme; any other header holds the key itself.
	EnvoyHeader = "keyward_header"
)

// gatewayOps are the methods keywardd serves for gateways outside
// keyward.v1, by the operation the policy grants and the audit log and
// metrics name for them: an Envoy's Check is a VerifyAPIKey, so a
// gateway's role grants APIKeyService.VerifyAPIKey on the owners whose
// keys it admits.
var gatewayOps = map[string]string{authv3.Authorization_Check_FullMethodName: "APIKeyService.VerifyAPIKey"}

// envoyAuthz serves envoy.service.auth.v3.Authorization for s.
type envoyAuthz struct {
	authv3.UnimplementedAuthorizationServer
	s *Server
}

// Check verifies the API key of the request Envoy describes. A verdict
// is always an answer (OK with Keyward-Key-Id and Keyward-Owner set, or a
// denial with its status, headers and body); a route configured wrongly,
// a caller the policy does not let verify keys, or keywardd unable to
// tell are gRPC errors, which Envoy turns into its status_on_error.
func (e envoyAuthz) Check(ctx context.Context, r *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	attrs := r.GetAttributes()
	ext := attrs.GetContextExtensions()
	req := &keywardv1.VerifyAPIKeyRequest{Environment: ext[EnvoyEnvironment], Permissions: splitPermissions(ext[EnvoyPermission]),
		SourceIp: attrs.GetSource().GetAddress().GetSocketAddress().GetAddress()}
	if req.Environment == "" {
		return nil, fmt.Errorf("%w: Envoy's route names no environment: set %s in its ext_authz check_settings.context_extensions (docs/gateways.md#envoy)",
			errInvalid, EnvoyEnvironment)
	}
	header := ext[EnvoyHeader]
	if header == "" {
		header = "authorization"
	}
	req.Key = keyFrom(attrs.GetRequest().GetHttp(), header)
	c := callFrom(ctx)
	c.detail = "through Envoy's ext_authz Check"
	v, err := e.s.VerifyAPIKey(ctx, req)
	if err != nil {
		// The audit record's detail is the error's message: it says so too.
		return nil, fmt.Errorf("%w (%s)", err, c.detail)
	}
	a := gateway.AnswerOf(v, e.s.cfg.Now())
	if a.Status == 0 {
		c.detail += ": passed"
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.OK)},
			HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
				// Set over any the client sent: only keyward's reach the service.
				Headers: []*corev3.HeaderValueOption{
					headerOption(gateway.HeaderKeyID, v.GetKeyId()), headerOption(gateway.HeaderOwner, v.GetOwner())},
				ResponseHeadersToAdd: headerOptions(a.Header)}}}, nil
	}
	c.detail += fmt.Sprintf(": HTTP %d", a.Status)
	return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: http.StatusText(a.Status)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode(a.Status)}, Headers: headerOptions(a.Header), Body: string(a.Body)}}}, nil
}

// keyFrom is the API key in the request's header name, "" if there is
// none: the Bearer token of an Authorization header, any other header's
// value itself. Envoy gives the headers as a map, or as a list when its
// filter sets encode_raw_headers; their names are lower case either way.
func keyFrom(h *authv3.AttributeContext_HttpRequest, name string) string {
	name = strings.ToLower(name)
	val, ok := h.GetHeaders()[name]
	if !ok {
		for _, hv := range h.GetHeaderMap().GetHeaders() {
			if strings.EqualFold(hv.GetKey(), name) {
				val = hv.GetValue()
				if val == "" {
					val = string(hv.GetRawValue())
				}
				break
			}
		}
	}
	hdr := http.Header{}
	hdr.Set(name, strings.TrimSpace(val))
	return gateway.Key(hdr, name)
}

// splitPermissions splits a comma-separated list, dropping blanks.
func splitPermissions(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// headerOption is a header Envoy sets, replacing any of that name.
func headerOption(name, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: name, Value: value},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}
}

// headerOptions are h's headers as Envoy sets them, in name order.
func headerOptions(h http.Header) []*corev3.HeaderValueOption {
	var out []*corev3.HeaderValueOption
	for _, name := range slices.Sorted(maps.Keys(h)) {
		out = append(out, headerOption(name, h.Get(name)))
	}
	return out
}
