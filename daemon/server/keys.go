package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
	"github.com/keyward/keyward/daemon/keys"
)

// Keys is the key manager the KeyService translates to (and GetStatus,
// ListSigningKeys and PanicRotate read): daemon/keys.Manager.
type Keys interface {
	Create(ctx context.Context, s keys.Spec) (*keys.Key, error)
	Get(name string) (*keys.Key, error)
	List() ([]*keys.Key, error)
	Rotate(ctx context.Context, name string) (*keys.Key, error)
	PanicRotate(ctx context.Context, name string, dryRun bool) (*keys.Panic, error)
	SetEnabled(name string, enabled bool) (*keys.Key, error)
	SetMinDecryptionVersion(name string, v uint32) (*keys.Key, error)
	ScheduleDeletion(name string, wait time.Duration) (*keys.Key, error)
	CancelDeletion(name string) (*keys.Key, error)
	ReportRewrap(name string, r keys.RewrapReport) (*keys.Key, error)
	// EncryptionLimit is how many encryptions an AES-GCM version makes
	// before its key rotates by itself.
	EncryptionLimit() uint64
}

var purposes = map[keywardv1.KeyPurpose]keys.Purpose{
	keywardv1.KeyPurpose_KEY_PURPOSE_ENCRYPT: keys.Encrypt,
	keywardv1.KeyPurpose_KEY_PURPOSE_SIGN:    keys.Sign,
	keywardv1.KeyPurpose_KEY_PURPOSE_HMAC:    keys.MAC,
}

var algorithms = map[keywardv1.KeyAlgorithm]keys.Algorithm{
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_AES256_GCM:  keys.AES256GCM,
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_HMAC_SHA256: keys.HMACSHA256,
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_ECDSA_P256:  keys.ECDSAP256,
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_ECDSA_P384:  keys.ECDSAP384,
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_ED25519:     keys.Ed25519,
	keywardv1.KeyAlgorithm_KEY_ALGORITHM_HMAC_SHA384: keys.HMACSHA384,
}

var states = map[keys.State]keywardv1.KeyState{
	keys.Enabled:         keywardv1.KeyState_KEY_STATE_ENABLED,
	keys.Disabled:        keywardv1.KeyState_KEY_STATE_DISABLED,
	keys.PendingDeletion: keywardv1.KeyState_KEY_STATE_PENDING_DELETION,
}

func (s *Server) toKey(k *keys.Key) *keywardv1.Key {
	out := &keywardv1.Key{
		Name: k.Name, State: states[k.State], LatestVersion: k.Latest(), MinDecryptionVersion: k.MinDecryptionVersion,
		Labels: k.Labels, CreateTime: timestamppb.New(k.Created),
	}
	for p, kp := range purposes {
		if kp == k.Purpose {
			out.Purpose = p
		}
	}
	for a, ha := range algorithms {
		if ha.String() == k.Algorithm {
			out.Algorithm = a
		}
	}
	ts := func(t time.Time) *timestamppb.Timestamp {
		if t.IsZero() {
			return nil
		}
		return timestamppb.New(t)
	}
	for _, v := range k.Versions {
		out.Versions = append(out.Versions, &keywardv1.KeyVersion{Number: v.Number, CreateTime: timestamppb.New(v.Created),
			ActivateTime: ts(v.ActivateAt), RetireTime: ts(v.RetireAt), RemoveTime: ts(v.RemoveAt), EncryptionsReserved: v.Reserved})
	}
	if out.Algorithm == keywardv1.KeyAlgorithm_KEY_ALGORITHM_AES256_GCM {
		out.EncryptionLimit = s.cfg.Keys.EncryptionLimit()
	}
	for _, r := range k.RewrapReports {
		out.RewrapReports = append(out.RewrapReports, &keywardv1.RewrapReport{Source: r.Source, Ciphertexts: r.Ciphertexts,
			Failed: r.Failed, Complete: r.Complete, ReportTime: ts(r.Time), Reporter: r.Reporter})
	}
	if k.RotationPeriod > 0 {
		out.RotationPeriod = durationpb.New(k.RotationPeriod)
	}
	if !k.DeletionDate.IsZero() {
		out.DeletionTime = timestamppb.New(k.DeletionDate)
	}
	return out
}

// notReserved refuses changes to the keys keywardd keeps for itself.
func notReserved(name string) error {
	if strings.HasPrefix(name, ReservedPrefix) {
		return fmt.Errorf("%w: key names starting with %q are keywardd's own", errInvalid, ReservedPrefix)
	}
	return nil
}

func (s *Server) CreateKey(ctx context.Context, r *keywardv1.CreateKeyRequest) (*keywardv1.CreateKeyResponse, error) {
	if err := s.allow(ctx, "KeyService.CreateKey", r.GetName()); err != nil {
		return nil, err
	}
	if err := notReserved(r.GetName()); err != nil {
		return nil, err
	}
	p, ok := purposes[r.GetPurpose()]
	if !ok {
		return nil, fmt.Errorf("%w: purpose is required: KEY_PURPOSE_ENCRYPT, KEY_PURPOSE_SIGN or KEY_PURPOSE_HMAC", errInvalid)
	}
	spec := keys.Spec{Name: r.GetName(), Purpose: p, Labels: r.GetLabels()}
	if r.GetAlgorithm() != keywardv1.KeyAlgorithm_KEY_ALGORITHM_UNSPECIFIED {
		a, ok := algorithms[r.GetAlgorithm()]
		if !ok {
			return nil, fmt.Errorf("%w: unknown algorithm %v", errInvalid, r.GetAlgorithm())
		}
		spec.Algorithm = a
	}
	if r.GetRotationPeriod() != nil {
		spec.RotationPeriod = r.GetRotationPeriod().AsDuration()
	}
	k, err := s.cfg.Keys.Create(ctx, spec)
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = 1
	return &keywardv1.CreateKeyResponse{Key: s.toKey(k)}, nil
}

