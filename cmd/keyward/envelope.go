package main

import (
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

func datakey(f *flagSet) action {
	key := f.String("key", "", "the root key to seal the data key under")
	size := f.Uint32("size", 32, "data key size in bytes: 16, 24 or 32")
	ptOut := f.String("plaintext-out", "", "write the plaintext data key to this file (mode 0600) instead of printing it")
	wrOut := f.String("wrapped-out", "", "write the wrapped data key to this file instead of printing it")
	noPlain := f.Bool("without-plaintext", false, "return only the wrapped key (GenerateDataKeyWithoutPlaintext)")
	ectx := f.Pairs("context", "encryption context k=v (repeatable)")
	f.Required("key")
	f.Exclusive("without-plaintext", "plaintext-out")
	return func(e *env, _ []string) error {
		var r *keywardv1.GenerateDataKeyResponse
		if *noPlain {
			w, err := e.api.Envelope.GenerateDataKeyWithoutPlaintext(e.ctx, &keywardv1.GenerateDataKeyWithoutPlaintextRequest{KeyName: *key, KeySize: *size, EncryptionContext: ectx})
			if err != nil {
				return err
			}
			r = &keywardv1.GenerateDataKeyResponse{WrappedKey: w.GetWrappedKey(), KeyName: w.GetKeyName(), KeyVersion: w.GetKeyVersion()}
		} else {
			var err error
			if r, err = e.api.Envelope.GenerateDataKey(e.ctx, &keywardv1.GenerateDataKeyRequest{KeyName: *key, KeySize: *size, EncryptionContext: ectx}); err != nil {
				return err
			}
		}
		defer clear(r.Plaintext)
		// The answer is JSON in either output: what no file took, base64.
		if *ptOut != "" {
			if err := e.writeOutput(*ptOut, r.GetPlaintext()); err != nil {
				return err
			}
			clear(r.Plaintext)
			r.Plaintext = nil
		}
		if *wrOut != "" {
			if err := e.writeOutput(*wrOut, r.GetWrappedKey()); err != nil {
				return err
			}
			r.WrappedKey = nil
		}
		return e.printJSON(r)
	}
}

// cryptFlags are the flags of encrypt, decrypt and reencrypt: bytes in,
// bytes out, under an encryption context.
type cryptFlags struct {
	in, out *string
	context map[string]string
}

func newCryptFlags(f *flagSet) cryptFlags {
	return cryptFlags{
		in:      f.String("in", "", "input file (default standard input)"),
		out:     f.String("out", "", "output file, written with mode 0600 (default standard output)"),
		context: f.Pairs("context", "encryption context k=v (repeatable)"),
	}
}

func encrypt(f *flagSet) action {
	cf := newCryptFlags(f)
	key := f.String("key", "", "the key to seal under")
	f.Required("key")
	return func(e *env, _ []string) error {
		data, err := e.readInput(*cf.in)
		if err != nil {
			return err
		}
		r, err := e.api.Envelope.Encrypt(e.ctx, &keywardv1.EncryptRequest{KeyName: *key, Plaintext: data, EncryptionContext: cf.context})
		clear(data)
		if err != nil {
			return err
		}
		return e.writeData(*cf.out, &r.Ciphertext, r)
	}
}

func decrypt(f *flagSet) action {
	cf := newCryptFlags(f)
	return func(e *env, _ []string) error {
		data, err := e.readInput(*cf.in)
		if err != nil {
			return err
		}
		r, err := e.api.Envelope.Decrypt(e.ctx, &keywardv1.DecryptRequest{Ciphertext: data, EncryptionContext: cf.context})
		if err != nil {
			return err
		}
		defer clear(r.Plaintext)
		return e.writeData(*cf.out, &r.Plaintext, r)
	}
}

func reencrypt(f *flagSet) action {
	cf := newCryptFlags(f)
	toKey := f.String("to-key", "", "seal under this key instead of the ciphertext's own")
	return func(e *env, _ []string) error {
		data, err := e.readInput(*cf.in)
		if err != nil {
			return err
		}
		r, err := e.api.Envelope.ReEncrypt(e.ctx, &keywardv1.ReEncryptRequest{Ciphertext: data, EncryptionContext: cf.context, DestinationKeyName: *toKey})
		if err != nil {
			return err
		}
		return e.writeData(*cf.out, &r.Ciphertext, r)
	}
}
