package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/hsm"
)

// hsmReport is hsm check's answer.
type hsmReport struct {
	Module string `json:"module"`
	Token  struct {
		Label        string `json:"label"`
		Serial       string `json:"serial"`
		Manufacturer string `json:"manufacturer"`
		Model        string `json:"model"`
		Slot         uint   `json:"slot"`
	} `json:"token"`
	OK    bool      `json:"ok"`
	Error string    `json:"error"`
	Steps []hsmStep `json:"steps"`
}

type hsmStep struct {
	Name   string  `json:"name"`
	Millis float64 `json:"ms"`
}

// hsmCheck opens a token as keywardd would and tries everything keyward
// needs of it, timing each step.
func hsmCheck(f *flagSet) action {
	cfg := hsmFlags(f, "absolute path of the PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
	return func(e *env, _ []string) error {
		h, err := hsm.Open(*cfg)
		if err != nil {
			return err
		}
		defer h.Close()
		steps, err := h.SelfCheck(e.ctx)
		tok := h.Token()
		out := hsmReport{Module: cfg.Module, OK: err == nil, Steps: []hsmStep{}}
		out.Token.Label, out.Token.Serial, out.Token.Manufacturer, out.Token.Model, out.Token.Slot = tok.Label, tok.Serial, tok.Manufacturer, tok.Model, tok.Slot
		if err != nil {
			out.Error = err.Error()
		}
		for _, s := range steps {
			out.Steps = append(out.Steps, hsmStep{s.Name, float64(s.Duration) / float64(time.Millisecond)})
		}
		if perr := e.show(out, func(w io.Writer) error { return printHSMReport(w, out) }); perr != nil && err == nil {
			err = perr
		}
		return err
	}
}

func printHSMReport(w io.Writer, r hsmReport) error {
	fmt.Fprintf(w, "token %q (serial %s, %s %s) in slot %d\n", r.Token.Label, r.Token.Serial, r.Token.Manufacturer, r.Token.Model, r.Token.Slot)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, s := range r.Steps {
		fmt.Fprintf(tw, "  ok\t%s\t%.2f ms\n", s.Name, s.Millis)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.OK {
		_, err := fmt.Fprintln(w, "the token does everything keyward needs")
		return err
	}
	return nil
}
