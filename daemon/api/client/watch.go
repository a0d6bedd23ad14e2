package client

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// Change is one item of keywardd's watch stream, as Watch hands it on.
type Change struct {
	// Cursor is where the stream is once this item is taken: keep the last
	// one to resume from (WatchOptions.Cursor) after a restart.
	Cursor string
	// Event is the change, unless Start or Resync.
	Event *keywardv1.Event
	// Start: the stream is open (again) from Cursor; nothing after it is
	// missed from here on. It comes first, and again after a reconnect.
	Start bool
	// Resync: events may have been missed before this point (Reason says
	// why): drop what is cached and read it again.
	Resync bool
	Reason string
	// Progress: nothing to see up to Cursor; only the cursor moved.
	Progress bool
	// Lost: the stream broke (Err says why); Watch connects again and
	// goes on from the last cursor. Changes may happen meanwhile: a cache
	// must not answer from what it holds until the next Start.
	Lost bool
	Err  error
}

// WatchOptions say where a watch starts and what it wants.
type WatchOptions struct {
	// Cursor to resume after (a Change's); empty: from now.
	Cursor string
	// FromOldest, without a Cursor: every event keywardd still keeps.
	FromOldest bool
	// Kinds: only these (empty: every kind the caller may see).
	Kinds []string
}

// Watch follows keywardd's watch stream (EventService.Watch) until ctx
// ends or fn returns an error, handing fn every change in order. It
// connects again after a broken stream, with backoff, from the last
// cursor, telling fn (Lost, then Start). It returns fn's error, ctx's, or
// a refusal no reconnect can cure (the policy, a bad cursor).
func (c *Client) Watch(ctx context.Context, o WatchOptions, fn func(Change) error) error {
	cursor := o.Cursor
	backoff := time.Duration(0)
	for {
		ferr, err := c.watchOnce(ctx, cursor, o, func(ch Change) error {
			backoff = 0
			cursor = ch.Cursor
			return fn(ch)
		})
		switch {
		case ferr != nil:
			return ferr
		case ctx.Err() != nil:
			return ctx.Err()
		}
		var ke *Error
		if errors.As(err, &ke) {
			switch {
			case ke.Code == codes.PermissionDenied, ke.Code == codes.Unauthenticated, ke.Code == codes.InvalidArgument,
				ke.Code == codes.Unimplemented, ke.Code == codes.ResourceExhausted && !ke.Limited: // too many streams
				return err
			}
		}
		if ferr := fn(Change{Cursor: cursor, Lost: true, Err: err}); ferr != nil {
			return ferr
		}
		backoff = min(max(2*backoff, 100*time.Millisecond), 10*time.Second)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// watchOnce is one stream: fn's error, or why the stream ended (always an
// *Error).
func (c *Client) watchOnce(ctx context.Context, cursor string, o WatchOptions, fn func(Change) error) (fnErr, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	broken := func(err error) error {
		var e *Error
		if w := Wrap(err); errors.As(w, &e) {
			return e
		}
		return &Error{Code: codes.Unavailable, Message: "the watch stream ended: " + err.Error()}
	}
	st, err := keywardv1.NewEventServiceClient(c.conn).Watch(ctx, &keywardv1.WatchRequest{Cursor: cursor, FromOldest: o.FromOldest && cursor == "", Kinds: o.Kinds})
	if err != nil {
		return nil, broken(err)
	}
	for {
		r, err := st.Recv()
		if err != nil {
			return nil, broken(err)
		}
		ch := Change{Cursor: r.GetCursor()}
		switch {
		case r.GetEvent() != nil:
			ch.Event = r.GetEvent()
		case r.GetResync() != nil:
			ch.Resync, ch.Reason = true, r.GetResync().GetReason()
		case r.GetProgress() != nil:
			ch.Progress = true
		default:
			ch.Start = true
		}
		if err := fn(ch); err != nil {
			return err, nil
		}
	}
}
