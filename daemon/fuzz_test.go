package daemon_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// rpc is one unary method of keyward.v1 and its request type.
type rpc struct {
	path string
	in   protoreflect.MessageType
	out  protoreflect.MessageType
}

// rpcs lists every method keywardd serves, from the services' descriptors.
func rpcs(t testing.TB) []rpc {
	t.Helper()
	var out []rpc
	for _, sd := range []*grpc.ServiceDesc{&keywardv1.KeyService_ServiceDesc, &keywardv1.EnvelopeService_ServiceDesc,
		&keywardv1.StatusService_ServiceDesc, &keywardv1.TokenService_ServiceDesc, &keywardv1.APIKeyService_ServiceDesc,
		&keywardv1.CredentialService_ServiceDesc, &keywardv1.RotationService_ServiceDesc, &keywardv1.CryptoService_ServiceDesc} {
		if len(sd.Streams) > 0 {
			t.Fatalf("%s has streams: FuzzHandlers sends unary calls only", sd.ServiceName)
		}
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(sd.ServiceName))
		if err != nil {
			t.Fatal(err)
		}
		methods := d.(protoreflect.ServiceDescriptor).Methods()
		for i := range methods.Len() {
			m := methods.Get(i)
			in, err := protoregistry.GlobalTypes.FindMessageByName(m.Input().FullName())
			if err != nil {
				t.Fatal(err)
			}
			out2, err := protoregistry.GlobalTypes.FindMessageByName(m.Output().FullName())
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, rpc{path: "/" + sd.ServiceName + "/" + string(m.Name()), in: in, out: out2})
		}
	}
	return out
}

// FuzzHandlers sends arbitrary requests to every method of a keywardd
// running in the test on a real SoftHSM2 token, socket, store and audit
// log, as a caller the policy grants everything. Whatever the request, the
// answer is a status with a message (never UNKNOWN, nor INTERNAL, which
// would be an error keywardd does not explain), no handler panics (that
// would end the process), and keywardd keeps serving.
func FuzzHandlers(f *testing.F) {
	methods := rpcs(f)
	for i, m := range methods {
		// Each method's empty request, and one with its string fields set.
		f.Add(uint8(i), []byte{})
		msg := m.in.New()
		fields := msg.Descriptor().Fields()
		for j := range fields.Len() {
			fd := fields.Get(j)
			if fd.Kind() == protoreflect.StringKind && fd.Cardinality() != protoreflect.Repeated {
				msg.Set(fd, protoreflect.ValueOfString("orders"))
			}
		}
		if b, err := proto.Marshal(msg.Interface()); err == nil {
			f.Add(uint8(i), b)
		}
		// CryptoService's calls, on a signing and an hmac key, with bytes.
		if strings.HasPrefix(m.path, "/keyward.v1.CryptoService/") {
			for _, key := range []string{"sign", "mac"} {
				msg := m.in.New()
				for j := range fields.Len() {
					switch fd := fields.Get(j); {
					case fd.Cardinality() == protoreflect.Repeated:
					case fd.Kind() == protoreflect.StringKind:
						msg.Set(fd, protoreflect.ValueOfString(key))
					case fd.Kind() == protoreflect.BytesKind && fd.ContainingOneof() == nil || fd.Name() == "message":
						msg.Set(fd, protoreflect.ValueOfBytes([]byte("hello")))
					}
				}
				if b, err := proto.Marshal(msg.Interface()); err == nil {
					f.Add(uint8(i), b)
				}
			}
		}
	}
	in := daemontest.Start(f, daemontest.Policy(uidPolicy(allowAll)))
	ctx := context.Background()
	kc := keywardv1.NewKeyServiceClient(in.Conn)
	for _, k := range []struct {
		name    string
		purpose keywardv1.KeyPurpose
	}{{"orders", keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT}, {"sign", keywardv1.KeyPurpose_KEY_PURPOSE_SIGN}, {"mac", keywardv1.KeyPurpose_KEY_PURPOSE_HMAC}} {
		if _, err := kc.CreateKey(ctx, &keywardv1.CreateKeyRequest{Name: k.name, Purpose: k.purpose}); err != nil {
			f.Fatal(err)
		}
	}
	ping := keywardv1.NewStatusServiceClient(in.Conn)
	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		m := methods[int(which)%len(methods)]
		req := m.in.New().Interface()
		if err := proto.Unmarshal(body, req); err != nil {
			return // grpc-go refuses what does not parse before any handler
		}
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		err := in.Conn.Invoke(cctx, m.path, req, m.out.New().Interface())
		if st, ok := status.FromError(err); err != nil {
			switch {
			case !ok:
				t.Fatalf("%s: not a status: %v", m.path, err)
			case st.Code() == codes.Unknown || st.Code() == codes.Internal:
				t.Fatalf("%s(%v): %v %q: an error keywardd does not explain", m.path, req, st.Code(), st.Message())
			case st.Code() == codes.DeadlineExceeded || st.Code() == codes.Canceled:
				t.Fatalf("%s(%v): no answer within 20 s: a handler hangs", m.path, req)
			case st.Code() == codes.DataLoss:
				t.Fatalf("%s(%v): %q: a request damaged the store", m.path, req, st.Message())
			case strings.TrimSpace(st.Message()) == "":
				t.Fatalf("%s: %v without a message", m.path, st.Code())
			}
		}
		if _, err := ping.Ping(ctx, &keywardv1.PingRequest{}); err != nil {
			t.Fatalf("keywardd stopped serving after %s(%v): %v", m.path, req, err)
		}
	})
}
