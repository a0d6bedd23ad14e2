package main

import (
	"fmt"
	"io"
	"os"

	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/hsm"
)

// hsmFlags are the flags that open an HSM token: the PIN comes from a file
// or a variable, never a flag (it would show in the process list).
func hsmFlags(f *flagSet, module string) *hsm.Config {
	var cfg hsm.Config
	f.StringVar(&cfg.Module, "module", "", module)
	f.StringVar(&cfg.Token, "token", "", "label of the token")
	f.StringVar(&cfg.URI, "uri", "", "RFC 7512 PKCS#11 URI of the token, instead of -token (pkcs11:token=...;serial=...)")
	f.StringVar(&cfg.PINFile, "pin-file", "", "file holding the user PIN")
	f.StringVar(&cfg.PINEnv, "pin-env", "", "environment variable holding the user PIN")
	return &cfg
}

// auditReport is audit verify's answer.
type auditReport struct {
	File        string `json:"file"`
	OK          bool   `json:"ok"`
	Records     uint64 `json:"records"`
	Checkpoints uint64 `json:"checkpoints"`
	MACsChecked bool   `json:"macsChecked"` // with the HSM: every checkpoint's MAC was checked
	Unverified  uint64 `json:"unverified"`  // records after the last checkpoint: chained, not yet MACed
	BadLine     uint64 `json:"badLine"`     // the first line that fails, 0 if none
	Problem     string `json:"problem"`     // why
}

// auditVerify checks an audit log's chain, and with the HSM its checkpoint
// MACs, and names the first bad line.
func auditVerify(f *flagSet) action {
	cfg := hsmFlags(f, "PKCS#11 library, to check the checkpoint MACs")
	return func(e *env, args []string) error {
		path := args[0]
		file, err := os.Open(path)
		if err != nil {
			return err
		}
		defer file.Close()
		var mac audit.MACer
		if cfg.Module != "" {
			h, err := hsm.Open(*cfg)
			if err != nil {
				return err
			}
			defer h.Close()
			mac = h
		}
		rep, err := audit.Verify(e.ctx, file, mac)
		if err != nil {
			return err
		}
		out := auditReport{File: path, OK: rep.BadLine == 0 && !rep.TailTooLong, Records: rep.Records, Checkpoints: rep.Checkpoints,
			MACsChecked: mac != nil, Unverified: rep.Unverified, BadLine: rep.BadLine}
		if !out.OK {
			out.Problem = rep.Problem
		}
		if e.output.json() {
			if err := e.printJSON(out); err != nil {
				return err
			}
		}
		switch {
		case rep.BadLine != 0:
			return fmt.Errorf("%s: line %d: %s (%d lines before it hold)", path, rep.BadLine, rep.Problem, rep.BadLine-1)
		case rep.TailTooLong:
			return fmt.Errorf("%s: %s", path, rep.Problem)
		case e.output.json():
			return nil
		}
		return printAuditReport(e.stdout, out)
	}
}

func printAuditReport(w io.Writer, r auditReport) error {
	fmt.Fprintf(w, "%s: %d records and %d checkpoints hold", r.File, r.Records, r.Checkpoints)
	var err error
	switch {
	case !r.MACsChecked:
		_, err = fmt.Fprintln(w, "; the chain is intact, but without -module/-token/-pin-file the checkpoint MACs were not checked")
	case r.Unverified > 0:
		_, err = fmt.Fprintf(w, "; the last %d records follow the last checkpoint and are chained but not yet MACed\n", r.Unverified)
	default:
		_, err = fmt.Fprintln(w, "; every record is covered by a checked MAC")
	}
	return err
}
