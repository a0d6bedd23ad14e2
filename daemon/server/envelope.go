package server

import (
	"context"
	"errors"
	"sync"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/audit"
	"github.com/keyward/keyward/daemon/envelope"
)

// Envelope is the envelope encryption the EnvelopeService translates to:
// daemon/envelope.Service.
type Envelope interface {
	GenerateDataKey(ctx context.Context, keyName string, size int, encCtx map[string]string) (plaintext, wrapped []byte, err error)
	Encrypt(ctx context.Context, keyName string, plaintext []byte, encCtx map[string]string) ([]byte, error)
	Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, envelope.Header, error)
	ReEncrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string, toKey string, toCtx map[string]string) ([]byte, envelope.Header, error)
	// Header reads the key and version a ciphertext names, without the HSM.
	Header(ciphertext []byte) (envelope.Header, error)
}

// noteContext records the digest of the encryption context for the audit
// record. A context that does not encode is refused by the call itself.
func noteContext(ctx context.Context, ec map[string]string) {
	if canon, err := envelope.CanonicalContext(ec); err == nil {
		callFrom(ctx).ctxHash = audit.ContextDigest(canon)
	}
}

func (s *Server) generateDataKey(ctx context.Context, op string, r *keywardv1.GenerateDataKeyRequest) (*keywardv1.GenerateDataKeyResponse, error) {
	if err := s.allow(ctx, op, r.GetKeyName()); err != nil {
		return nil, err
	}
	noteContext(ctx, r.GetEncryptionContext())
	pt, wrapped, err := s.cfg.Envelope.GenerateDataKey(ctx, r.GetKeyName(), int(r.GetKeySize()), r.GetEncryptionContext())
	if err != nil {
		return nil, err
	}
	h, _ := s.cfg.Envelope.Header(wrapped)
	callFrom(ctx).version = h.KeyVersion
	return &keywardv1.GenerateDataKeyResponse{Plaintext: pt, WrappedKey: wrapped, KeyName: h.KeyName, KeyVersion: h.KeyVersion}, nil
}

func (s *Server) GenerateDataKey(ctx context.Context, r *keywardv1.GenerateDataKeyRequest) (*keywardv1.GenerateDataKeyResponse, error) {
	return s.generateDataKey(ctx, "EnvelopeService.GenerateDataKey", r)
}

func (s *Server) GenerateDataKeyWithoutPlaintext(ctx context.Context, r *keywardv1.GenerateDataKeyWithoutPlaintextRequest) (*keywardv1.GenerateDataKeyWithoutPlaintextResponse, error) {
	out, err := s.generateDataKey(ctx, "EnvelopeService.GenerateDataKeyWithoutPlaintext", &keywardv1.GenerateDataKeyRequest{
		KeyName: r.GetKeyName(), KeySize: r.GetKeySize(), EncryptionContext: r.GetEncryptionContext()})
	if err != nil {
		return nil, err
	}
	clear(out.Plaintext)
	return &keywardv1.GenerateDataKeyWithoutPlaintextResponse{WrappedKey: out.WrappedKey, KeyName: out.KeyName, KeyVersion: out.KeyVersion}, nil
}

func (s *Server) encrypt(ctx context.Context, op string, r *keywardv1.EncryptRequest) (*keywardv1.EncryptResponse, error) {
	if err := s.allow(ctx, op, r.GetKeyName()); err != nil {
		return nil, err
	}
	noteContext(ctx, r.GetEncryptionContext())
	ct, err := s.cfg.Envelope.Encrypt(ctx, r.GetKeyName(), r.GetPlaintext(), r.GetEncryptionContext())
	if err != nil {
		return nil, err
	}
	h, _ := s.cfg.Envelope.Header(ct)
	callFrom(ctx).version = h.KeyVersion
	return &keywardv1.EncryptResponse{Ciphertext: ct, KeyName: h.KeyName, KeyVersion: h.KeyVersion}, nil
}

func (s *Server) Encrypt(ctx context.Context, r *keywardv1.EncryptRequest) (*keywardv1.EncryptResponse, error) {
	return s.encrypt(ctx, "EnvelopeService.Encrypt", r)
}

// unopened is what the caller is told of err, a failure to decrypt a
// ciphertext whose header names key (empty: the header does not parse).
// A failure to open it (envelope.ErrNotOpened) keeps its reason for a
// caller granted KeyService.GetKey on the key (on any key, when it names
// none: a malformed header tells nothing about keys); any other caller gets
// the one answer of withhold, whatever the reason. The policy check on the
// key named comes before, and depends on the name alone.
func (s *Server) unopened(ctx context.Context, key string, err error) error {
	if !errors.Is(err, envelope.ErrNotOpened) {
		return err
	}
	if s.policy.Load().Allow(subject(callFrom(ctx).caller), "KeyService.GetKey", key) == nil {
		return err
	}
	return withhold(err)
}

