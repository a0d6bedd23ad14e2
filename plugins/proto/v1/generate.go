// Package pluginv1 is the keyward plugin protocol, keyward.plugin.v1, spoken
// between keywardd (plugins/host) and a plugin (plugins/sdk) over
// hashicorp/go-plugin's gRPC transport: plugin.proto beside this file is
// the reference (docs/plugins.md explains it), and the Go code is generated
// from it with buf and protoc-gen-go / protoc-gen-go-grpc, pinned as tools
// in go.mod.
package pluginv1

//go:generate go tool buf generate
//go:generate go tool buf lint
