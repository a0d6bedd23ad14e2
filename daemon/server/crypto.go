package server

import (
	"context"
	"fmt"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/appcrypto"
)

// Crypto is the signing, MAC and random-bytes service the CryptoService
// translates to: daemon/appcrypto.Service.
type Crypto interface {
	Sign(ctx context.Context, name string, in appcrypto.Input) (*appcrypto.Signature, error)
	Verify(ctx context.Context, name string, v uint32, in appcrypto.Input, sig []byte) (bool, uint32, error)
	PublicKey(ctx context.Context, name string, v uint32) (*appcrypto.PublicKey, error)
	GenerateMAC(ctx context.Context, name string, msg []byte) (*appcrypto.MAC, error)
	VerifyMAC(ctx context.Context, name string, v uint32, msg, mac []byte) (bool, appcrypto.KeyID, error)
	Random(ctx context.Context, n int) ([]byte, error)
}

// cryptoInput is the message or digest of a Sign or Verify request.
func cryptoInput(msg, digest []byte, isDigest bool) appcrypto.Input {
	if isDigest {
		return appcrypto.Input{Data: digest, IsDigest: true}
	}
	return appcrypto.Input{Data: msg}
}

// crypto checks the caller may do op on key and returns the service.
func (s *Server) crypto(ctx context.Context, op, key string) (Crypto, error) {
	if err := s.allow(ctx, op, key); err != nil {
		return nil, err
	}
	if s.cfg.Crypto == nil {
		return nil, fmt.Errorf("%w: this keywardd does not serve CryptoService", errUnavailable)
	}
	return s.cfg.Crypto, nil
}

func (s *Server) Sign(ctx context.Context, r *keywardv1.SignRequest) (*keywardv1.SignResponse, error) {
	return s.sign(ctx, "CryptoService.Sign", r)
}

func (s *Server) sign(ctx context.Context, op string, r *keywardv1.SignRequest) (*keywardv1.SignResponse, error) {
	c, err := s.crypto(ctx, op, r.GetKeyName())
	if err != nil {
		return nil, err
	}
	_, isDigest := r.GetInput().(*keywardv1.SignRequest_Digest)
	sig, err := c.Sign(ctx, r.GetKeyName(), cryptoInput(r.GetMessage(), r.GetDigest(), isDigest))
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = sig.Key.Version
	return &keywardv1.SignResponse{Signature: sig.Signature, KeyName: sig.Key.Name, KeyVersion: sig.Key.Version, Algorithm: sig.Algorithm.String()}, nil
}

func (s *Server) Verify(ctx context.Context, r *keywardv1.VerifyRequest) (*keywardv1.VerifyResponse, error) {
	return s.verify(ctx, "CryptoService.Verify", r)
}

func (s *Server) verify(ctx context.Context, op string, r *keywardv1.VerifyRequest) (*keywardv1.VerifyResponse, error) {
	c, err := s.crypto(ctx, op, r.GetKeyName())
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = r.GetKeyVersion()
	_, isDigest := r.GetInput().(*keywardv1.VerifyRequest_Digest)
	ok, v, err := c.Verify(ctx, r.GetKeyName(), r.GetKeyVersion(), cryptoInput(r.GetMessage(), r.GetDigest(), isDigest), r.GetSignature())
	if err != nil {
		return nil, err
	}
	if ok {
		callFrom(ctx).version = v
	}
	return &keywardv1.VerifyResponse{Valid: ok, KeyVersion: v}, nil
}

func (s *Server) GetPublicKey(ctx context.Context, r *keywardv1.GetPublicKeyRequest) (*keywardv1.GetPublicKeyResponse, error) {
	c, err := s.crypto(ctx, "CryptoService.GetPublicKey", r.GetKeyName())
	if err != nil {
		return nil, err
	}
	pk, err := c.PublicKey(ctx, r.GetKeyName(), r.GetKeyVersion())
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = pk.Key.Version
	return &keywardv1.GetPublicKeyResponse{PublicKeyPem: pk.PEM, Algorithm: pk.Algorithm.String(), KeyVersion: pk.Key.Version, KeyName: pk.Key.Name}, nil
}

func (s *Server) GenerateMAC(ctx context.Context, r *keywardv1.GenerateMACRequest) (*keywardv1.GenerateMACResponse, error) {
	return s.generateMAC(ctx, "CryptoService.GenerateMAC", r)
}

func (s *Server) generateMAC(ctx context.Context, op string, r *keywardv1.GenerateMACRequest) (*keywardv1.GenerateMACResponse, error) {
	c, err := s.crypto(ctx, op, r.GetKeyName())
	if err != nil {
		return nil, err
	}
	m, err := c.GenerateMAC(ctx, r.GetKeyName(), r.GetMessage())
	callFrom(ctx).version = m.Key.Version
	if err != nil {
		return nil, err
	}
	return &keywardv1.GenerateMACResponse{Mac: m.MAC, KeyName: m.Key.Name, KeyVersion: m.Key.Version, Algorithm: m.Algorithm.String()}, nil
}

func (s *Server) VerifyMAC(ctx context.Context, r *keywardv1.VerifyMACRequest) (*keywardv1.VerifyMACResponse, error) {
	return s.verifyMAC(ctx, "CryptoService.VerifyMAC", r)
}

