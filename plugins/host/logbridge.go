package host

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

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
func newLogBridge(log *slog.Logger, tail *stderrTail, module string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: &logWriter{log: log, tail: tail, module: module}, JSONFormat: true, Level: hclog.Debug, Name: "plugin"})
}

type logWriter struct {
	log    *slog.Logger
	tail   *stderrTail
	module string // the plugin's lines' module: "plugin." and the base name of the command's path

	mu      sync.Mutex // the pace of plain lines
	second  time.Time
	n       int
	dropped int
}

// Plain lines: each cut to plainMax bytes, at most plainPerSecond logged a
// second (the rest counted), so that a chatty plugin cannot flood the log.
const (
	plainMax       = 1024
	plainPerSecond = 20
)

// secretShapes find what a plain line may hold of a secret: a URL's
// password, a name=value or "name": "value" whose name says it is secret.
var secretShapes = []*regexp.Regexp{
	regexp.MustCompile(`(://[^:/@\s]+:)[^@\s]+@`),
	regexp.MustCompile(`(?i)((?:password|passwd|pwd|secret|token|private|api_?key)[\w-]*["']?\s*[:=]\s*["']?)[^\s"',;}&]+`),
}

// scrub is a plain line with what looks like a secret redacted: a plugin
// should never print one, but a library's error may quote one (a DSN).
func scrub(line string) string {
	line = secretShapes[0].ReplaceAllString(line, "${1}[redacted]@")
	return secretShapes[1].ReplaceAllString(line, "${1}[redacted]")
}

// plain logs one of the plugin's plain lines, if the pace allows.
func (w *logWriter) plain(line string) {
	line = scrub(line)
	if len(line) > plainMax {
		line = line[:plainMax] + "..."
	}
	w.tail.add(line)
	now := time.Now()
	w.mu.Lock()
	if now.Sub(w.second) >= time.Second {
		if w.dropped > 0 {
			w.log.Warn("plugin wrote more to standard error than is logged", "lines_not_logged", w.dropped)
		}
		w.second, w.n, w.dropped = now, 0, 0
	}
	w.n++
	ok := w.n <= plainPerSecond
	if !ok {
		w.dropped++
	}
	w.mu.Unlock()
	if ok {
		w.log.Warn("plugin wrote to standard error", "line", line)
	}
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
	line = scrub(line)
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
		if _, fromJSON := m["timestamp"]; module == w.module && !fromJSON {
			// A line the plugin wrote that go-plugin did not read as a
			// log record (go-plugin passes a panic's at error, the others
			// at debug): plain text, or JSON without a level.
			var obj map[string]any
			if json.Unmarshal([]byte(msg), &obj) == nil {
				w.log.Warn("plugin wrote to standard error", "attrs", slog.GroupValue(redacted(obj)...))
				continue
			}
			w.plain(msg)
			continue
		}
		if l, ok := levels[lvl]; !ok || l < slog.LevelInfo {
			continue // go-plugin's own chatter, a plugin's debug lines
		}
		// The plugin's attributes in a group of their own: a plugin cannot
		// pass itself off as another ("plugin") or as keywardd.
		w.log.LogAttrs(context.Background(), levels[lvl], msg, slog.Attr{Key: "attrs", Value: slog.GroupValue(redacted(m)...)})
	}
	return len(b), nil
}

// redacted is a record's attributes but go-plugin's own (@..., timestamp),
// those whose name says they hold a secret redacted, at any depth.
func redacted(m map[string]any) []slog.Attr {
	attrs := []slog.Attr{}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		switch v := m[k]; {
		case strings.HasPrefix(k, "@"), k == "timestamp":
		case sdk.SecretName(k):
			attrs = append(attrs, slog.String(k, "[redacted]"))
		default:
			if sub, ok := v.(map[string]any); ok {
				attrs = append(attrs, slog.Attr{Key: k, Value: slog.GroupValue(redacted(sub)...)})
			} else {
				attrs = append(attrs, slog.Any(k, v))
			}
		}
	}
	return attrs
}
