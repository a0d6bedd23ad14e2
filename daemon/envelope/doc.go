// Package envelope is keyward's envelope encryption: data keys generated
// fresh and returned once in plaintext and once sealed under a root key in the
// HSM, small messages sealed directly, and rewrapping under the newest key
// version. Every ciphertext carries the key name and version it was sealed
// under, and is bound to the caller's encryption context: the header and the
// canonical context are AES-GCM's additional authenticated data.
//
// The wire format is written down in docs/formats.md and pinned by golden
// vectors in testdata/.
package envelope