func (s *Server) decrypt(ctx context.Context, op string, r *keywardv1.DecryptRequest) (*keywardv1.DecryptResponse, error) {
	h, err := s.cfg.Envelope.Header(r.GetCiphertext())
	if err != nil {
		return nil, s.unopened(ctx, "", err)
	}
	if err := s.allow(ctx, op, h.KeyName); err != nil {
		return nil, err
	}
	callFrom(ctx).version = h.KeyVersion
	noteContext(ctx, r.GetEncryptionContext())
	pt, _, err := s.cfg.Envelope.Decrypt(ctx, r.GetCiphertext(), r.GetEncryptionContext())
	if err != nil {
		return nil, s.unopened(ctx, h.KeyName, err)
	}
	return &keywardv1.DecryptResponse{Plaintext: pt, KeyName: h.KeyName, KeyVersion: h.KeyVersion}, nil
}

func (s *Server) Decrypt(ctx context.Context, r *keywardv1.DecryptRequest) (*keywardv1.DecryptResponse, error) {
	return s.decrypt(ctx, "EnvelopeService.Decrypt", r)
}

// reEncrypt needs Decrypt on the source key and op on the destination.
func (s *Server) reEncrypt(ctx context.Context, op, decryptOp string, r *keywardv1.ReEncryptRequest) (*keywardv1.ReEncryptResponse, error) {
	from, err := s.cfg.Envelope.Header(r.GetCiphertext())
	if err != nil {
		return nil, s.unopened(ctx, "", err)
	}
	to := r.GetDestinationKeyName()
	if to == "" {
		to = from.KeyName
	}
	if err := s.allow(ctx, decryptOp, from.KeyName); err != nil {
		return nil, err
	}
	if err := s.allow(ctx, op, to); err != nil {
		return nil, err
	}
	noteContext(ctx, r.GetEncryptionContext())
	var toCtx map[string]string
	if d := r.GetDestinationEncryptionContext(); d != nil {
		toCtx = d.GetEntries()
		if toCtx == nil {
			toCtx = map[string]string{}
		}
	}
	ct, _, err := s.cfg.Envelope.ReEncrypt(ctx, r.GetCiphertext(), r.GetEncryptionContext(), r.GetDestinationKeyName(), toCtx)
	if err != nil {
		return nil, s.unopened(ctx, from.KeyName, err)
	}
	h, _ := s.cfg.Envelope.Header(ct)
	callFrom(ctx).version = h.KeyVersion
	return &keywardv1.ReEncryptResponse{Ciphertext: ct, SourceKeyName: from.KeyName, SourceKeyVersion: from.KeyVersion, KeyName: h.KeyName, KeyVersion: h.KeyVersion}, nil
}

func (s *Server) ReEncrypt(ctx context.Context, r *keywardv1.ReEncryptRequest) (*keywardv1.ReEncryptResponse, error) {
	return s.reEncrypt(ctx, "EnvelopeService.ReEncrypt", "EnvelopeService.Decrypt", r)
}

// runBatch checks the batch's size against the caller's limit before any
// HSM work, then runs one call per item, a few at a time, each with its own
// answer. Items are audited as one call with their count.
func runBatch[Req, Resp any](ctx context.Context, s *Server, op string, items []Req, one func(ctx context.Context, r Req) (Resp, error)) ([]Resp, []error, error) {
	// A caller granted the batch call on no key at all is refused whole;
	// otherwise each item is checked on its own key.
	if err := s.allow(ctx, op, ""); err != nil {
		return nil, nil, err
	}
	if err := checkBatch(len(items), s.batchLimit(ctx, op)); err != nil {
		return nil, nil, err
	}
	c := callFrom(ctx)
	c.items = len(items)
	out := make([]Resp, len(items))
	errs := make([]error, len(items))
	notes := make([]*call, len(items)) // each item's key, version and context, for the audit record
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(len(items), 4) {
		wg.Go(func() {
			for i := range next {
				notes[i] = &call{op: c.op, caller: c.caller}
				out[i], errs[i] = one(context.WithValue(ctx, callKey{}, notes[i]), items[i])
			}
		})
	}
	for i := range items {
		next <- i
	}
	close(next)
	wg.Wait()
	for i, n := range notes {
		it := audit.Item{Key: n.key, Version: n.version, ContextSHA256: n.ctxHash}
		st := toStatus(errs[i])
		it.Outcome, it.Code = outcome(st)
		if st != nil {
			it.Detail = auditDetail(errs[i], st)
		}
		c.batch = append(c.batch, it)
	}
	return out, errs, nil
}

