package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/keyward/keyward/daemon/api/client"
)

// watchCommand prints keywardd's watch stream as it comes, a line per
// event (NDJSON with --output json), reconnecting from the last cursor;
// the last cursor goes to standard error when it stops, to resume with.
func watchCommand(f *flagSet) action {
	cursor := f.String("cursor", "", "resume after this cursor (as printed)")
	oldest := f.Bool("from-oldest", false, "without -cursor: every event keywardd still keeps, not only those from now on")
	kinds := f.StringSlice("kind", nil, "only these kinds (repeatable): api_key, api_key_disabled, token, key_version_created, ... (docs/events.md)")
	return func(e *env, _ []string) error {
		last := *cursor
		err := e.api.Watch(e.ctx, client.WatchOptions{Cursor: *cursor, FromOldest: *oldest, Kinds: *kinds}, func(ch client.Change) error {
			last = ch.Cursor
			switch {
			case ch.Lost:
				fmt.Fprintf(e.stderr, "the stream broke (%v): connecting again from %s\n", ch.Err, or(ch.Cursor, "where it started"))
			case ch.Start:
				fmt.Fprintf(e.stderr, "watching from %s\n", ch.Cursor)
			case ch.Progress:
				// Only the cursor moved.
			case ch.Resync:
				if e.output.json() {
					return writeLine(e.stdout, map[string]any{"cursor": ch.Cursor, "resync": map[string]string{"reason": ch.Reason}})
				}
				_, err := fmt.Fprintf(e.stdout, "RESYNC %s: %s\n", ch.Cursor, ch.Reason)
				return err
			default:
				ev := ch.Event
				if e.output.json() {
					b, err := protojson.Marshal(ev)
					if err != nil {
						return err
					}
					return writeLine(e.stdout, map[string]any{"cursor": ch.Cursor, "event": json.RawMessage(b)})
				}
				_, err := fmt.Fprintf(e.stdout, "%s %s %s %s %s %s\n", ev.GetTime().AsTime().Format(time.RFC3339Nano), ch.Cursor,
					ev.GetKind(), ev.GetId(), or(ev.GetSubject(), "-"), ev.GetDetail())
				return err
			}
			return nil
		})
		if errors.Is(err, context.Canceled) {
			if last != "" {
				fmt.Fprintf(e.stderr, "stopped; resume with: keyward watch -cursor %s\n", last)
			}
			return nil
		}
		return err
	}
}

// writeLine writes v as one line of JSON.
func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// or is s, or def when s is empty.
func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
