package pluginv1

import (
	"encoding/hex"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/softhsm-test/golden"
)

// wireVector is one golden message of keyward.plugin.v1: its type and its
// bytes on the wire, as keywardd sends them to a plugin (the revocations
// and notices, the rotation steps) or a plugin answers.
type wireVector struct {
	Name    string `json:"name"`
	Message string `json:"message"`
	Wire    string `json:"wire_hex"`
}

type goldenMessage struct {
	name string
	msg  proto.Message
}

// goldenMessages are fixed messages: a RevokeRequest for every event kind
// as plugins/host's Deliver builds it from an outbox event, every rotation
// step's request, and a plugin's answers.
func goldenMessages() []goldenMessage {
	at := timestamppb.New(time.Date(2026, 11, 29, 12, 0, 1, 250_000_000, time.UTC))
	op := "evt-00000000000000000042-9f86d081884c7d65"
	cred := &Credential{Name: "db-main", Config: []byte(`{"role":"app","database":"orders"}`)}
	out := []goldenMessage{}
	for _, e := range []*Event{
		{Kind: EventKind_EVENT_KIND_API_KEY_REVOKED, Id: "ak_000102030405060708090a0b", Subject: "team-a", Time: at},
		{Kind: EventKind_EVENT_KIND_TOKEN_REVOKED, Id: "AAECAwQFBgcICQoLDA0ODw", Subject: "uid:1000", Time: at},
		{Kind: EventKind_EVENT_KIND_KEY_VERSION_REVOKED, Id: "payments/v3", Subject: "payments", Time: at},
		{Kind: EventKind_EVENT_KIND_CREDENTIAL_REVOKED, Id: "db-main", Subject: "db-main", Time: at},
		{Kind: EventKind_EVENT_KIND_ROTATION_DUE, Id: "api_key/ak_000102030405060708090a0b", Subject: "team-a", Time: at,
			Detail: "policy every 90 days; due 2026-12-01T00:00:00Z"},
		{Kind: EventKind_EVENT_KIND_ANOMALY, Id: "ak_000102030405060708090a0b", Subject: "team-a", Time: at,
			Detail: "1 200 requests a minute against a baseline of 40; keywardd disabled the key"},
		{Kind: EventKind_EVENT_KIND_KEY_VERSION_RETIRED, Id: "payments/v3", Subject: "payments", Time: at},
		{Kind: EventKind_EVENT_KIND_API_KEY_LEAKED, Id: "ak_000102030405060708090a0b", Subject: "team-a", Time: at,
			Detail: "found by github:content at https://github.com/o/r/blob/1/.env: the key's current secret; keywardd revoked the key"},
	} {
		out = append(out, goldenMessage{"revoke " + strings.ToLower(strings.TrimPrefix(e.Kind.String(), "EVENT_KIND_")), &RevokeRequest{OperationId: op, Event: e}})
	}
	return append(out,
		goldenMessage{"describe", &DescribeRequest{}},
		goldenMessage{"describe answer", &DescribeResponse{Name: "postgres", Version: "1.4.0",
			Capabilities: []Capability{Capability_CAPABILITY_ROTATOR, Capability_CAPABILITY_REVOKER},
			Events:       []EventKind{EventKind_EVENT_KIND_CREDENTIAL_REVOKED, EventKind_EVENT_KIND_API_KEY_REVOKED},
			Secret:       &SecretSpec{Length: 40, Alphabet: "abcdefghijklmnopqrstuvwxyz0123456789", PluginGenerates: false}}},
		goldenMessage{"check config", &CheckConfigRequest{Credential: cred}},
		goldenMessage{"create, first rotation", &CreateRequest{OperationId: "rot-db-main-1", Credential: cred, Secret: []byte("s3cr3t-0123456789abcdefghijklmnop")}},
		goldenMessage{"create", &CreateRequest{OperationId: "rot-db-main-2", Credential: cred, Secret: []byte("s3cr3t-qrstuvwxyz"), CurrentHandle: "app_1"}},
		goldenMessage{"create answer, the plugin's own secret", &CreateResponse{Handle: "app_2", Secret: []byte("made-by-the-plugin")}},
		goldenMessage{"test", &TestRequest{OperationId: "rot-db-main-2", Credential: cred, Handle: "app_2", Secret: []byte("s3cr3t-qrstuvwxyz")}},
		goldenMessage{"activate", &ActivateRequest{OperationId: "rot-db-main-2", Credential: cred, Handle: "app_2", PreviousHandle: "app_1"}},
		goldenMessage{"retire", &RetireRequest{OperationId: "rot-db-main-2", Credential: cred, Handle: "app_1"}},
	)
}

