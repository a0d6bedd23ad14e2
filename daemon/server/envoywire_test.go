package server

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/daemon/api/envoyauth"
)

// TestEnvoyWireDescriptors: each field of keyward's slim messages is the
// field of Envoy's message of the same name (number, wire type,
// cardinality), a list of StringPair standing for a map<string, string>,
// int32 for an enum, and Unread for any message.
func TestEnvoyWireDescriptors(t *testing.T) {
	pairs := []struct{ slim, envoy proto.Message }{
		{&envoyauth.CheckRequest{}, &authv3.CheckRequest{}},
		{&envoyauth.CheckResponse{}, &authv3.CheckResponse{}},
	}
	seen := map[protoreflect.FullName]bool{}
	var walk func(slim, envoy protoreflect.MessageDescriptor)
	walk = func(slim, envoy protoreflect.MessageDescriptor) {
		if seen[slim.FullName()] || slim.Name() == "Unread" {
			return
		}
		seen[slim.FullName()] = true
		if slim.Name() != envoy.Name() && !(slim.Name() == "Status" && envoy.FullName() == "google.rpc.Status") {
			t.Errorf("%s stands for %s", slim.FullName(), envoy.FullName())
		}
		for i := range slim.Fields().Len() {
			sf := slim.Fields().Get(i)
			ef := envoy.Fields().ByNumber(sf.Number())
			if ef == nil || ef.Name() != sf.Name() {
				t.Errorf("%s: field %d is not %s's %s", sf.FullName(), sf.Number(), envoy.FullName(), sf.Name())
				continue
			}
			if ef.IsMap() {
				if sf.Message() == nil || sf.Message().Name() != "StringPair" || !sf.IsList() ||
					ef.MapKey().Kind() != protoreflect.StringKind || ef.MapValue().Kind() != protoreflect.StringKind {
					t.Errorf("%s: %s is a map<string, string>, want a list of StringPair", sf.FullName(), ef.FullName())
				}
				continue
			}
			kind := ef.Kind()
			if kind == protoreflect.EnumKind {
				kind = protoreflect.Int32Kind // the same varint on the wire
			}
			if sf.Kind() != kind || sf.Cardinality() != ef.Cardinality() || (ef.ContainingOneof() == nil) != (sf.ContainingOneof() == nil) {
				t.Errorf("%s is %v %v (oneof %v), Envoy's %v %v (oneof %v)", sf.FullName(), sf.Cardinality(), sf.Kind(), sf.ContainingOneof() != nil,
					ef.Cardinality(), ef.Kind(), ef.ContainingOneof() != nil)
			}
			if sf.Message() != nil {
				walk(sf.Message(), ef.Message())
			}
		}
	}
	for _, p := range pairs {
		walk(p.slim.ProtoReflect().Descriptor(), p.envoy.ProtoReflect().Descriptor())
	}
	if len(seen) < 15 {
		t.Errorf("%d slim messages compared, want all 15 but Unread and StringPair", len(seen))
	}
}

// envoyView is what keywardd reads of a CheckRequest, by Envoy's own
// generated code: the reference the slim messages must match.
type envoyView struct {
	source             string
	headers, ext       map[string]string
	headerMap          []string // key, value, raw value of each
	env, perms, keyHdr string
	key                string
}

// viewOfEnvoy is r's envoyView as Envoy's code reads it.
func viewOfEnvoy(r *authv3.CheckRequest) envoyView {
	a := r.GetAttributes()
	v := envoyView{source: a.GetSource().GetAddress().GetSocketAddress().GetAddress(), headers: a.GetRequest().GetHttp().GetHeaders(),
		ext: a.GetContextExtensions()}
	for _, h := range a.GetRequest().GetHttp().GetHeaderMap().GetHeaders() {
		v.headerMap = append(v.headerMap, h.GetKey(), h.GetValue(), string(h.GetRawValue()))
	}
	v.env, v.perms, v.keyHdr = v.ext[EnvoyEnvironment], v.ext[EnvoyPermission], v.ext[EnvoyHeader]
	name := strings.ToLower(v.keyHdr)
	if name == "" {
		name = "authorization"
	}
	val, ok := v.headers[name]
	if !ok {
		for _, h := range a.GetRequest().GetHttp().GetHeaderMap().GetHeaders() {
			if strings.EqualFold(h.GetKey(), name) {
				if val = h.GetValue(); val == "" {
					val = string(h.GetRawValue())
				}
				break
			}
		}
	}
	v.key = val
	return v
}

