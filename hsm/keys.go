package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"encoding/asn1"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// Algorithm is the kind of a key and its one purpose.
type Algorithm int

const (
	// AES256GCM is an AES-256 key-encryption key: AES-GCM encrypt and
	// decrypt inside the token, nothing else (no wrap, no sign, no derive).
	AES256GCM Algorithm = iota + 1
	// HMACSHA256 is a 256-bit generic secret used only to compute HMAC-SHA256.
	HMACSHA256
	// ECDSAP256 is an ECDSA key pair on NIST P-256, used only to sign.
	ECDSAP256
	// ECDSAP384 is an ECDSA key pair on NIST P-384, used only to sign.
	ECDSAP384
	// Ed25519 is an EdDSA key pair on edwards25519, used only to sign.
	Ed25519
	// HMACSHA384 is a 384-bit generic secret used only to compute
	// HMAC-SHA384. (Added last: the numbers of the others do not move.)
	HMACSHA384
)

var algNames = map[Algorithm]string{
	AES256GCM:  "aes256-gcm",
	HMACSHA256: "hmac-sha256",
	ECDSAP256:  "ecdsa-p256",
	ECDSAP384:  "ecdsa-p384",
	Ed25519:    "ed25519",
	HMACSHA384: "hmac-sha384",
}

func (a Algorithm) String() string {
	if n, ok := algNames[a]; ok {
		return n
	}
	return "Algorithm(" + strconv.Itoa(int(a)) + ")"
}

// ParseAlgorithm reads an algorithm name as String writes it.
func ParseAlgorithm(s string) (Algorithm, error) {
	for a, n := range algNames {
		if n == s {
			return a, nil
		}
	}
	return 0, fmt.Errorf("hsm: unknown algorithm %q; use aes256-gcm, hmac-sha256, hmac-sha384, ecdsa-p256, ecdsa-p384 or ed25519", s)
}

// PKCS#11 3.0 names that github.com/miekg/pkcs11 v1.1 lacks.
const (
	ckkECEdwards           = 0x40
	ckmECEdwardsKeyPairGen = 0x1055
	ckmEdDSA               = 0x1057
)

var (
	oidP256    = mustOID(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7})
	oidP384    = mustOID(asn1.ObjectIdentifier{1, 3, 132, 0, 34})
	oidEd25519 = mustOID(asn1.ObjectIdentifier{1, 3, 101, 112})
	// PKCS#11 3.0 also names the curve by a PrintableString; SoftHSM2
	// stores Ed25519 parameters that way whatever it was given.
	nameEd25519 = mustOID(asn1.RawValue{Tag: asn1.TagPrintableString, Bytes: []byte("edwards25519")})
)