func (s *Server) BatchGenerateDataKey(ctx context.Context, r *keywardv1.BatchGenerateDataKeyRequest) (*keywardv1.BatchGenerateDataKeyResponse, error) {
	const op = "EnvelopeService.BatchGenerateDataKey"
	oks, errs, err := runBatch(ctx, s, op, r.GetItems(), func(ctx context.Context, it *keywardv1.GenerateDataKeyRequest) (*keywardv1.GenerateDataKeyResponse, error) {
		return s.generateDataKey(ctx, op, it)
	})
	if err != nil {
		return nil, err
	}
	out := &keywardv1.BatchGenerateDataKeyResponse{}
	for i := range oks {
		res := &keywardv1.BatchGenerateDataKeyResult{}
		if errs[i] != nil {
			code, msg := itemError(errs[i])
			res.Result = &keywardv1.BatchGenerateDataKeyResult_Error{Error: &keywardv1.ItemError{Code: code, Message: msg}}
		} else {
			res.Result = &keywardv1.BatchGenerateDataKeyResult_Ok{Ok: oks[i]}
		}
		out.Results = append(out.Results, res)
	}
	return out, nil
}

func (s *Server) BatchEncrypt(ctx context.Context, r *keywardv1.BatchEncryptRequest) (*keywardv1.BatchEncryptResponse, error) {
	const op = "EnvelopeService.BatchEncrypt"
	oks, errs, err := runBatch(ctx, s, op, r.GetItems(), func(ctx context.Context, it *keywardv1.EncryptRequest) (*keywardv1.EncryptResponse, error) {
		return s.encrypt(ctx, op, it)
	})
	if err != nil {
		return nil, err
	}
	out := &keywardv1.BatchEncryptResponse{}
	for i := range oks {
		res := &keywardv1.BatchEncryptResult{}
		if errs[i] != nil {
			code, msg := itemError(errs[i])
			res.Result = &keywardv1.BatchEncryptResult_Error{Error: &keywardv1.ItemError{Code: code, Message: msg}}
		} else {
			res.Result = &keywardv1.BatchEncryptResult_Ok{Ok: oks[i]}
		}
		out.Results = append(out.Results, res)
	}
	return out, nil
}

func (s *Server) BatchDecrypt(ctx context.Context, r *keywardv1.BatchDecryptRequest) (*keywardv1.BatchDecryptResponse, error) {
	const op = "EnvelopeService.BatchDecrypt"
	oks, errs, err := runBatch(ctx, s, op, r.GetItems(), func(ctx context.Context, it *keywardv1.DecryptRequest) (*keywardv1.DecryptResponse, error) {
		return s.decrypt(ctx, op, it)
	})
	if err != nil {
		return nil, err
	}
	out := &keywardv1.BatchDecryptResponse{}
	for i := range oks {
		res := &keywardv1.BatchDecryptResult{}
		if errs[i] != nil {
			code, msg := itemError(errs[i])
			res.Result = &keywardv1.BatchDecryptResult_Error{Error: &keywardv1.ItemError{Code: code, Message: msg}}
		} else {
			res.Result = &keywardv1.BatchDecryptResult_Ok{Ok: oks[i]}
		}
		out.Results = append(out.Results, res)
	}
	return out, nil
}

func (s *Server) BatchReEncrypt(ctx context.Context, r *keywardv1.BatchReEncryptRequest) (*keywardv1.BatchReEncryptResponse, error) {
	const op = "EnvelopeService.BatchReEncrypt"
	oks, errs, err := runBatch(ctx, s, op, r.GetItems(), func(ctx context.Context, it *keywardv1.ReEncryptRequest) (*keywardv1.ReEncryptResponse, error) {
		return s.reEncrypt(ctx, op, "EnvelopeService.BatchDecrypt", it)
	})
	if err != nil {
		return nil, err
	}
	out := &keywardv1.BatchReEncryptResponse{}
	for i := range oks {
		res := &keywardv1.BatchReEncryptResult{}
		if errs[i] != nil {
			code, msg := itemError(errs[i])
			res.Result = &keywardv1.BatchReEncryptResult_Error{Error: &keywardv1.ItemError{Code: code, Message: msg}}
		} else {
			res.Result = &keywardv1.BatchReEncryptResult_Ok{Ok: oks[i]}
		}
		out.Results = append(out.Results, res)
	}
	return out, nil
}
