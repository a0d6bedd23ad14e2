// Package leaks takes reports of leaked API keys from secret scanners: an
// HTTP intake that speaks GitHub's secret scanning partner protocol (a
// JSON list of found tokens, signed with ECDSA P-256 by a key of the
// scanner's published keys document; the answer labels each token a true
// or false positive). Each token goes to daemon/apikeys' ReportLeak, which
// stops a key whose secret it is, with its plugin event, in one store
// transaction; the intake then audits it. Reports from anywhere else come
// through APIKeyService.ReportLeak (keyward apikey report-leak).
//
// The signature is verified before the body is parsed or anything is
// looked up; requests that fail before or at it are rate limited by
// source address and overall, so unsigned garbage costs little and cannot
// crowd out the scanner for long. A report handled within the replay
// window is answered from memory, not handled again: the scanner retries,
// and ECDSA signatures are randomized, so the key is the body's SHA-256,
// looked up only once the signature verified. No token is ever logged or
// audited: a key's ID stands for it once found.
//
// Written here: the protocol is a signed JSON list; crypto/ecdsa,
// encoding/json and golang.org/x/time/rate do the work, and no library of
// the protocol is kept well enough to take its dependencies.
package leaks
