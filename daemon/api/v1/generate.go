// Package keywardv1 is keyward's gRPC API, keyward.v1: the .proto files
// beside this file are the reference, and the Go code is generated from them
// with buf and protoc-gen-go / protoc-gen-go-grpc, pinned as tools in go.mod.
package keywardv1

//go:generate go tool buf generate
//go:generate go tool buf lint