func mustOID(v any) []byte {
	b, err := asn1.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// spec is what a key of an algorithm is on the token: its type, how it is
// made, and its one purpose.
type spec struct {
	class   uint     // CKO_SECRET_KEY, or CKO_PRIVATE_KEY for a pair
	keyType uint     // CKK_*
	bytes   int      // CKA_VALUE_LEN of a secret key
	params  [][]byte // CKA_EC_PARAMS of a pair: the first is used to create, any is accepted
	genMech uint
	usage   uint // the one usage attribute (CKA_ENCRYPT stands for encrypt+decrypt)
}

var specs = map[Algorithm]spec{
	AES256GCM:  {pkcs11.CKO_SECRET_KEY, pkcs11.CKK_AES, 32, nil, pkcs11.CKM_AES_KEY_GEN, pkcs11.CKA_ENCRYPT},
	HMACSHA256: {pkcs11.CKO_SECRET_KEY, pkcs11.CKK_GENERIC_SECRET, 32, nil, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKA_SIGN},
	ECDSAP256:  {pkcs11.CKO_PRIVATE_KEY, pkcs11.CKK_EC, 0, [][]byte{oidP256}, pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKA_SIGN},
	ECDSAP384:  {pkcs11.CKO_PRIVATE_KEY, pkcs11.CKK_EC, 0, [][]byte{oidP384}, pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKA_SIGN},
	Ed25519:    {pkcs11.CKO_PRIVATE_KEY, ckkECEdwards, 0, [][]byte{oidEd25519, nameEd25519}, ckmECEdwardsKeyPairGen, pkcs11.CKA_SIGN},
	HMACSHA384: {pkcs11.CKO_SECRET_KEY, pkcs11.CKK_GENERIC_SECRET, 48, nil, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKA_SIGN},
}

// The usage attributes each object class has. A keyward key has exactly its
// purpose's attributes true and every other one false.
var usageAttrs = map[uint][]uint{
	pkcs11.CKO_SECRET_KEY:  {pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE},
	pkcs11.CKO_PRIVATE_KEY: {pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE},
	pkcs11.CKO_PUBLIC_KEY:  {pkcs11.CKA_ENCRYPT, pkcs11.CKA_VERIFY, pkcs11.CKA_VERIFY_RECOVER, pkcs11.CKA_WRAP, pkcs11.CKA_DERIVE},
}

// granted lists which usage attributes a purpose turns on in a class.
func granted(class, usage uint) map[uint]bool {
	switch {
	case class == pkcs11.CKO_SECRET_KEY && usage == pkcs11.CKA_ENCRYPT:
		return map[uint]bool{pkcs11.CKA_ENCRYPT: true, pkcs11.CKA_DECRYPT: true}
	case class == pkcs11.CKO_PUBLIC_KEY:
		return map[uint]bool{pkcs11.CKA_VERIFY: true}
	}
	return map[uint]bool{usage: true}
}

// KeyID names one version of a key. On the token its objects carry the
// label "keyward/NAME/vVERSION".
type KeyID struct {
	Name    string
	Version uint32
}

var keyName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (k KeyID) String() string { return fmt.Sprintf("%q v%d", k.Name, k.Version) }

func (k KeyID) label() string {
	return "keyward/" + k.Name + "/v" + strconv.FormatUint(uint64(k.Version), 10)
}

// Check says whether the name and version can name a key: names are 1 to 64
// letters, digits, '.', '_' or '-', starting with a letter or digit;
// versions start at 1.
func (k KeyID) Check() error {
	if !keyName.MatchString(k.Name) {
		return fmt.Errorf("key name %q is not allowed: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", k.Name)
	}
	if k.Version == 0 {
		return fmt.Errorf("key %q: versions start at 1", k.Name)
	}
	return nil
}

type keyRef struct {
	label string
	class uint
}

// keyEntry is a key found, checked and cached for the current login: its
// handle, or why keyward refuses it (err), or stale when its handle failed
// and it must be looked up by label again.
type keyEntry struct {
	handle pkcs11.ObjectHandle
	alg    Algorithm
	public crypto.PublicKey // for key pairs
	err    error            // keyward refuses the key: weak, ambiguous, of another kind
	stale  bool
}

// protection is what every keyward secret or private key is: on the token,
// private, sensitive, never extractable, its attributes fixed, not copyable.
func protection() []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false),
	}
}

// usageTemplate sets every usage attribute of class: the purpose's true,
// the rest false, so that no token default can add a second purpose.
func usageTemplate(class, usage uint) []*pkcs11.Attribute {
	on := granted(class, usage)
	var t []*pkcs11.Attribute
	for _, a := range usageAttrs[class] {
		t = append(t, pkcs11.NewAttribute(a, on[a]))
	}
	return t
}