// viewOfSlim is r's envoyView as Check reads it.
func viewOfSlim(r *envoyauth.CheckRequest) envoyView {
	a := r.GetAttributes()
	asMap := func(ps []*envoyauth.StringPair) map[string]string {
		m := map[string]string{}
		for _, p := range ps {
			m[p.GetKey()], _ = pairValue(ps, p.GetKey())
		}
		return m
	}
	v := envoyView{source: a.GetSource().GetAddress().GetSocketAddress().GetAddress(), headers: asMap(a.GetRequest().GetHttp().GetHeaders()),
		ext: asMap(a.GetContextExtensions())}
	for _, h := range a.GetRequest().GetHttp().GetHeaderMap().GetHeaders() {
		v.headerMap = append(v.headerMap, h.GetKey(), h.GetValue(), string(h.GetRawValue()))
	}
	v.env, _ = pairValue(a.GetContextExtensions(), EnvoyEnvironment)
	v.perms, _ = pairValue(a.GetContextExtensions(), EnvoyPermission)
	v.keyHdr, _ = pairValue(a.GetContextExtensions(), EnvoyHeader)
	name := strings.ToLower(v.keyHdr)
	if name == "" {
		name = "authorization"
	}
	v.key = headerValue(a.GetRequest().GetHttp(), name)
	return v
}

// equalViews says how a and b differ, "" if they do not.
func equalViews(a, b envoyView) string {
	switch {
	case a.source != b.source:
		return "source " + a.source + " != " + b.source
	case !maps.Equal(a.headers, b.headers):
		return "headers"
	case !maps.Equal(a.ext, b.ext):
		return "context_extensions"
	case !slices.Equal(a.headerMap, b.headerMap):
		return "header_map"
	case a.env != b.env || a.perms != b.perms || a.keyHdr != b.keyHdr:
		return "the route's settings"
	case a.key != b.key:
		return "the key's header " + a.key + " != " + b.key
	}
	return ""
}

// decodeSlim decodes raw as keywardd's server does, through envoyCodec.
func decodeSlim(raw []byte) (*envoyauth.CheckRequest, error) {
	var r envoyauth.CheckRequest
	err := newEnvoyCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(raw)}, &r)
	return &r, err
}

// envoyRequests are CheckRequests as Envoys send them, every field
// keywardd does not read set too.
func envoyRequests() []*authv3.CheckRequest {
	peer := func(addr string, port uint32) *authv3.AttributeContext_Peer {
		return &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: addr, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
			Principal: "spiffe://example/ns/default/sa/client", Labels: map[string]string{"app": "orders"}}
	}
	meta, _ := structpb.NewStruct(map[string]any{"tenant": "a", "tier": 2.0})
	full := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: peer("192.0.2.1", 51234), Destination: peer("10.0.0.5", 8443),
		Request: &authv3.AttributeContext_Request{Time: timestamppb.Now(), Http: &authv3.AttributeContext_HttpRequest{
			Id: "6b1f0c1e", Method: "POST", Path: "/orders/42?x=1", Host: "api.example", Scheme: "https", Query: "x=1", Protocol: "HTTP/2",
			Size: 12, Body: "{\"a\":1}", RawBody: []byte{0, 1, 2},
			Headers: map[string]string{"authorization": "Bearer kw_abc", ":path": "/orders/42", "x-api-key": "kw_def", "cookie": "s=1"}}},
		ContextExtensions: map[string]string{EnvoyEnvironment: "prod", EnvoyPermission: "orders:read, orders:write", EnvoyHeader: "X-API-Key"},
		MetadataContext:   &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.filters.http.jwt_authn": meta}},
		TlsSession:        &authv3.AttributeContext_TLSSession{Sni: "api.example"}}}
	raw := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "2001:db8::1", Protocol: corev3.SocketAddress_TCP}}}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":method", RawValue: []byte("GET")}, {Key: "Authorization", RawValue: []byte("Bearer kw_raw")}, {Key: "x", Value: "y"}}}}},
		ContextExtensions: map[string]string{EnvoyEnvironment: "staging"}}}
	pipe := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/run/envoy.sock"}}}}}}
	return []*authv3.CheckRequest{full, raw, pipe, {}, {Attributes: &authv3.AttributeContext{}}}
}

