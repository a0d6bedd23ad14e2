//go:build !race

// The race detector makes sync.Pool drop what it is given, so this counts
// nothing useful under -race.

package store

import "testing"

// TestCheckAllocs: a record's check (its tag and its share of the digest),
// which the start-up check runs for every record, makes no allocation.
func TestCheckAllocs(t *testing.T) {
	s, err := newSealer(make([]byte, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	g := newDigester(s)
	bucket, key := []byte(BucketAPIKeys), []byte("0123456789abcdef0123")
	v, _ := s.seal(bucket, key, make([]byte, 350))
	g.check(bucket, key, v) // the pool's first macs
	if n := testing.AllocsPerRun(1000, func() { g.check(bucket, key, v) }); n != 0 {
		t.Fatalf("a record's check makes %v allocations", n)
	}
}