func (s *Server) GetKey(ctx context.Context, r *keywardv1.GetKeyRequest) (*keywardv1.GetKeyResponse, error) {
	if err := s.allow(ctx, "KeyService.GetKey", r.GetName()); err != nil {
		return nil, err
	}
	k, err := s.cfg.Keys.Get(r.GetName())
	if err != nil {
		return nil, err
	}
	return &keywardv1.GetKeyResponse{Key: s.toKey(k)}, nil
}

func (s *Server) ListKeys(ctx context.Context, _ *keywardv1.ListKeysRequest) (*keywardv1.ListKeysResponse, error) {
	if err := s.allow(ctx, "KeyService.ListKeys", ""); err != nil {
		return nil, err
	}
	all, err := s.cfg.Keys.List()
	if err != nil {
		return nil, err
	}
	out := &keywardv1.ListKeysResponse{}
	sub := subject(callFrom(ctx).caller)
	for _, k := range all {
		if s.policy.Load().Allow(sub, "KeyService.GetKey", k.Name) == nil {
			out.Keys = append(out.Keys, s.toKey(k))
		}
	}
	return out, nil
}

func (s *Server) RotateKey(ctx context.Context, r *keywardv1.RotateKeyRequest) (*keywardv1.RotateKeyResponse, error) {
	if err := s.allow(ctx, "KeyService.RotateKey", r.GetName()); err != nil {
		return nil, err
	}
	k, err := s.cfg.Keys.Rotate(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = k.Latest()
	return &keywardv1.RotateKeyResponse{Key: s.toKey(k)}, nil
}

func (s *Server) SetKeyState(ctx context.Context, r *keywardv1.SetKeyStateRequest) (*keywardv1.SetKeyStateResponse, error) {
	if err := s.allow(ctx, "KeyService.SetKeyState", r.GetName()); err != nil {
		return nil, err
	}
	var enable bool
	switch r.GetState() {
	case keywardv1.KeyState_KEY_STATE_ENABLED:
		enable = true
	case keywardv1.KeyState_KEY_STATE_DISABLED:
		if err := notReserved(r.GetName()); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: state must be KEY_STATE_ENABLED or KEY_STATE_DISABLED (use ScheduleKeyDeletion to delete)", errInvalid)
	}
	k, err := s.cfg.Keys.SetEnabled(r.GetName(), enable)
	if err != nil {
		return nil, err
	}
	return &keywardv1.SetKeyStateResponse{Key: s.toKey(k)}, nil
}

func (s *Server) SetMinDecryptionVersion(ctx context.Context, r *keywardv1.SetMinDecryptionVersionRequest) (*keywardv1.SetMinDecryptionVersionResponse, error) {
	if err := s.allow(ctx, "KeyService.SetMinDecryptionVersion", r.GetName()); err != nil {
		return nil, err
	}
	k, err := s.cfg.Keys.SetMinDecryptionVersion(r.GetName(), r.GetVersion())
	if err != nil {
		return nil, err
	}
	callFrom(ctx).version = r.GetVersion()
	return &keywardv1.SetMinDecryptionVersionResponse{Key: s.toKey(k)}, nil
}

func (s *Server) ScheduleKeyDeletion(ctx context.Context, r *keywardv1.ScheduleKeyDeletionRequest) (*keywardv1.ScheduleKeyDeletionResponse, error) {
	if err := s.allow(ctx, "KeyService.ScheduleKeyDeletion", r.GetName()); err != nil {
		return nil, err
	}
	if err := notReserved(r.GetName()); err != nil {
		return nil, err
	}
	k, err := s.cfg.Keys.ScheduleDeletion(r.GetName(), r.GetWaitingPeriod().AsDuration())
	if err != nil {
		return nil, err
	}
	return &keywardv1.ScheduleKeyDeletionResponse{Key: s.toKey(k)}, nil
}

func (s *Server) CancelKeyDeletion(ctx context.Context, r *keywardv1.CancelKeyDeletionRequest) (*keywardv1.CancelKeyDeletionResponse, error) {
	if err := s.allow(ctx, "KeyService.CancelKeyDeletion", r.GetName()); err != nil {
		return nil, err
	}
	k, err := s.cfg.Keys.CancelDeletion(r.GetName())
	if err != nil {
		return nil, err
	}
	return &keywardv1.CancelKeyDeletionResponse{Key: s.toKey(k)}, nil
}

// ReportRewrap records a rewrap job's count of one source's ciphertexts on
// the key, with the caller as its reporter; GetKey shows it and keyward key
// set-min-version reads it.
func (s *Server) ReportRewrap(ctx context.Context, r *keywardv1.ReportRewrapRequest) (*keywardv1.ReportRewrapResponse, error) {
	if err := s.allow(ctx, "KeyService.ReportRewrap", r.GetKeyName()); err != nil {
		return nil, err
	}
	rep := r.GetReport()
	if rep == nil {
		return nil, fmt.Errorf("%w: report is required: the source and its ciphertexts under each version", errInvalid)
	}
	c := callFrom(ctx).caller
	reporter := callerName(ctx)
	if _, err := s.cfg.Keys.ReportRewrap(r.GetKeyName(), keys.RewrapReport{Source: rep.GetSource(), Ciphertexts: rep.GetCiphertexts(),
		Failed: rep.GetFailed(), Complete: rep.GetComplete(), Reporter: reporter, ReporterUID: c.UID}); err != nil {
		return nil, err
	}
	return &keywardv1.ReportRewrapResponse{}, nil
}