// TestEnvoyWireRequest: what an Envoy sends, encoded by Envoy's code,
// decodes through keywardd's codec into the slim CheckRequest with what
// keywardd reads intact, and nothing else kept.
func TestEnvoyWireRequest(t *testing.T) {
	for i, r := range envoyRequests() {
		raw, err := proto.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		slim, err := decodeSlim(raw)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if diff := equalViews(viewOfEnvoy(r), viewOfSlim(slim)); diff != "" {
			t.Errorf("request %d: the slim message's %s differ from Envoy's", i, diff)
		}
		// Nothing unread is kept: re-encoded, the slim message is what
		// keywardd reads alone.
		again, err := proto.Marshal(slim)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 && len(again) >= len(raw)*2/3 {
			t.Errorf("the slim request re-encodes to %d of Envoy's %d bytes: unread fields were kept", len(again), len(raw))
		}
		var kept int
		var count func(m protoreflect.Message)
		count = func(m protoreflect.Message) {
			kept += len(m.GetUnknown())
			m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
				switch {
				case fd.IsList() && fd.Message() != nil:
					for j := range v.List().Len() {
						count(v.List().Get(j).Message())
					}
				case fd.Message() != nil:
					count(v.Message())
				}
				return true
			})
		}
		count(slim.ProtoReflect())
		if kept != 0 {
			t.Errorf("request %d: %d bytes of unknown fields kept", i, kept)
		}
	}
	// Every other message decodes whole, as grpc-go's codec has it.
	want := envoyRequests()[0]
	raw, err := proto.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var other authv3.CheckRequest
	if err := newEnvoyCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(raw)}, &other); err != nil || !proto.Equal(&other, want) {
		t.Errorf("envoyCodec decoding Envoy's own CheckRequest: %v, %v", &other, err)
	}
}

