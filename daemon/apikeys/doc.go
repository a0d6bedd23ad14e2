// Package apikeys is keyward's API keys: their format and checksum
// (format.go), the decision a verification makes (check.go), the Manager
// that issues, verifies, lists, updates, rotates and revokes them
// (manager.go), their usage by hour, outcome, source network and latency
// (usage.go, latency.go), and reports of leaked secrets (leaks.go:
// ReportLeak stops the key whose secret was found, with its events, in one
// store transaction).
//
// Written here because no library does what keyward needs of them: the
// store holds only HMAC-SHA256 of each key under a key that never leaves the
// HSM (the pepper), so a copied store gives no working key, and a local
// digest cache keeps the HSM off the path of a key already seen. The rate
// limits are daemon/ratelimit's (GCRA, all layers or none). The latency
// histogram is a fixed array of counters, not a metrics library's: it is
// part of each key's stored hour and merged with it across flushes and
// nodes, and a Prometheus histogram must never carry a key as a label.
package apikeys
