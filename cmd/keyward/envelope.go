package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/keyward/keyward/daemon/api/client"
	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

func datakeyCommand(e *env, args []string) error {
	fs := newFlags("datakey")
	key := fs.String("key", "", "the root key to seal the data key under")
	size := fs.Uint("size", 32, "data key size in bytes: 16, 24 or 32")
	ptOut := fs.String("plaintext-out", "", "write the plaintext data key to this file (mode 0600) instead of printing it")
	wrOut := fs.String("wrapped-out", "", "write the wrapped data key to this file instead of printing it")
	noPlain := fs.Bool("without-plaintext", false, "return only the wrapped key (GenerateDataKeyWithoutPlaintext)")
	ectx := pairs{}
	fs.Var(ectx, "context", "encryption context k=v (repeatable)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *key == "" {
		return usageError{"datakey needs -key"}
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	var r *keywardv1.GenerateDataKeyResponse
	if *noPlain {
		if *ptOut != "" {
			return usageError{"-without-plaintext and -plaintext-out do not go together"}
		}
		w, err := c.Envelope.GenerateDataKeyWithoutPlaintext(e.ctx, &keywardv1.GenerateDataKeyWithoutPlaintextRequest{KeyName: *key, KeySize: uint32(*size), EncryptionContext: ectx})
		if err != nil {
			return client.Wrap(err)
		}
		r = &keywardv1.GenerateDataKeyResponse{WrappedKey: w.GetWrappedKey(), KeyName: w.GetKeyName(), KeyVersion: w.GetKeyVersion()}
	} else if r, err = c.Envelope.GenerateDataKey(e.ctx, &keywardv1.GenerateDataKeyRequest{KeyName: *key, KeySize: uint32(*size), EncryptionContext: ectx}); err != nil {
		return client.Wrap(err)
	}
	defer clear(r.Plaintext)
	out := map[string]any{"key_name": r.GetKeyName(), "key_version": r.GetKeyVersion()}
	switch {
	case *noPlain:
	case *ptOut != "":
		if err := e.writeOutput(*ptOut, r.GetPlaintext()); err != nil {
			return err
		}
	default:
		out["plaintext"] = base64.StdEncoding.EncodeToString(r.GetPlaintext())
	}
	if *wrOut != "" {
		if err := e.writeOutput(*wrOut, r.GetWrappedKey()); err != nil {
			return err
		}
	} else {
		out["wrapped_key"] = base64.StdEncoding.EncodeToString(r.GetWrappedKey())
	}
	b, _ := json.MarshalIndent(out, "", "  ")
	_, err = fmt.Fprintln(e.stdout, string(b))
	return err
}

// cryptCommand is encrypt, decrypt and reencrypt: bytes in, bytes out.
func cryptCommand(e *env, cmd string, args []string) error {
	fs := newFlags(cmd)
	in := fs.String("in", "", "input file (default standard input)")
	out := fs.String("out", "", "output file, written with mode 0600 (default standard output)")
	ectx := pairs{}
	fs.Var(ectx, "context", "encryption context k=v (repeatable)")
	var key, toKey *string
	if cmd == "encrypt" {
		key = fs.String("key", "", "the key to seal under")
	}
	if cmd == "reencrypt" {
		toKey = fs.String("to-key", "", "seal under this key instead of the ciphertext's own")
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if key != nil && *key == "" {
		return usageError{"encrypt needs -key"}
	}
	data, err := e.readInput(*in)
	if err != nil {
		return err
	}
	c, err := e.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	var result []byte
	switch cmd {
	case "encrypt":
		result, err = c.Encrypt(e.ctx, *key, data, ectx)
	case "decrypt":
		result, err = c.Decrypt(e.ctx, data, ectx)
	case "reencrypt":
		var r *keywardv1.ReEncryptResponse
		r, err = c.Envelope.ReEncrypt(e.ctx, &keywardv1.ReEncryptRequest{Ciphertext: data, EncryptionContext: ectx, DestinationKeyName: *toKey})
		err = client.Wrap(err)
		result = r.GetCiphertext()
	}
	if err != nil {
		return err
	}
	return e.writeOutput(*out, result)
}