// CreateKey generates a key inside the token with an explicit template: on
// the token, private, sensitive, not extractable, one purpose. It refuses a
// name and version that exist already (versions are never reused), and reads
// the new key's attributes back, so a token that ignored part of the
// template is caught (the key is then destroyed and ErrWeakKey returned).
// Unlike other calls it is not retried after a lost connection, since the key
// may have been made: ask again, and ErrKeyExists then says it was.
func (h *HSM) CreateKey(ctx context.Context, id KeyID, alg Algorithm) error {
	sp, ok := specs[alg]
	if !ok {
		return &Error{Op: "create key", Key: id.String(), Err: ErrMechanismUnsupported, Detail: fmt.Sprintf("unknown algorithm %v", alg)}
	}
	if err := id.Check(); err != nil {
		return &Error{Op: "create key", Err: ErrInvalidInput, Detail: err.Error()}
	}
	h.createMu.Lock()
	defer h.createMu.Unlock()
	label := id.label()
	return h.doOnce(ctx, "create key", id.String(), func(s pkcs11.SessionHandle) error {
		existing, err := h.findObjects(s, ours(label), 1)
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			return &Error{Err: ErrKeyExists, Detail: "versions are never reused; create the next version instead"}
		}
		created, err := h.generate(s, sp, label)
		if err != nil {
			return err
		}
		e, err := h.resolve(s, id, sp.class)
		if err == nil && e.alg != alg {
			err = &Error{Err: ErrWeakKey, Detail: fmt.Sprintf("the token made a %v key where %v was asked for", e.alg, alg)}
		}
		if err != nil {
			for _, o := range created {
				_ = h.mod.ctx.DestroyObject(s, o)
			}
			h.forget(id)
			return err
		}
		return nil
	})
}

// generate makes a key of spec sp under label inside the token, with
// keyward's explicit templates, and returns its objects (the private half
// first for a pair).
func (h *HSM) generate(s pkcs11.SessionHandle, sp spec, label string) ([]pkcs11.ObjectHandle, error) {
	naming := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	}
	var created []pkcs11.ObjectHandle
	if sp.class == pkcs11.CKO_SECRET_KEY {
		t := append(naming,
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, sp.keyType),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, sp.bytes))
		t = append(append(t, protection()...), usageTemplate(sp.class, sp.usage)...)
		k, err := h.mod.ctx.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(sp.genMech, nil)}, t)
		if err != nil {
			return nil, err
		}
		created = append(created, k)
	} else {
		pub := append(naming[:len(naming):len(naming)],
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, sp.keyType),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, sp.params[0]),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), // unseen, so unchangeable, without the PIN
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false))
		pub = append(pub, usageTemplate(pkcs11.CKO_PUBLIC_KEY, pkcs11.CKA_VERIFY)...)
		priv := append(naming[:len(naming):len(naming)],
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, sp.keyType))
		priv = append(append(priv, protection()...), usageTemplate(sp.class, sp.usage)...)
		pk, sk, err := h.mod.ctx.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(sp.genMech, nil)}, pub, priv)
		if err != nil {
			return nil, err
		}
		created = append(created, sk, pk)
	}
	return created, nil
}

// DestroyKey removes a key (both halves of a pair) from the token.
func (h *HSM) DestroyKey(ctx context.Context, id KeyID) error {
	if err := id.Check(); err != nil {
		return &Error{Op: "destroy key", Err: ErrInvalidInput, Detail: err.Error()}
	}
	return h.doOnce(ctx, "destroy key", id.String(), func(s pkcs11.SessionHandle) error {
		objs, err := h.findObjects(s, ours(id.label()), 3)
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return ErrKeyNotFound
		}
		h.forget(id)
		for _, o := range objs {
			if err := h.mod.ctx.DestroyObject(s, o); err != nil {
				return err
			}
		}
		return nil
	})
}

// forget drops id from the cache: it is no longer on the token.
func (h *HSM) forget(id KeyID) {
	h.keysMu.Lock()
	for _, c := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY} {
		delete(h.keys, keyRef{id.label(), c})
	}
	h.keysMu.Unlock()
}

// lookAgain marks the cached key ref stale, so that its next use looks it
// up by label: its handle failed (CKR_KEY_HANDLE_INVALID), as when someone
// destroyed or replaced the object. was is the entry whose handle failed;
// an entry cached since is left alone.
func (h *HSM) lookAgain(ref keyRef, was *keyEntry) {
	h.keysMu.Lock()
	if h.keys[ref] == was {
		h.keys[ref] = &keyEntry{stale: true}
	}
	h.keysMu.Unlock()
}

// ours is the search template for keyward's objects under a label. Only
// private objects count: they can be made only by a holder of the PIN, so a
// process without it cannot plant an object that keyward would use, or that
// would make a keyward key ambiguous.
func ours(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
	}
}

