package sdk

import (
	"log/slog"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// Logger is the plugin's logger. It writes JSON lines to standard error in
// the form go-plugin passes on, so keywardd logs them as its own, tagged with
// the plugin's name; standard output belongs to go-plugin's handshake and
// must never be written. A Secret prints as [redacted], and so does any
// attribute whose name says it holds one (password, secret, token, ...).
func Logger() *slog.Logger { return logger }

var logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug, ReplaceAttr: replaceAttr}))

func replaceAttr(groups []string, a slog.Attr) slog.Attr {
	if len(groups) == 0 {
		switch a.Key {
		case slog.TimeKey:
			return slog.String("@timestamp", a.Value.Time().UTC().Format("2006-01-02T15:04:05.000000Z07:00"))
		case slog.LevelKey:
			return slog.String("@level", strings.ToLower(a.Value.String()))
		case slog.MessageKey:
			return slog.String("@message", a.Value.String())
		}
	}
	if SecretName(a.Key) {
		return slog.String(a.Key, redacted)
	}
	return a
}

// SecretName says whether an attribute's name says it holds a secret.
func SecretName(key string) bool {
	k := strings.ToLower(key)
	for _, s := range []string{"password", "passwd", "pwd", "secret", "token", "private", "apikey", "api_key"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return false
}

// goPluginLogger is go-plugin's own logger on the plugin side: warnings
// and errors, as JSON on standard error.
func goPluginLogger() hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: os.Stderr, JSONFormat: true, Level: hclog.Warn, Name: "go-plugin"})
}
