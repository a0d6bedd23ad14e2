package host

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/keyward/keyward/plugins/sdk"
)

// newLogBridge is the hclog.Logger go-plugin logs to (its own lines and
// every line the plugin writes to standard error): hclog writes JSON, and
// logWriter turns each line into a record of keywardd's slog logger,
// already tagged with the plugin's name. An attribute whose name says it
// holds a secret is redacted here too, whatever the plugin did.
func newLogBridge(log *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: &logWriter{log: log}, JSONFormat: true, Level: hclog.Info, Name: "plugin"})
}

type logWriter struct{ log *slog.Logger }

var levels = map[string]slog.Level{"trace": slog.LevelDebug - 4, "debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}

func (w *logWriter) Write(b []byte) (int, error) {
	for line := range bytes.Lines(b) {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			w.log.Info(strings.TrimSpace(string(line)))
			continue
		}
		msg, _ := m["@message"].(string)
		lvl, _ := m["@level"].(string)
		attrs := []slog.Attr{}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			switch {
			case strings.HasPrefix(k, "@"), k == "timestamp":
			case sdk.SecretName(k):
				attrs = append(attrs, slog.String(k, "[redacted]"))
			default:
				attrs = append(attrs, slog.Any(k, m[k]))
			}
		}
		// The plugin's attributes in a group of their own: a plugin cannot
		// pass itself off as another ("plugin") or as keywardd.
		w.log.LogAttrs(context.Background(), levels[lvl], msg, slog.Attr{Key: "attrs", Value: slog.GroupValue(attrs...)})
	}
	return len(b), nil
}