// findBatch is how many handles one C_FindObjects asks for when a search
// reads every match.
const findBatch = 1024

// findObjects returns up to max objects matching tmpl (pass max > 1 to
// tell one from several), or every match if max is 0.
func (h *HSM) findObjects(s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	ctx := h.mod.ctx
	if err := ctx.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	var err error
	for {
		n := max - len(all)
		if max == 0 {
			n = findBatch
		}
		var objs []pkcs11.ObjectHandle
		objs, _, err = ctx.FindObjects(s, n)
		all = append(all, objs...)
		// A token may return fewer than asked before the end; only an
		// empty answer ends a search for every match.
		if err != nil || max != 0 || len(objs) == 0 {
			break
		}
	}
	if ferr := ctx.FindObjectsFinal(s); err == nil {
		err = ferr
	}
	return all, err
}

// key returns the checked key of id, of the given class, from the cache.
// The cache holds every keyward key on the token (loadKeys), so a key it
// lacks is not there, and the answer takes no search either way: a search
// reads every object on the token (milliseconds at a few hundred), and a
// first use that searched would tell a caller timing Decrypt that a
// version exists. A key whose handle failed since (stale), or any key
// while the connection is being given up, is looked up by label; so is a
// key the cache lacks on a token other processes make keys on too
// (Config.Shared).
func (h *HSM) key(s pkcs11.SessionHandle, id KeyID, class uint) (*keyEntry, error) {
	ref := keyRef{id.label(), class}
	h.keysMu.RLock()
	e, complete := h.keys[ref], h.complete
	h.keysMu.RUnlock()
	switch {
	case e == nil && complete && !h.set.shared:
		return nil, &Error{Err: ErrKeyNotFound}
	case e == nil || e.stale:
		return h.resolve(s, id, class)
	case e.err != nil:
		return nil, e.err
	}
	return e, nil
}

// resolve finds the objects of id and class by label, checks them
// (checkObjects) and caches the key; a key that is gone leaves the cache.
// keyward uses it for a key it has just made and for a stale handle.
func (h *HSM) resolve(s pkcs11.SessionHandle, id KeyID, class uint) (*keyEntry, error) {
	label := id.label()
	find := func(class uint) ([]pkcs11.ObjectHandle, error) {
		return h.findObjects(s, append(ours(label), pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)), 2)
	}
	objs, err := find(class)
	var pubs []pkcs11.ObjectHandle
	if err == nil && len(objs) > 0 && class == pkcs11.CKO_PRIVATE_KEY {
		pubs, err = find(pkcs11.CKO_PUBLIC_KEY)
	}
	if err == nil && (len(objs) == 0 || class == pkcs11.CKO_PRIVATE_KEY && len(pubs) == 0) {
		err = h.loggedIn(s)
	}
	if err != nil {
		return nil, err
	}
	e, err := h.checkObjects(s, label, class, objs, pubs)
	ref := keyRef{label, class}
	h.keysMu.Lock()
	switch {
	case err == nil:
		h.keys[ref] = e
	case len(objs) == 0:
		delete(h.keys, ref)
	}
	h.keysMu.Unlock()
	return e, err
}

