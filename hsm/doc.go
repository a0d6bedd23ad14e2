// Package hsm is keyward's one boundary with PKCS#11: it opens a module,
// selects one token, logs in with a PIN read from a file, a systemd
// credential or the environment, and does every key operation inside the
// token. Key material never leaves it.
//
// Keys are named by name and version (KeyID) and created with explicit
// templates: on the token, private (public halves too), sensitive, never
// extractable, not modifiable or copyable, and one purpose only. A key found
// on the token is checked against that before first use; a weaker one
// (extractable, imported or derived, a second purpose, a public half that is
// not its private half's) is refused with ErrWeakKey, and two objects with one
// label are refused with ErrAmbiguous. Only private objects are looked at, so
// a process without the PIN cannot plant anything keyward would use.
//
// Every keyward key on the token is read and checked in one pass when the
// package connects (at Open and after each reconnect), before any call
// runs; keys it creates are added as they are made. A key the cache lacks
// is not on the token, so no use of a key, first or not, existing or not,
// searches the token: a search reads every object (milliseconds at a few
// hundred), and a first use that searched would tell anyone timing
// refused decryptions which key versions exist. So keyward must be the only
// maker of objects under its labels ("keyward/..."): one made by another
// PIN holder while keyward runs is seen at the next start or reconnect
// (unless Config.Shared says the nodes of a fleet share the token: then a
// key the cache lacks is searched for, and the caller asks only for keys
// its authenticated state says exist). A
// cached handle that fails (the object was destroyed or replaced) is looked
// up by label again.
//
// keyward is the only user of the PKCS#11 library in its process (one HSM
// per library): after a re-initialization old handles can name new sessions
// and objects, so sharing the library state is not safe.
//
// Sessions come from a bounded pool (Config.Sessions) with a wait timeout. A
// session that fails is closed, not reused. When one session breaks (lost,
// stuck, or a device error on it), or a call on it says the login or the
// token is gone, the package asks the token on the anchor session, which
// holds the login and runs no operations, whether the login held, and asks
// again (three times in all) while the answer is a failure that may be the
// device's passing fault. If the login held, only that session is gone and
// the call runs once more on another; no other session is touched and
// nobody logs in. When the anchor says the token, the login or the library
// state is lost, or fails every answer, the package drops every session and
// handle and reconnects, and the call is retried once. It reconnects at
// once only after a connection that served a call; a connection lost before
// it served one, or a reconnect that failed, is tried again no sooner than
// Config.ReconnectInterval later, so a token that refuses every call costs
// one login per interval, not one per call. A wrong or locked PIN is never
// retried, and key creation and removal never run twice. PKCS#11 return
// codes are translated in one place (errors.go) to this package's sentinel
// errors.
//
// Why miekg/pkcs11 and not crypto11: crypto11 is the usual Go layer above
// PKCS#11, and keyward's tests use it as an independent client to check that
// keys keyward makes work elsewhere. It does not fit as keyward's own layer:
// its AES-GCM panics on any token error and defaults to 16-byte nonces; it
// has no Ed25519; its session pool takes failed sessions back; Configure
// refuses a library another context initialized, and Close finalizes the
// library under every other context in the process (both seen with crypto11
// v1.6.2 and SoftHSM2 2.6.1), so it cannot share a token with a raw context
// beside it or reconnect without disturbing one; and its key objects hide
// their handles, so every key would be looked up twice. What is left is
// written here on miekg/pkcs11: a session pool, a handle cache, templates,
// and the DER encoding of ECDSA signatures.
package hsm
