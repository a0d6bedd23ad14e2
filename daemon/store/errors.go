package store

import "errors"

// ErrDamaged: the store file, or a record in it, is not what keywardd last
// wrote (a damaged disk, an edited file, a torn or swapped page). keywardd
// refuses to serve from it; nothing was changed; docs/operations.md says how
// to restore.
var ErrDamaged = errors.New("store: damaged")

// ErrRolledBack: the store is older than the last write keywardd
// acknowledged (an older copy put in its place, or a newest transaction
// lost). keywardd refuses to serve from it.
var ErrRolledBack = errors.New("store: rolled back")

// ErrUnavailable: a write could not reach the disk (it is full, or fails),
// or the store is closed (ErrClosed). The change was not confirmed: as a
// rule it was not made, but when the sync of its last page failed it may
// have been, and the store then stops serving (Err) until keywardd starts
// again and checks it. Retry later with an update that computes the record
// from what it finds.
var ErrUnavailable = errors.New("store: cannot write")