// loggedIn says whether session s still holds the login: private objects
// vanish from a session that lost it, and a search that finds none of them
// must tell a lost login (to reconnect) from a missing key.
func (h *HSM) loggedIn(s pkcs11.SessionHandle) error {
	info, err := h.mod.ctx.GetSessionInfo(s)
	switch {
	case err != nil:
		return err
	case info.State != pkcs11.CKS_RW_USER_FUNCTIONS:
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

// checkObjects makes the entry of the key of class under label from the
// objects found there: exactly one of the class, whose attributes keyward
// checks (checkKey), and for a private key exactly one public half, of the
// same kind, that verifies a signature of the private half (provePair).
// Two objects with the same label are an error, never "take the first".
func (h *HSM) checkObjects(s pkcs11.SessionHandle, label string, class uint, objs, pubs []pkcs11.ObjectHandle) (*keyEntry, error) {
	one := func(objs []pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
		switch len(objs) {
		case 0:
			return 0, &Error{Err: ErrKeyNotFound}
		case 1:
			return objs[0], nil
		}
		return 0, &Error{Err: ErrAmbiguous, Detail: fmt.Sprintf("several objects carry the label %q; remove the extra ones with the token's tools", label)}
	}
	obj, err := one(objs)
	if err != nil {
		return nil, err
	}
	e := &keyEntry{handle: obj}
	for tries := 1; ; tries++ {
		e.alg, err = h.checkKey(s, obj, class)
		// On a token other processes write (Config.Shared), a key found as
		// another process makes it may not have all its attributes yet
		// (SoftHSM2's file store sets them one by one): read it again
		// before calling it weak.
		if err == nil || !h.set.shared || tries == checkTries || !errors.Is(err, ErrWeakKey) && !errors.Is(err, ErrWrongAlgorithm) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	if class == pkcs11.CKO_PRIVATE_KEY {
		pubObj, err := one(pubs)
		if err != nil {
			return nil, fmt.Errorf("public half: %w", err)
		}
		if e.public, err = h.publicKey(s, pubObj, e.alg); err != nil {
			return nil, err
		}
		if err := h.provePair(s, e); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// loadKeys reads every keyward key on the token in one pass: one search
// for the private objects (the only ones keyward looks at, see ours), one
// read of each one's label and class, and for each label of the form
// "keyward/NAME/vVERSION" the checks of checkObjects. It runs at connect,
// before any call, so that the cache is complete: a key keyward does not
// hold is not on the token, and no lookup needs a search. A key keyward
// refuses is cached with the reason; a key whose object vanished during
// the load is looked up again on use. It fails only if the token does
// (a lost login included), and the connection fails with it.
//
// Each step is tried again, up to checkTries times in all, after a
// doubtful answer (again), so that a device's passing faults, which a load
// of thousands of reads is sure to meet, do not fail the connection.
func (h *HSM) loadKeys(s pkcs11.SessionHandle) (map[keyRef]*keyEntry, error) {
	var objs []pkcs11.ObjectHandle
	err := again(func() (err error) {
		objs, err = h.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true)}, 0)
		return err
	})
	if err == nil {
		err = again(func() error { return h.loggedIn(s) })
	}
	if err != nil {
		return nil, err
	}
	type object struct {
		h     pkcs11.ObjectHandle
		class uint
	}
	byLabel := map[string][]object{}
	for _, o := range objs {
		var attrs []*pkcs11.Attribute
		err := again(func() (err error) {
			attrs, err = h.mod.ctx.GetAttributeValue(s, o, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil),
			})
			return err
		})
		// An object destroyed since the search fails the load like any
		// other error (the next connection loads again): skipping it could
		// leave out a key that is there. On a token other processes make
		// and destroy keys on (Config.Shared), that is how it goes, and a
		// key left out is looked up when it is asked for.
		switch {
		case errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)):
			continue // not a storage object: it has no label
		case h.set.shared && classify(err) == classHandle:
			continue
		case err != nil:
			return nil, err
		}
		if label := string(attrs[0].Value); isKeyLabel(label) {
			byLabel[label] = append(byLabel[label], object{o, ulong(attrs[1].Value)})
		}
	}
	keys := map[keyRef]*keyEntry{}
	for label, found := range byLabel {
		of := func(class uint) []pkcs11.ObjectHandle {
			var out []pkcs11.ObjectHandle
			for _, o := range found {
				if o.class == class {
					out = append(out, o.h)
				}
			}
			return out
		}
		for _, class := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY} {
			if len(of(class)) == 0 {
				continue
			}
			var e *keyEntry
			err := again(func() (err error) {
				e, err = h.checkObjects(s, label, class, of(class), of(pkcs11.CKO_PUBLIC_KEY))
				return err
			})
			var code pkcs11.Error
			switch {
			case err == nil:
			case !errors.As(err, &code) || classify(err) == classInput:
				e = &keyEntry{err: err} // keyward's verdict on the key, or the token's refusal to use it so
			case classify(err) == classHandle:
				e = &keyEntry{stale: true}
			default:
				return nil, err
			}
			keys[keyRef{label, class}] = e
		}
	}
	return keys, nil
}

