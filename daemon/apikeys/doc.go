// Package apikeys is keyward's API keys: their format and checksum
// (format.go), the decision a verification makes (check.go), the Manager
// that issues, verifies, lists, updates, rotates and revokes them
// (manager.go), and their usage by hour, outcome and source network
// (usage.go).
//
// Written here because no library does what keyward needs of them: the
// store holds only HMAC-SHA256 of each key under a key that never leaves the
// HSM (the pepper), so a copied store gives no working key, and a local
// digest cache keeps the HSM off the path of a key already seen. The rate
// limits are daemon/ratelimit's (GCRA, all layers or none).
package apikeys
