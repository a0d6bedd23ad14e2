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
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/keyward/keyward/daemon/api/envoyauth"
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
//
// Check reads and writes Envoy's messages as keyward's slim copies of
// them (daemon/api/envoyauth: only the fields keywardd uses, at Envoy's
// field numbers), served under Envoy's method name by envoyAuthzDesc, and
// decoded by envoyCodec, which drops the rest of what Envoy sends.

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

// envoyChecker is what envoyAuthzDesc serves: Envoy's Check over
// keyward's slim messages.
type envoyChecker interface {
	Check(context.Context, *envoyauth.CheckRequest) (*envoyauth.CheckResponse, error)
}

// envoyAuthzDesc is envoy.service.auth.v3.Authorization as Envoy's
// generated code declares it (its name, method and file), with keyward's
// slim messages in place of Envoy's: the same bytes on the wire.
var envoyAuthzDesc = grpc.ServiceDesc{
	ServiceName: authv3.Authorization_ServiceDesc.ServiceName,
	HandlerType: (*envoyChecker)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Check", Handler: envoyCheckHandler}},
	Metadata:    authv3.Authorization_ServiceDesc.Metadata,
}

// envoyCheckHandler decodes a CheckRequest and calls Check through the
// server's interceptor, as a generated handler does.
func envoyCheckHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := new(envoyauth.CheckRequest)
	if err := dec(in); err != nil {
		return nil, err
	}
	check := func(ctx context.Context, req any) (any, error) {
		return srv.(envoyChecker).Check(ctx, req.(*envoyauth.CheckRequest))
	}
	if interceptor == nil {
		return check(ctx, in)
	}
	return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: authv3.Authorization_Check_FullMethodName}, check)
}

// envoyCodec is grpc-go's protobuf codec, but for an Envoy CheckRequest,
// whose fields keywardd does not read it discards rather than keeps as
// unknown fields (copying them costs a Check about 0.5 µs, for nothing).
type envoyCodec struct{ encoding.CodecV2 }

// newEnvoyCodec is envoyCodec over grpc-go's protobuf codec.
func newEnvoyCodec() envoyCodec { return envoyCodec{encoding.GetCodecV2(protocodec.Name)} }

// Unmarshal decodes data into v.
func (c envoyCodec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*envoyauth.CheckRequest)
	if !ok {
		return c.CodecV2.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	return proto.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(buf.ReadOnlyData(), r)
}

// envoyAuthz serves envoy.service.auth.v3.Authorization for s.
type envoyAuthz struct{ s *Server }

// Check verifies the API key of the request Envoy describes. A verdict
// is always an answer (OK with Keyward-Key-Id and Keyward-Owner set, or a
// denial with its status, headers and body); a route configured wrongly,
// a caller the policy does not let verify keys, or keywardd unable to
// tell are gRPC errors, which Envoy turns into its status_on_error.
func (e envoyAuthz) Check(ctx context.Context, r *envoyauth.CheckRequest) (*envoyauth.CheckResponse, error) {
	attrs := r.GetAttributes()
	ext := attrs.GetContextExtensions()
	env, _ := pairValue(ext, EnvoyEnvironment)
	perms, _ := pairValue(ext, EnvoyPermission)
	req := &keywardv1.VerifyAPIKeyRequest{Environment: env, Permissions: splitPermissions(perms),
		SourceIp: attrs.GetSource().GetAddress().GetSocketAddress().GetAddress()}
	if req.Environment == "" {
		return nil, fmt.Errorf("%w: Envoy's route names no environment: set %s in its ext_authz check_settings.context_extensions (docs/gateways.md#envoy)",
			errInvalid, EnvoyEnvironment)
	}
	header, _ := pairValue(ext, EnvoyHeader)
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
	if req.Key == "" {
		// Asked all the same, so that it is on record.
		a = gateway.NoKey(header)
	}
	if a.Status == 0 {
		c.detail = "through Envoy's ext_authz Check: passed"
		return &envoyauth.CheckResponse{Status: &envoyauth.Status{Code: int32(codes.OK)},
			HttpResponse: &envoyauth.CheckResponse_OkResponse{OkResponse: &envoyauth.OkHttpResponse{
				// Set over any the client sent: only keyward's reach the service.
				Headers: []*envoyauth.HeaderValueOption{
					headerOption(gateway.HeaderKeyID, v.GetKeyId()), headerOption(gateway.HeaderOwner, v.GetOwner())},
				ResponseHeadersToAdd: headerOptions(a.Header)}}}, nil
	}
	c.detail += fmt.Sprintf(": HTTP %d", a.Status)
	return &envoyauth.CheckResponse{Status: &envoyauth.Status{Code: int32(codes.PermissionDenied), Message: http.StatusText(a.Status)},
		HttpResponse: &envoyauth.CheckResponse_DeniedResponse{DeniedResponse: &envoyauth.DeniedHttpResponse{
			Status: &envoyauth.HttpStatus{Code: int32(a.Status)}, Headers: headerOptions(a.Header), Body: string(a.Body)}}}, nil
}

// pairValue is the value of key among the entries of one of Envoy's
// maps, as the map has it: the last entry of key wins.
func pairValue(ps []*envoyauth.StringPair, key string) (string, bool) {
	for _, p := range slices.Backward(ps) {
		if p.GetKey() == key {
			return p.GetValue(), true
		}
	}
	return "", false
}

// keyFrom is the API key in the request's header name, "" if there is
// none: the Bearer token of an Authorization header, any other header's
// value itself.
func keyFrom(h *envoyauth.HttpRequest, name string) string {
	name = strings.ToLower(name)
	return gateway.KeyOf(name, strings.TrimSpace(headerValue(h, name)))
}

// headerValue is the value of the request's header name (lower case).
// Envoy gives the headers as a map, or as a list when its filter sets
// encode_raw_headers; their names are lower case either way. A header
// sent more than once is, in the map, its values joined by ","; in the
// list, as many entries, which are joined the same way here, so that a
// request's verdict does not depend on the filter's setting (gateway.Key
// takes no key from a joined value).
func headerValue(h *envoyauth.HttpRequest, name string) string {
	if val, ok := pairValue(h.GetHeaders(), name); ok {
		return val
	}
	var vals []string
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if strings.EqualFold(hv.GetKey(), name) {
			val := hv.GetValue()
			if val == "" {
				val = string(hv.GetRawValue())
			}
			vals = append(vals, val)
		}
	}
	return strings.Join(vals, ",")
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

// overwriteIfExistsOrAdd is Envoy's
// HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD.
const overwriteIfExistsOrAdd = int32(corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD)

// headerOption is a header Envoy sets, replacing any of that name.
func headerOption(name, value string) *envoyauth.HeaderValueOption {
	return &envoyauth.HeaderValueOption{Header: &envoyauth.HeaderValue{Key: name, Value: value}, AppendAction: overwriteIfExistsOrAdd}
}

// headerOptions are h's headers as Envoy sets them, in name order.
func headerOptions(h http.Header) []*envoyauth.HeaderValueOption {
	out := make([]*envoyauth.HeaderValueOption, 0, len(h))
	for _, name := range slices.Sorted(maps.Keys(h)) {
		out = append(out, headerOption(name, h.Get(name)))
	}
	return out
}