// again runs fn, and runs it again, up to checkTries times in all, while it
// fails in a way that may be a passing fault of the device (classBroken).
// fn must be safe to repeat.
func again(fn func() error) error {
	var err error
	for range checkTries {
		err = fn()
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)) {
			// An attribute's size changed between the two calls that read
			// it: another process rewrote the object (SoftHSM2's file
			// store, a shared token). Read again.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if classify(err) != classBroken {
			break
		}
	}
	return err
}

// isKeyLabel says whether label is one KeyID.label makes: the only labels
// keyward ever looks up.
func isKeyLabel(label string) bool {
	rest, ok := strings.CutPrefix(label, "keyward/")
	i := strings.LastIndex(rest, "/v")
	if !ok || i < 0 {
		return false
	}
	v, err := strconv.ParseUint(rest[i+2:], 10, 32)
	id := KeyID{rest[:i], uint32(v)}
	return err == nil && id.Check() == nil && id.label() == label
}

// checkKey reads a key's attributes and returns its algorithm, or
// ErrWeakKey naming every attribute that falls short.
func (h *HSM) checkKey(s pkcs11.SessionHandle, obj pkcs11.ObjectHandle, class uint) (Algorithm, error) {
	// CKA_LOCAL: generated in this token, not imported or derived (a derived
	// key inherits ALWAYS_SENSITIVE and NEVER_EXTRACTABLE from its base,
	// whose holder can derive it again). MODIFIABLE and COPYABLE false: no
	// one can give it a second purpose or a weaker copy later.
	flags := []uint{pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_NEVER_EXTRACTABLE,
		pkcs11.CKA_LOCAL, pkcs11.CKA_MODIFIABLE, pkcs11.CKA_COPYABLE}
	want := map[uint]bool{pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_ALWAYS_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_NEVER_EXTRACTABLE: true,
		pkcs11.CKA_LOCAL: true, pkcs11.CKA_MODIFIABLE: false, pkcs11.CKA_COPYABLE: false}
	names := map[uint]string{
		pkcs11.CKA_LOCAL: "CKA_LOCAL", pkcs11.CKA_MODIFIABLE: "CKA_MODIFIABLE", pkcs11.CKA_COPYABLE: "CKA_COPYABLE",
		pkcs11.CKA_TOKEN: "CKA_TOKEN", pkcs11.CKA_PRIVATE: "CKA_PRIVATE", pkcs11.CKA_SENSITIVE: "CKA_SENSITIVE", pkcs11.CKA_ALWAYS_SENSITIVE: "CKA_ALWAYS_SENSITIVE",
		pkcs11.CKA_EXTRACTABLE: "CKA_EXTRACTABLE", pkcs11.CKA_NEVER_EXTRACTABLE: "CKA_NEVER_EXTRACTABLE",
		pkcs11.CKA_ENCRYPT: "CKA_ENCRYPT", pkcs11.CKA_DECRYPT: "CKA_DECRYPT", pkcs11.CKA_SIGN: "CKA_SIGN", pkcs11.CKA_VERIFY: "CKA_VERIFY",
		pkcs11.CKA_WRAP: "CKA_WRAP", pkcs11.CKA_UNWRAP: "CKA_UNWRAP", pkcs11.CKA_DERIVE: "CKA_DERIVE", pkcs11.CKA_SIGN_RECOVER: "CKA_SIGN_RECOVER",
	}
	usage := usageAttrs[class]
	tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)}
	for _, a := range append(flags, usage...) {
		tmpl = append(tmpl, pkcs11.NewAttribute(a, nil))
	}
	if class == pkcs11.CKO_SECRET_KEY {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil))
	} else {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil))
	}
	attrs, err := h.mod.ctx.GetAttributeValue(s, obj, tmpl)
	if err != nil {
		return 0, err
	}
	got := map[uint][]byte{}
	for _, a := range attrs {
		got[a.Type] = a.Value
	}
	keyType := ulong(got[pkcs11.CKA_KEY_TYPE])
	alg := Algorithm(0)
	for a, sp := range specs {
		if sp.class != class || sp.keyType != keyType {
			continue
		}
		if (class == pkcs11.CKO_SECRET_KEY && int(ulong(got[pkcs11.CKA_VALUE_LEN])) == sp.bytes) ||
			(class != pkcs11.CKO_SECRET_KEY && slices.ContainsFunc(sp.params, func(p []byte) bool { return bytes.Equal(p, got[pkcs11.CKA_EC_PARAMS]) })) {
			alg = a
		}
	}
	if alg == 0 {
		return 0, &Error{Err: ErrWrongAlgorithm, Detail: fmt.Sprintf("key type 0x%x of this size or curve is not one keyward uses", keyType)}
	}
	var bad []string
	for _, a := range flags {
		if isTrue(got[a]) != want[a] {
			bad = append(bad, fmt.Sprintf("%s is %v", names[a], isTrue(got[a])))
		}
	}
	on := granted(class, specs[alg].usage)
	for _, a := range usage {
		if isTrue(got[a]) != on[a] {
			bad = append(bad, fmt.Sprintf("%s is %v", names[a], isTrue(got[a])))
		}
	}
	if len(bad) > 0 {
		return 0, &Error{Err: ErrWeakKey, Detail: strings.Join(bad, ", ") + "; keyward uses only keys generated inside the token that never leave it and serve one purpose"}
	}
	return alg, nil
}

