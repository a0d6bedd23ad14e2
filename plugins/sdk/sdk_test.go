package sdk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestSecretNeverPrints: however a Secret is printed, its bytes do not show.
func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret([]byte("hunter2-canary"))
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{ReplaceAttr: replaceAttr}))
	log.Info("x", "s", s, "password", "plain-canary", "struct", struct{ S Secret }{s})
	j, _ := json.Marshal(map[string]any{"s": s})
	for _, out := range []string{fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s), fmt.Sprint(struct{ S Secret }{s}),
		string(j), buf.String(), fmt.Errorf("failed with %v", s).Error()} {
		if strings.Contains(out, "hunter2") || strings.Contains(out, "plain-canary") {
			t.Errorf("a secret shows: %s", out)
		}
	}
	if string(s.Reveal()) != "hunter2-canary" || s.Empty() || !NewSecret(nil).Empty() {
		t.Error("Reveal or Empty is wrong")
	}
}

// TestLogFormat: the logger writes the keys go-plugin passes on as levels
// and messages.
func TestLogFormat(t *testing.T) {
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{ReplaceAttr: replaceAttr})).Warn("rotating", "credential", "db")
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if m["@message"] != "rotating" || m["@level"] != "warn" || m["credential"] != "db" || m["@timestamp"] == nil {
		t.Errorf("log line %s", buf.String())
	}
}

func TestToStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("role gone: %w", ErrPermanent), codes.FailedPrecondition},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{status.Error(codes.InvalidArgument, "bad"), codes.InvalidArgument},
		{errors.New("connection refused"), codes.Unavailable},
	} {
		if got := status.Code(toStatus(c.err, nil)); got != c.code {
			t.Errorf("%v: %v, want %v", c.err, got, c.code)
		}
	}
	err := toStatus(errors.New("login with pa55word-canary failed"), []byte("pa55word-canary"))
	if strings.Contains(err.Error(), "pa55word") || !strings.Contains(err.Error(), "[redacted]") {
		t.Errorf("the secret in an error: %v", err)
	}
}

func TestPluginCheck(t *testing.T) {
	for _, p := range []Plugin{{Name: "Bad"}, {Name: "ok"}, {Name: "ok", Revoker: nil, Events: nil}} {
		if p.check() == nil {
			t.Errorf("%+v passed", p)
		}
	}
}
