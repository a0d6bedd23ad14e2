package main

import (
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"io"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

func (e *env) crypto() keywardv1.CryptoServiceClient {
	return keywardv1.NewCryptoServiceClient(e.api.Conn())
}

// errInvalidSignature and errInvalidMAC end verify-signature and
// verify-mac with exit 1.
var (
	errInvalidSignature = errors.New("invalid signature")
	errInvalidMAC       = errors.New("invalid MAC")
)

// signedInput is the input of sign and verify-signature: the message read
// from -in (or standard input), or with -hash its digest made here, so that
// a message over keywardd's 64 KiB is signed by its digest (ECDSA keys).
type signedInput struct {
	in, hash *string
}

func newSignedInput(f *flagSet) signedInput {
	s := signedInput{
		in:   f.String("in", "", "the message's file (default standard input)"),
		hash: f.String("hash", "", "hash the message here and send its digest: sha256 for an ecdsa-p256 key, sha384 for ecdsa-p384 (for messages over 64 KiB; not for ed25519)"),
	}
	f.Complete("hash", "sha256", "sha384")
	return s
}

// read is the message, or its digest, and whether it is a digest.
func (s signedInput) read(e *env) ([]byte, bool, error) {
	data, err := e.readInput(*s.in)
	if err != nil {
		return nil, false, err
	}
	switch *s.hash {
	case "":
		return data, false, nil
	case "sha256":
		d := sha256.Sum256(data)
		return d[:], true, nil
	case "sha384":
		d := sha512.Sum384(data)
		return d[:], true, nil
	}
	return nil, false, fmt.Errorf("-hash %q: use sha256 or sha384", *s.hash)
}

func signCommand(f *flagSet) action {
	si := newSignedInput(f)
	key := f.String("key", "", "the signing key")
	out := f.String("out", "", "the signature's file, written with mode 0600 (default standard output)")
	f.Required("key")
	return func(e *env, _ []string) error {
		data, digest, err := si.read(e)
		if err != nil {
			return err
		}
		r := &keywardv1.SignRequest{KeyName: *key, Input: &keywardv1.SignRequest_Message{Message: data}}
		if digest {
			r.Input = &keywardv1.SignRequest_Digest{Digest: data}
		}
		s, err := e.crypto().Sign(e.ctx, r)
		if err != nil {
			return err
		}
		return e.writeData(*out, &s.Signature, s)
	}
}

func verifySignature(f *flagSet) action {
	si := newSignedInput(f)
	key := f.String("key", "", "the signing key")
	sigFile := f.String("signature", "", "the signature's file")
	version := f.Uint32("version", 0, "the key version that signed (default: any published now)")
	f.Required("key", "signature")
	return func(e *env, _ []string) error {
		sig, err := e.readInput(*sigFile)
		if err != nil {
			return err
		}
		data, digest, err := si.read(e)
		if err != nil {
			return err
		}
		r := &keywardv1.VerifyRequest{KeyName: *key, KeyVersion: *version, Signature: sig, Input: &keywardv1.VerifyRequest_Message{Message: data}}
		if digest {
			r.Input = &keywardv1.VerifyRequest_Digest{Digest: data}
		}
		v, err := e.crypto().Verify(e.ctx, r)
		if err != nil {
			return err
		}
		return verdict(e, v, v.GetValid(), fmt.Sprintf("valid: %s v%d\n", *key, v.GetKeyVersion()), errInvalidSignature)
	}
}

// verdict shows a verification's answer and ends the command with bad,
// exit 1, unless valid.
func verdict(e *env, answer any, valid bool, line string, bad error) error {
	err := e.show(answer, func(w io.Writer) error {
		if !valid {
			return nil
		}
		_, err := io.WriteString(w, line)
		return err
	})
	if err == nil && !valid {
		err = bad
	}
	return err
}

func publicKey(f *flagSet) action {
	key := f.String("key", "", "the signing key")
	version := f.Uint32("version", 0, "the key version (default: the newest published)")
	f.Required("key")
	return func(e *env, _ []string) error {
		r, err := e.crypto().GetPublicKey(e.ctx, &keywardv1.GetPublicKeyRequest{KeyName: *key, KeyVersion: *version})
		if err != nil {
			return err
		}
		return e.showf(r, "%s", r.GetPublicKeyPem())
	}
}

func macCommand(f *flagSet) action {
	key := f.String("key", "", "the hmac key")
	in := f.String("in", "", "the message's file (default standard input)")
	out := f.String("out", "", "the MAC's file, written with mode 0600 (default standard output)")
	f.Required("key")
	return func(e *env, _ []string) error {
		data, err := e.readInput(*in)
		if err != nil {
			return err
		}
		r, err := e.crypto().GenerateMAC(e.ctx, &keywardv1.GenerateMACRequest{KeyName: *key, Message: data})
		if err != nil {
			return err
		}
		return e.writeData(*out, &r.Mac, r)
	}
}

func verifyMAC(f *flagSet) action {
	key := f.String("key", "", "the hmac key")
	in := f.String("in", "", "the message's file (default standard input)")
	macFile := f.String("mac", "", "the MAC's file")
	version := f.Uint32("version", 0, "the key version that made the MAC (default: the newest)")
	f.Required("key", "mac")
	return func(e *env, _ []string) error {
		mac, err := e.readInput(*macFile)
		if err != nil {
			return err
		}
		data, err := e.readInput(*in)
		if err != nil {
			return err
		}
		r, err := e.crypto().VerifyMAC(e.ctx, &keywardv1.VerifyMACRequest{KeyName: *key, KeyVersion: *version, Message: data, Mac: mac})
		if err != nil {
			return err
		}
		return verdict(e, r, r.GetValid(), "valid\n", errInvalidMAC)
	}
}

func randomCommand(f *flagSet) action {
	n := f.Uint32("bytes", 32, "how many bytes: 1 to 1024")
	out := f.String("out", "", "the bytes' file, written with mode 0600 (default standard output)")
	return func(e *env, _ []string) error {
		r, err := e.crypto().GenerateRandom(e.ctx, &keywardv1.GenerateRandomRequest{Length: *n})
		if err != nil {
			return err
		}
		return e.writeData(*out, &r.Random, r)
	}
}
