package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/hsm"
)

func hsmCheck(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("keyward hsm check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg hsm.Config
	fs.StringVar(&cfg.Module, "module", "", "absolute path of the PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
	fs.StringVar(&cfg.Token, "token", "", "label of the token")
	fs.StringVar(&cfg.URI, "uri", "", "RFC 7512 PKCS#11 URI of the token, instead of -token (pkcs11:token=...;serial=...)")
	fs.StringVar(&cfg.PINFile, "pin-file", "", "file holding the user PIN")
	fs.StringVar(&cfg.PINEnv, "pin-env", "", "environment variable holding the user PIN")
	output := fs.String("output", "text", "text or json")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: keyward hsm check -module PATH (-token LABEL | -uri URI) (-pin-file FILE | -pin-env VAR)\n\nThe PIN is never a flag: it would show in the process list.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 || (*output != "text" && *output != "json") {
		fs.Usage()
		return 2
	}
	h, err := hsm.Open(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "keyward:", err)
		return 1
	}
	defer h.Close()
	steps, err := h.SelfCheck(ctx)
	tok := h.Token()
	if *output == "json" {
		type step struct {
			Name   string  `json:"name"`
			Millis float64 `json:"ms"`
		}
		out := struct {
			Token  hsm.TokenInfo `json:"token"`
			OK     bool          `json:"ok"`
			Error  string        `json:"error,omitempty"`
			Steps  []step        `json:"steps"`
			Module string        `json:"module"`
		}{Token: tok, OK: err == nil, Module: cfg.Module, Steps: []step{}}
		if err != nil {
			out.Error = err.Error()
		}
		for _, s := range steps {
			out.Steps = append(out.Steps, step{s.Name, float64(s.Duration) / float64(time.Millisecond)})
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if encErr := enc.Encode(out); encErr != nil {
			err = errors.Join(err, encErr)
		}
	} else {
		fmt.Fprintf(stdout, "token %q (serial %s, %s %s) in slot %d\n", tok.Label, tok.Serial, tok.Manufacturer, tok.Model, tok.Slot)
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		for _, s := range steps {
			fmt.Fprintf(tw, "  ok\t%s\t%.2f ms\n", s.Name, float64(s.Duration)/float64(time.Millisecond))
		}
		tw.Flush()
		if err == nil {
			fmt.Fprintln(stdout, "the token does everything keyward needs")
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "keyward:", err)
		return 1
	}
	return 0
}