// TestGolden: every golden message encodes to testdata/golden.json's bytes
// with today's generated code, and those bytes decode to the message, with
// no field left unknown. A change here is a change of the plugin protocol:
// plugins built with an older SDK read these bytes.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	msgs := goldenMessages()
	var made []wireVector
	for _, m := range msgs {
		b, err := proto.Marshal(m.msg)
		if err != nil {
			t.Fatal(err)
		}
		made = append(made, wireVector{Name: m.name, Message: string(m.msg.ProtoReflect().Descriptor().FullName()), Wire: hex.EncodeToString(b)})
	}
	vectors := golden.JSON(t, path, made)
	if len(vectors) != len(made) {
		t.Fatalf("%s holds %d messages, the test makes %d (go test -update rewrites it)", path, len(vectors), len(made))
	}
	for i, v := range vectors {
		t.Run(v.Name, func(t *testing.T) {
			m := msgs[i].msg
			if made[i].Name != v.Name || made[i].Message != v.Message {
				t.Fatalf("vector %d is %s %q, the test makes %s %q", i+1, v.Message, v.Name, made[i].Message, made[i].Name)
			}
			wire, _ := hex.DecodeString(v.Wire)
			if made[i].Wire != v.Wire {
				t.Errorf("the plugin protocol changed: %s (%s) fields %s:\n got %s\nwant %s\n(a change in %s is a protocol change; go test -update rewrites it)",
					v.Message, v.Name, changedFields(m.ProtoReflect().Descriptor(), made[i].Wire, v.Wire), made[i].Wire, v.Wire, path)
			}
			back := m.ProtoReflect().New().Interface()
			if err := proto.Unmarshal(wire, back); err != nil {
				t.Fatalf("today's code does not decode the golden %s: %v", v.Message, err)
			}
			if len(unknown(back.ProtoReflect())) > 0 || !proto.Equal(back, m) {
				t.Fatalf("the golden %s decodes as\n%v\nnot\n%v (unknown fields: %x)", v.Message, back, m, unknown(back.ProtoReflect()))
			}
		})
	}
}

// unknown is the bytes of every field the decoder did not know, in m and
// the messages it holds.
func unknown(m protoreflect.Message) []byte {
	out := slices.Clone([]byte(m.GetUnknown()))
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap() {
			out = append(out, unknown(v.Message())...)
		}
		return true
	})
	return out
}

// changedFields names the fields (by their names in plugin.proto, nested
// ones as event.time.seconds) whose encoding differs between two wire
// forms of a message.
func changedFields(desc protoreflect.MessageDescriptor, gotHex, wantHex string) string {
	got, _ := hex.DecodeString(gotHex)
	want, _ := hex.DecodeString(wantHex)
	g, w := fieldsOf(desc, got, ""), fieldsOf(desc, want, "")
	var out []string
	for name, v := range g {
		if w[name] != v {
			out = append(out, name)
		}
	}
	for name := range w {
		if _, ok := g[name]; !ok {
			out = append(out, name+" (gone)")
		}
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}

// fieldsOf reads a message's wire form into its fields' raw encodings, by
// name (a field of a number plugin.proto does not have is "field N").
func fieldsOf(desc protoreflect.MessageDescriptor, b []byte, prefix string) map[string]string {
	out := map[string]string{}
	for seen := map[string]int{}; len(b) > 0; {
		num, typ, n := protowire.ConsumeField(b)
		if n < 0 {
			out[prefix+"(not protobuf)"] = hex.EncodeToString(b)
			return out
		}
		name := fmt.Sprintf("field %d", num)
		fd := desc.Fields().ByNumber(num)
		if fd != nil {
			name = string(fd.Name())
		}
		if seen[name]++; seen[name] > 1 {
			name = fmt.Sprintf("%s[%d]", name, seen[name]-1)
		}
		if fd != nil && fd.Kind() == protoreflect.MessageKind && typ == protowire.BytesType {
			inner, _ := protowire.ConsumeBytes(b[protowire.SizeTag(num):n])
			for k, v := range fieldsOf(fd.Message(), inner, prefix+name+".") {
				out[k] = v
			}
		} else {
			out[prefix+name] = hex.EncodeToString(b[:n])
		}
		b = b[n:]
	}
	return out
}