// TestEnvoyWireResponse: the answers Check builds, encoded, are Envoy's
// CheckResponse with the same content, field for field, and Envoy's
// encoding of that decodes back into the same slim answer.
func TestEnvoyWireResponse(t *testing.T) {
	hdr := http.Header{}
	hdr.Set("Retry-After", "7")
	hdr.Set("Content-Type", "application/json")
	envoyOption := func(name, value string) *corev3.HeaderValueOption {
		return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: name, Value: value}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}
	}
	for _, c := range []struct {
		name  string
		slim  *envoyauth.CheckResponse
		envoy *authv3.CheckResponse
	}{
		{"passed",
			&envoyauth.CheckResponse{Status: &envoyauth.Status{}, HttpResponse: &envoyauth.CheckResponse_OkResponse{OkResponse: &envoyauth.OkHttpResponse{
				Headers:              []*envoyauth.HeaderValueOption{headerOption("Keyward-Key-Id", "ak_1"), headerOption("Keyward-Owner", "team-a")},
				ResponseHeadersToAdd: headerOptions(http.Header{"Ratelimit-Limit": {"10"}})}}},
			&authv3.CheckResponse{Status: &rpcstatus.Status{}, HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
				Headers:              []*corev3.HeaderValueOption{envoyOption("Keyward-Key-Id", "ak_1"), envoyOption("Keyward-Owner", "team-a")},
				ResponseHeadersToAdd: []*corev3.HeaderValueOption{envoyOption("Ratelimit-Limit", "10")}}}}},
		{"denied",
			&envoyauth.CheckResponse{Status: &envoyauth.Status{Code: 7, Message: "Too Many Requests"}, HttpResponse: &envoyauth.CheckResponse_DeniedResponse{
				DeniedResponse: &envoyauth.DeniedHttpResponse{Status: &envoyauth.HttpStatus{Code: 429}, Headers: headerOptions(hdr), Body: "{\"error\":\"x\"}\n"}}},
			&authv3.CheckResponse{Status: &rpcstatus.Status{Code: 7, Message: "Too Many Requests"}, HttpResponse: &authv3.CheckResponse_DeniedResponse{
				DeniedResponse: &authv3.DeniedHttpResponse{Status: &typev3.HttpStatus{Code: typev3.StatusCode_TooManyRequests},
					Headers: []*corev3.HeaderValueOption{envoyOption("Content-Type", "application/json"), envoyOption("Retry-After", "7")},
					Body:    "{\"error\":\"x\"}\n"}}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			raw, err := proto.Marshal(c.slim)
			if err != nil {
				t.Fatal(err)
			}
			var got authv3.CheckResponse
			if err := proto.Unmarshal(raw, &got); err != nil {
				t.Fatalf("Envoy's CheckResponse refuses keywardd's: %v", err)
			}
			if !proto.Equal(&got, c.envoy) {
				t.Errorf("Envoy reads\n%v\nwant\n%v", &got, c.envoy)
			}
			if err := got.ValidateAll(); err != nil {
				t.Errorf("Envoy's validation refuses keywardd's answer: %v", err)
			}
			back, err := proto.Marshal(c.envoy)
			if err != nil {
				t.Fatal(err)
			}
			var slim envoyauth.CheckResponse
			if err := proto.Unmarshal(back, &slim); err != nil || !proto.Equal(&slim, c.slim) || len(slim.ProtoReflect().GetUnknown()) != 0 {
				t.Errorf("Envoy's answer read as keyward's: %v, %v", &slim, err)
			}
		})
	}
}

// FuzzEnvoyWire decodes arbitrary bytes with Envoy's generated
// CheckRequest and with keywardd's slim one (through its codec): where
// Envoy's code accepts them, the slim decoder does too and reads the same
// source, headers, header list, route settings and key header; where the
// slim decoder refuses them, so does Envoy's code.
func FuzzEnvoyWire(f *testing.F) {
	for _, r := range envoyRequests() {
		raw, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var full authv3.CheckRequest
		fullErr := proto.Unmarshal(raw, &full)
		slim, slimErr := decodeSlim(raw)
		switch {
		case fullErr == nil && slimErr != nil:
			t.Fatalf("Envoy's code reads %x, the slim decoder refuses it: %v", raw, slimErr)
		case fullErr != nil:
			return // the slim decoder skips what it does not read unchecked
		}
		if diff := equalViews(viewOfEnvoy(&full), viewOfSlim(slim)); diff != "" {
			t.Fatalf("%x: the slim message's %s differ from Envoy's", raw, diff)
		}
	})
}

// BenchmarkEnvoyDecode decodes an Envoy's CheckRequest, with the key's
// header alone and with ten, by Envoy's generated code and by keywardd's
// codec into the slim message.
func BenchmarkEnvoyDecode(b *testing.B) {
	for _, n := range []int{1, 10} {
		{
			r := envoyRequests()[0]
			h := r.Attributes.Request.Http
			h.Headers = map[string]string{"authorization": "Bearer kw_0123456789abcdef0123456789abcdef0123456789"}
			if n == 10 {
				maps.Copy(h.Headers, map[string]string{":authority": "api.example", ":method": "GET", ":path": "/orders/42", ":scheme": "https",
					"accept": "application/json", "user-agent": "curl/8.5.0", "x-request-id": "6b1f0c1e-0a4d-4f5e-9d1c-2a3b4c5d6e7f",
					"x-forwarded-proto": "https", "cookie": "session=0123456789abcdef0123456789abcdef"})
			}
			raw, err := proto.Marshal(r)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(fmt.Sprintf("envoy/headers=%d", n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					var m authv3.CheckRequest
					if err := proto.Unmarshal(raw, &m); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(fmt.Sprintf("slim/headers=%d", n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := decodeSlim(raw); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
