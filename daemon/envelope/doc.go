// Package envelope is keyward's envelope encryption: data keys generated
// fresh and returned once in plaintext and once sealed under a root key in the
// HSM, small messages sealed directly, and rewrapping under the newest key
// version. Every ciphertext carries the key name and version it was sealed
// under, and is bound to the caller's encryption context: the header and the
// canonical context are AES-GCM's additional authenticated data.
//
// Every failure to open a ciphertext matches ErrNotOpened and keeps its
// specific reason, which says which keys and versions exist and in what
// state: the API layer decides who may read it. With a decoy key, a
// ciphertext naming a key or version that cannot decrypt costs the HSM the
// same work as one whose tag fails, so the time of the answer does not say
// which it was.
//
// The wire format is written down in docs/formats.md and pinned by golden
// vectors in testdata/.
package envelope
