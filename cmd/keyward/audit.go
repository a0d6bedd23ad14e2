package main

import (
	"fmt"
	"os"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/hsm"
)

// auditVerify checks an audit log's chain, and with the HSM its checkpoint
// MACs, and names the first bad line.
func auditVerify(e *env, args []string) error {
	if len(args) == 0 || args[0] == "" || args[0][0] == '-' {
		return usageError{"audit verify needs the log file first: keyward audit verify FILE [-module ... -token ... -pin-file ...]"}
	}
	path := args[0]
	fs := newFlags("audit verify")
	var cfg hsm.Config
	fs.StringVar(&cfg.Module, "module", "", "PKCS#11 library, to check the checkpoint MACs")
	fs.StringVar(&cfg.Token, "token", "", "token label")
	fs.StringVar(&cfg.URI, "uri", "", "PKCS#11 URI of the token")
	fs.StringVar(&cfg.PINFile, "pin-file", "", "file holding the user PIN")
	fs.StringVar(&cfg.PINEnv, "pin-env", "", "variable holding the user PIN")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var mac audit.MACer
	if cfg.Module != "" {
		h, err := hsm.Open(cfg)
		if err != nil {
			return err
		}
		defer h.Close()
		mac = h
	}
	rep, err := audit.Verify(e.ctx, f, mac)
	if err != nil {
		return err
	}
	if rep.BadLine != 0 {
		return fmt.Errorf("%s: line %d: %s (%d lines before it hold)", path, rep.BadLine, rep.Problem, rep.BadLine-1)
	}
	if rep.TailTooLong {
		return fmt.Errorf("%s: %s", path, rep.Problem)
	}
	fmt.Fprintf(e.stdout, "%s: %d records and %d checkpoints hold", path, rep.Records, rep.Checkpoints)
	switch {
	case mac == nil:
		fmt.Fprintln(e.stdout, "; the chain is intact, but without -module/-token/-pin-file the checkpoint MACs were not checked")
	case rep.Unverified > 0:
		fmt.Fprintf(e.stdout, "; the last %d records follow the last checkpoint and are chained but not yet MACed\n", rep.Unverified)
	default:
		fmt.Fprintln(e.stdout, "; every record is covered by a checked MAC")
	}
	return nil
}
