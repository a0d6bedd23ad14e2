// Package envoyauth is keyward's own copy of the part of Envoy's external
// authorization messages (envoy.service.auth.v3.CheckRequest and
// CheckResponse) that keywardd reads and writes: the same field numbers
// and wire types, only the fields keywardd uses. A CheckRequest an Envoy
// sends decodes into it with every other field skipped (and, through
// keywardd's codec, discarded), and the CheckResponse keywardd encodes
// from it is one Envoy decodes as its own.
//
// Why a copy, not Envoy's generated code (go-control-plane), which
// keywardd's tests still use to talk to it: that builds every nested
// message, map, timestamp and metadata struct Envoy sends, 3.9 µs to 14 µs
// a CheckRequest, against 1.5 µs to 2.4 µs for this copy
// (docs/performance.md#the-gateway-path-envoys-check). Envoy's maps are
// lists of StringPair here: the same bytes, no Go map to build. The
// .proto beside this file is the reference, and the Go code is generated
// from it with buf and protoc-gen-go, as keyward.v1's is;
// daemon/server/envoywire_test.go checks the wire compatibility against
// Envoy's generated types, field by field and by fuzzing.
package envoyauth

//go:generate go tool buf generate
//go:generate go tool buf lint
