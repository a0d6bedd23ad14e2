package server_test

import (
	"context"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	refv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/keyward/keyward/softhsm-test/daemontest"
)

// TestReflectionAndHealthUnderEnvoyCodec: with envoyCodec forced on
// the whole server, reflection still lists Envoy's service and describes
// it with Envoy's own file (the wire a client must speak), and health
// answers. (Expected to pass: a check that the codec changed nothing.)
func TestReflectionAndHealthUnderEnvoyCodec(t *testing.T) {
	in := daemontest.Start(t, daemontest.Policy(gatewayPolicy(`["*"]`, `["*"]`)))
	ctx := context.Background()
	hr, err := healthpb.NewHealthClient(in.Conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v, %v", hr, err)
	}
	st, err := refv1.NewServerReflectionClient(in.Conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&refv1.ServerReflectionRequest{MessageRequest: &refv1.ServerReflectionRequest_FileContainingSymbol{
		FileContainingSymbol: authv3.Authorization_ServiceDesc.ServiceName}}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	files := resp.GetFileDescriptorResponse().GetFileDescriptorProto()
	if len(files) == 0 {
		t.Fatalf("reflection: %v", resp)
	}
	var fd descriptorpb.FileDescriptorProto
	if err := proto.Unmarshal(files[0], &fd); err != nil {
		t.Fatal(err)
	}
	if fd.GetName() != authv3.Authorization_ServiceDesc.Metadata {
		t.Errorf("reflection describes %s with %s", authv3.Authorization_ServiceDesc.ServiceName, fd.GetName())
	}
}
