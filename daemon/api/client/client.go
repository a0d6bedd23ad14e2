// Package client is how Go programs talk to keywardd: it dials the Unix
// socket with the right options (the kernel identifies the caller, so there is
// nothing to configure but the path) and wraps the keyward.v1 calls that
// applications use most in typed helpers, with errors they can match:
//
//	c, err := client.Dial("")          // $KEYWARD_SOCKET or the default path
//	dk, err := c.GenerateDataKey(ctx, "orders", map[string]string{"tenant": "42"})
//	pt, err := c.Decrypt(ctx, dk.Wrapped, map[string]string{"tenant": "42"})
//	if errors.Is(err, client.ErrDenied) { ... }
//
// The generated clients (Keys, Envelope, Status, Tokens, APIKeys, Audit)
// are there for everything else.
package client

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	keywardv1 "github.com/keyward/keyward/daemon/api/v1"
)

// DefaultSocket is where keywardd listens unless configured otherwise.
const DefaultSocket = "/run/keyward/keyward.sock"

// SocketPath is the socket to use: path if set, else $KEYWARD_SOCKET, else
// DefaultSocket.
func SocketPath(path string) string {
	if path != "" {
		return path
	}
	if p := os.Getenv("KEYWARD_SOCKET"); p != "" {
		return p
	}
	return DefaultSocket
}

// Client is a connection to keywardd.
type Client struct {
	conn     *grpc.ClientConn
	Keys     keywardv1.KeyServiceClient
	Envelope keywardv1.EnvelopeServiceClient
	Status   keywardv1.StatusServiceClient
	Tokens   keywardv1.TokenServiceClient
	APIKeys  keywardv1.APIKeyServiceClient
	Audit    keywardv1.AuditServiceClient
}

// Dial connects to keywardd's socket (see SocketPath). The connection is
// made on the first call.
func Dial(path string) (*Client, error) {
	path = SocketPath(path)
	conn, err := grpc.NewClient("unix://"+path,
		// The socket is local and the kernel identifies the caller: there
		// is no transport security to add, and no token to send.
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(8<<20)),
	)
	if err != nil {
		return nil, fmt.Errorf("keyward: %w", err)
	}
	return &Client{conn: conn, Keys: keywardv1.NewKeyServiceClient(conn),
		Envelope: keywardv1.NewEnvelopeServiceClient(conn), Status: keywardv1.NewStatusServiceClient(conn),
		Tokens: keywardv1.NewTokenServiceClient(conn), APIKeys: keywardv1.NewAPIKeyServiceClient(conn),
		Audit: keywardv1.NewAuditServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the connection, for the generated clients of other services.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Errors to match with errors.Is; every error from this package's helpers is
// an *Error matching one of them.
var (
	ErrDenied      = errors.New("keyward: permission denied")
	ErrNotFound    = errors.New("keyward: not found")
	ErrExists      = errors.New("keyward: already exists")
	ErrInvalid     = errors.New("keyward: invalid argument") // includes a ciphertext or context that does not match
	ErrUnusable    = errors.New("keyward: key not usable")   // disabled, pending deletion, other purpose, retired version
	ErrTooLarge    = errors.New("keyward: too large")
	ErrLimited     = errors.New("keyward: over the caller's budget") // connections, calls in flight, call rate: see Error.RetryAfter
	ErrUnavailable = errors.New("keyward: unavailable")              // keywardd, its HSM or its audit log; try again later
	ErrOther       = errors.New("keyward: error")
)

var codeErr = map[codes.Code]error{
	codes.PermissionDenied:   ErrDenied,
	codes.Unauthenticated:    ErrDenied,
	codes.NotFound:           ErrNotFound,
	codes.AlreadyExists:      ErrExists,
	codes.InvalidArgument:    ErrInvalid,
	codes.FailedPrecondition: ErrUnusable,
	codes.ResourceExhausted:  ErrTooLarge,
	codes.Unavailable:        ErrUnavailable,
}

// Error is a refusal from keywardd: its status code and message.
type Error struct {
	Code    codes.Code
	Message string
	// Limited: the caller (its uid) is over its budget (ErrLimited), not
	// the request too large (ErrTooLarge); both are RESOURCE_EXHAUSTED.
	Limited bool
	// RetryAfter, when Limited, is how long keywardd said to wait before
	// calling again; 0 when it did not say (over its calls in flight: wait
	// for one of them to end).
	RetryAfter time.Duration
}

func (e *Error) Error() string { return fmt.Sprintf("keyward: %s: %s", e.Code, e.Message) }

// Is matches the package's sentinel errors by code.
func (e *Error) Is(target error) bool {
	want, ok := codeErr[e.Code]
	if !ok {
		want = ErrOther
	}
	if e.Limited {
		want = ErrLimited
	}
	return target == want
}

// Wrap turns an error from a generated client into an *Error.
func Wrap(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message()}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.QuotaFailure:
			e.Limited = e.Code == codes.ResourceExhausted
		case *errdetails.RetryInfo:
			e.RetryAfter = d.GetRetryDelay().AsDuration()
		}
	}
	return e
}

// DataKey is a fresh data key.
type DataKey struct {
	Plaintext  []byte // use once, then erase
	Wrapped    []byte // store beside the data
	KeyName    string
	KeyVersion uint32
}

// GenerateDataKey returns a fresh 32-byte data key sealed under keyName.
func (c *Client) GenerateDataKey(ctx context.Context, keyName string, encCtx map[string]string) (*DataKey, error) {
	r, err := c.Envelope.GenerateDataKey(ctx, &keywardv1.GenerateDataKeyRequest{KeyName: keyName, EncryptionContext: encCtx})
	if err != nil {
		return nil, Wrap(err)
	}
	return &DataKey{Plaintext: r.GetPlaintext(), Wrapped: r.GetWrappedKey(), KeyName: r.GetKeyName(), KeyVersion: r.GetKeyVersion()}, nil
}

// Encrypt seals up to 64 KiB under keyName.
func (c *Client) Encrypt(ctx context.Context, keyName string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	r, err := c.Envelope.Encrypt(ctx, &keywardv1.EncryptRequest{KeyName: keyName, Plaintext: plaintext, EncryptionContext: encCtx})
	if err != nil {
		return nil, Wrap(err)
	}
	return r.GetCiphertext(), nil
}

// Decrypt opens a ciphertext or wrapped data key.
func (c *Client) Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, error) {
	r, err := c.Envelope.Decrypt(ctx, &keywardv1.DecryptRequest{Ciphertext: ciphertext, EncryptionContext: encCtx})
	if err != nil {
		return nil, Wrap(err)
	}
	return r.GetPlaintext(), nil
}

// ReEncrypt moves a ciphertext to the newest version of its key.
func (c *Client) ReEncrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, error) {
	r, err := c.Envelope.ReEncrypt(ctx, &keywardv1.ReEncryptRequest{Ciphertext: ciphertext, EncryptionContext: encCtx})
	if err != nil {
		return nil, Wrap(err)
	}
	return r.GetCiphertext(), nil
}