func (s *Server) verifyMAC(ctx context.Context, op string, r *keywardv1.VerifyMACRequest) (*keywardv1.VerifyMACResponse, error) {
	c, err := s.crypto(ctx, op, r.GetKeyName())
	if err != nil {
		return nil, err
	}
	ok, id, err := c.VerifyMAC(ctx, r.GetKeyName(), r.GetKeyVersion(), r.GetMessage(), r.GetMac())
	callFrom(ctx).version = id.Version
	if err != nil {
		return nil, err
	}
	return &keywardv1.VerifyMACResponse{Valid: ok}, nil
}

func (s *Server) GenerateRandom(ctx context.Context, r *keywardv1.GenerateRandomRequest) (*keywardv1.GenerateRandomResponse, error) {
	c, err := s.crypto(ctx, "CryptoService.GenerateRandom", "")
	if err != nil {
		return nil, err
	}
	b, err := c.Random(ctx, int(r.GetLength()))
	if err != nil {
		return nil, err
	}
	return &keywardv1.GenerateRandomResponse{Random: b}, nil
}

// cryptoBatch runs a batch of op, one call per item (runBatch), and makes
// each item's result with ok or fail.
func cryptoBatch[Req, Resp, Res any](ctx context.Context, s *Server, op string, items []Req,
	one func(ctx context.Context, op string, r Req) (Resp, error), ok func(Resp) Res, fail func(*keywardv1.ItemError) Res) ([]Res, error) {
	oks, errs, err := runBatch(ctx, s, op, items, func(ctx context.Context, r Req) (Resp, error) { return one(ctx, op, r) })
	if err != nil {
		return nil, err
	}
	out := make([]Res, len(oks))
	for i := range oks {
		if errs[i] != nil {
			code, msg := itemError(errs[i])
			out[i] = fail(&keywardv1.ItemError{Code: code, Message: msg})
		} else {
			out[i] = ok(oks[i])
		}
	}
	return out, nil
}

func (s *Server) BatchSign(ctx context.Context, r *keywardv1.BatchSignRequest) (*keywardv1.BatchSignResponse, error) {
	res, err := cryptoBatch(ctx, s, "CryptoService.BatchSign", r.GetItems(), s.sign,
		func(ok *keywardv1.SignResponse) *keywardv1.BatchSignResult {
			return &keywardv1.BatchSignResult{Result: &keywardv1.BatchSignResult_Ok{Ok: ok}}
		},
		func(e *keywardv1.ItemError) *keywardv1.BatchSignResult {
			return &keywardv1.BatchSignResult{Result: &keywardv1.BatchSignResult_Error{Error: e}}
		})
	if err != nil {
		return nil, err
	}
	return &keywardv1.BatchSignResponse{Results: res}, nil
}

func (s *Server) BatchVerify(ctx context.Context, r *keywardv1.BatchVerifyRequest) (*keywardv1.BatchVerifyResponse, error) {
	res, err := cryptoBatch(ctx, s, "CryptoService.BatchVerify", r.GetItems(), s.verify,
		func(ok *keywardv1.VerifyResponse) *keywardv1.BatchVerifyResult {
			return &keywardv1.BatchVerifyResult{Result: &keywardv1.BatchVerifyResult_Ok{Ok: ok}}
		},
		func(e *keywardv1.ItemError) *keywardv1.BatchVerifyResult {
			return &keywardv1.BatchVerifyResult{Result: &keywardv1.BatchVerifyResult_Error{Error: e}}
		})
	if err != nil {
		return nil, err
	}
	return &keywardv1.BatchVerifyResponse{Results: res}, nil
}

func (s *Server) BatchGenerateMAC(ctx context.Context, r *keywardv1.BatchGenerateMACRequest) (*keywardv1.BatchGenerateMACResponse, error) {
	res, err := cryptoBatch(ctx, s, "CryptoService.BatchGenerateMAC", r.GetItems(), s.generateMAC,
		func(ok *keywardv1.GenerateMACResponse) *keywardv1.BatchGenerateMACResult {
			return &keywardv1.BatchGenerateMACResult{Result: &keywardv1.BatchGenerateMACResult_Ok{Ok: ok}}
		},
		func(e *keywardv1.ItemError) *keywardv1.BatchGenerateMACResult {
			return &keywardv1.BatchGenerateMACResult{Result: &keywardv1.BatchGenerateMACResult_Error{Error: e}}
		})
	if err != nil {
		return nil, err
	}
	return &keywardv1.BatchGenerateMACResponse{Results: res}, nil
}

func (s *Server) BatchVerifyMAC(ctx context.Context, r *keywardv1.BatchVerifyMACRequest) (*keywardv1.BatchVerifyMACResponse, error) {
	res, err := cryptoBatch(ctx, s, "CryptoService.BatchVerifyMAC", r.GetItems(), s.verifyMAC,
		func(ok *keywardv1.VerifyMACResponse) *keywardv1.BatchVerifyMACResult {
			return &keywardv1.BatchVerifyMACResult{Result: &keywardv1.BatchVerifyMACResult_Ok{Ok: ok}}
		},
		func(e *keywardv1.ItemError) *keywardv1.BatchVerifyMACResult {
			return &keywardv1.BatchVerifyMACResult{Result: &keywardv1.BatchVerifyMACResult_Error{Error: e}}
		})
	if err != nil {
		return nil, err
	}
	return &keywardv1.BatchVerifyMACResponse{Results: res}, nil
}
