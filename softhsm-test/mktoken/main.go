// Command mktoken makes a SoftHSM2 token in a directory of the caller's
// choosing. It is the engine of softhsm-test/create-token; see there.
package main

import (
	"flag"
	"fmt"
	"os"

	softhsmtest "github.com/keyward/keyward/softhsm-test"
)

func main() { os.Exit(run()) }

func run() int {
	dir := flag.String("dir", "", "directory for softhsm2.conf, tokens/ and the PIN files (required)")
	label := flag.String("label", "keyward-dev", "token label")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: mktoken -dir DIR [-label LABEL]\n\nPINs come from KEYWARD_SO_PIN and KEYWARD_USER_PIN, or are random.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *dir == "" || flag.NArg() > 0 {
		flag.Usage()
		return 2
	}
	tok, err := softhsmtest.Prepare(*dir, *label, os.Getenv("KEYWARD_SO_PIN"), os.Getenv("KEYWARD_USER_PIN"))
	if err == nil {
		os.Setenv("SOFTHSM2_CONF", tok.Conf)
		err = tok.Init()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mktoken:", err)
		return 1
	}
	fmt.Printf("SOFTHSM2_CONF=%s\nmodule=%s\ntoken=%s\nserial=%s\npin_file=%s\n", tok.Conf, tok.Module, tok.Label, tok.Serial, tok.PINFile)
	return 0
}
