package host

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"

	"github.com/keyward/keyward/plugins/sdk"
)

// newLogBridge is the hclog.Logger go-plugin logs to (its own lines and
// every line the plugin writes to standard error): hclog writes JSON, and
// logWriter turns each line into a record of keywardd's slog logger,
// already tagged with the plugin's name. An attribute whose name says it
// holds a secret is redacted here too, whatever the plugin did.
//
// A plugin's plain lines (not the SDK's JSON: an interpreter's traceback, a
// print) go-plugin hands on at its debug level, with nothing but the line:
// the logger takes debug, and logWriter tells them from go-plugin's own
// debug lines by their module (plugin.NAME, where go-plugin's are plugin)
// and from a JSON line's by the timestamp go-plugin adds to those. They are
// logged as warnings, and the last of them kept in tail, for the error of a
// plugin that dies before its handshake.
func newLogBridge(log *slog.Logger, tail *stderrTail) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: &logWriter{log: log, tail: tail}, JSONFormat: true, Level: hclog.Debug, Name: "plugin"})
}

type logWriter struct {
	log  *slog.Logger
	tail *stderrTail
}

// stderrTail keeps a plugin's last plain lines on standard error.
type stderrTail struct {
	mu    sync.Mutex
	lines []string
}

// Lines of a plugin's standard error kept, and how much of each.
const (
	tailLines   = 8
	tailLineMax = 300
)

func (t *stderrTail) add(line string) {
	if len(line) > tailLineMax {
		line = line[:tailLineMax] + "..."
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == tailLines {
		t.lines = t.lines[1:]
	}
	t.lines = append(t.lines, line)
}

// String is the lines kept, "" if none.
func (t *stderrTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, " | ")
}

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
		module, _ := m["@module"].(string)
		if _, fromJSON := m["timestamp"]; strings.HasPrefix(module, "plugin.") && !fromJSON {
			// A plain line the plugin wrote (go-plugin passes a panic's at
			// error, the others at debug).
			w.tail.add(msg)
			w.log.Warn("plugin wrote to standard error", "line", msg)
			continue
		}
		if l, ok := levels[lvl]; !ok || l < slog.LevelInfo {
			continue // go-plugin's own chatter, a plugin's debug lines
		}
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
