// Package leaks takes reports of leaked API keys from secret scanners: an
// HTTP intake that speaks GitHub's secret scanning partner protocol (a
// JSON list of found tokens, signed with ECDSA P-256 by a key of the
// scanner's published keys document; the answer labels each token a true
// or false positive). Each token goes to daemon/apikeys' ReportLeak, which
// stops a key whose secret it is, with its plugin event, in one store
// transaction; the intake then audits it. Reports from anywhere else come
// through APIKeyService.ReportLeak (keyward apikey report-leak).
//
// What the headers alone condemn (the method, the signature's headers, an
// identifier not in Keys) is refused before the body is read. At most
// MaxInFlight requests read and handle a body at once, so bodies never
// hold more than MaxInFlight × MaxBody bytes; one more is answered 503.
// The signature is verified before the body is parsed or anything is
// looked up. A report whose signature verifies is never refused by a
// rate limit: the limits on refused requests, by source address and
// overall, only turn their answer into 429 and keep them out of the log
// (Intake.refuse), so garbage from
// anywhere (or through the scanner's own proxy) can neither lock the
// scanner out nor flood the log. A report handled within the replay
// window is answered from memory, not handled again: the scanner retries,
// and ECDSA signatures are randomized, so the key is the body's SHA-256,
// looked up only once the signature verified. No token is ever logged or
// audited: a key's ID stands for it once found.
//
// Written here: the protocol is a signed JSON list; crypto/ecdsa,
// encoding/json and golang.org/x/time/rate do the work, and no library of
// the protocol is kept well enough to take its dependencies.
package leaks
