//go:build race

package procenv

// raceEnabled: this test binary has the race detector.
const raceEnabled = true