// publicKey reads the public half of a pair.
func (h *HSM) publicKey(s pkcs11.SessionHandle, obj pkcs11.ObjectHandle, alg Algorithm) (crypto.PublicKey, error) {
	attrs, err := h.mod.ctx.GetAttributeValue(s, obj, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
	})
	if err != nil {
		return nil, err
	}
	if ulong(attrs[2].Value) != specs[alg].keyType || !slices.ContainsFunc(specs[alg].params, func(p []byte) bool { return bytes.Equal(p, attrs[0].Value) }) {
		return nil, &Error{Err: ErrWrongAlgorithm, Detail: "the public half is of another key type or curve than the private half"}
	}
	return parsePublicKey(alg, attrs[1].Value)
}

// parsePublicKey decodes CKA_EC_POINT: a DER OCTET STRING around the point
// (PKCS#11 2.40), or on some tokens the bare point.
func parsePublicKey(alg Algorithm, ecPoint []byte) (crypto.PublicKey, error) {
	bare := map[Algorithm]int{ECDSAP256: 65, ECDSAP384: 97, Ed25519: ed25519.PublicKeySize}[alg]
	point := ecPoint
	var inner []byte
	if len(ecPoint) != bare { // a bare point can look like DER by chance
		if rest, err := asn1.Unmarshal(ecPoint, &inner); err == nil && len(rest) == 0 {
			point = inner
		}
	}
	switch alg {
	case ECDSAP256, ECDSAP384:
		curve := elliptic.P256()
		if alg == ECDSAP384 {
			curve = elliptic.P384()
		}
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
		if err != nil {
			return nil, &Error{Err: ErrToken, Detail: "the token returned an EC public key that does not parse: " + err.Error()}
		}
		return pub, nil
	case Ed25519:
		if len(point) != ed25519.PublicKeySize {
			return nil, &Error{Err: ErrToken, Detail: fmt.Sprintf("the token returned a %d-byte Ed25519 public key", len(point))}
		}
		return ed25519.PublicKey(bytes.Clone(point)), nil
	}
	return nil, &Error{Err: ErrWrongAlgorithm}
}

func isTrue(b []byte) bool { return len(b) == 1 && b[0] != 0 }

// ulong decodes a CK_ULONG attribute value (native byte order, little
// endian on every platform keyward builds for).
func ulong(b []byte) uint {
	var n uint
	for i := len(b) - 1; i >= 0; i-- {
		n = n<<8 | uint(b[i])
	}
	return n
}
