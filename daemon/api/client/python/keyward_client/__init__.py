"""keyward_client: keywardd's API for Python applications.

A thin wrapper, like the Go client (daemon/api/client): data keys,
encryption, decryption, tokens and API key verification over keywardd's
Unix socket. keywardd knows the caller by the kernel (the process's uid and
binary): there is nothing to configure but the socket.

    import keyward_client as kw

    c = kw.Client()                      # $KEYWARD_SOCKET, else /run/keyward/keyward.sock
    dk = c.generate_data_key("orders", {"tenant": "42"})
    # seal with dk.plaintext (AES-256-GCM), store dk.wrapped beside the data,
    # forget dk.plaintext; later:
    key = c.decrypt(dk.wrapped, {"tenant": "42"})

Every other call of keyward.v1 is there too, through the generated
messages and Client.call (docs/api.md lists them). A refusal raises Error,
with the gRPC code and keywardd's message, which says what to do, and,
when the caller is over its budget, limited and retry_after.

Dependencies: grpcio and protobuf (Debian: python3-grpcio,
python3-protobuf). The *_pb2.py modules are generated from
daemon/api/v1/*.proto (see README.md); the calls are made without
grpcio-tools' stubs.
"""

import os
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2, struct_pb2

from . import apikeys_pb2, envelope_pb2, rpcstatus_pb2, status_pb2, tokens_pb2

__all__ = ["Client", "Error", "DataKey", "Token", "TokenCheck", "APIKeyCheck", "DEFAULT_SOCKET",
           "apikeys_pb2", "envelope_pb2", "status_pb2", "tokens_pb2"]

DEFAULT_SOCKET = "/run/keyward/keyward.sock"


class Error(Exception):
    """keywardd refused or failed a call: code is the gRPC status code's
    name (PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, ...),
    message keywardd's words.

    limited: the caller (its uid) is over its budget (connections, calls in
    flight, call rate), as opposed to a request too large; both are
    RESOURCE_EXHAUSTED. retry_after: when limited, the seconds keywardd
    said to wait before calling again; 0.0 when it did not say (over its
    calls in flight: wait for one of them to end). As the Go client's
    Error.Limited and Error.RetryAfter."""

    def __init__(self, code, message, limited=False, retry_after=0.0):
        super().__init__("keyward: %s: %s" % (code, message))
        self.code, self.message = code, message
        self.limited, self.retry_after = limited, retry_after

    @classmethod
    def from_rpc(cls, e):
        """The Error of a grpc.RpcError, with the details keywardd sent in
        its grpc-status-details-bin trailer."""
        code = e.code().name
        limited, retry_after = False, 0.0
        for key, value in (e.trailing_metadata() or ()):
            if key != "grpc-status-details-bin":
                continue
            try:
                st = rpcstatus_pb2.Status.FromString(value)
            except Exception:  # not keywardd's: the code and message stand
                continue
            for d in st.details:
                if d.type_url.endswith("/google.rpc.QuotaFailure"):
                    limited = code == "RESOURCE_EXHAUSTED"
                elif d.type_url.endswith("/google.rpc.RetryInfo"):
                    ri = rpcstatus_pb2.RetryInfo.FromString(d.value)
                    retry_after = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
        return cls(code, e.details(), limited, retry_after)


@dataclass
class DataKey:
    plaintext: bytes = field(repr=False)  # use, then forget; never printed
    wrapped: bytes = b""                  # store beside the data
    key_name: str = ""
    key_version: int = 0


@dataclass
class Token:
    token: str = field(repr=False)  # a bearer credential: never printed
    token_id: str = ""
    expires: float = 0.0  # Unix seconds


@dataclass
class TokenCheck:
    valid: bool
    reason: str
    subject: str
    scopes: list
    claims: dict


@dataclass
class APIKeyCheck:
    valid: bool
    code: str          # VALID, REVOKED, RATE_LIMITED, ... (APIKeyCode without its prefix)
    reason: str
    key_id: str
    owner: str
    metadata: dict
    retry_after: object  # seconds to wait, for RATE_LIMITED; None when no wait lets it pass (its cost exceeds a burst)


class Client:
    """A connection to keywardd's socket: socket, else $KEYWARD_SOCKET,
    else DEFAULT_SOCKET. timeout bounds each call (seconds)."""

    def __init__(self, socket=None, timeout=30.0):
        self.socket = socket or os.environ.get("KEYWARD_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix:" + self.socket)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method, request, response_type):
        """Calls keyward.v1's method ("EnvelopeService/Decrypt") with a
        generated request message; returns the response message."""
        rpc = self._channel.unary_unary("/keyward.v1." + method, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise Error.from_rpc(e) from None

    def ping(self):
        self.call("StatusService/Ping", status_pb2.PingRequest(), status_pb2.PingResponse)

    def generate_data_key(self, key_name, context=None):
        r = self.call("EnvelopeService/GenerateDataKey",
                      envelope_pb2.GenerateDataKeyRequest(key_name=key_name, encryption_context=context or {}),
                      envelope_pb2.GenerateDataKeyResponse)
        return DataKey(r.plaintext, r.wrapped_key, r.key_name, r.key_version)

    def encrypt(self, key_name, plaintext, context=None):
        """Seals up to 64 KiB under key_name (more: a data key)."""
        return self.call("EnvelopeService/Encrypt",
                         envelope_pb2.EncryptRequest(key_name=key_name, plaintext=plaintext, encryption_context=context or {}),
                         envelope_pb2.EncryptResponse).ciphertext

    def decrypt(self, ciphertext, context=None):
        """Opens a ciphertext or a wrapped data key."""
        return self.call("EnvelopeService/Decrypt",
                         envelope_pb2.DecryptRequest(ciphertext=ciphertext, encryption_context=context or {}),
                         envelope_pb2.DecryptResponse).plaintext

    def mint_token(self, key_name, audiences, scopes=(), claims=None, ttl=None):
        req = tokens_pb2.MintTokenRequest(key_name=key_name, audiences=list(audiences), scopes=list(scopes))
        if claims:
            s = struct_pb2.Struct()
            s.update(claims)
            req.claims.CopyFrom(s)
        if ttl:
            req.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
        r = self.call("TokenService/MintToken", req, tokens_pb2.MintTokenResponse)
        return Token(r.token, r.token_id, r.expire_time.seconds + r.expire_time.nanos / 1e9)

    def verify_token(self, token, audience):
        r = self.call("TokenService/VerifyToken", tokens_pb2.VerifyTokenRequest(token=token, audience=audience),
                      tokens_pb2.VerifyTokenResponse)
        claims = dict(r.claims) if r.HasField("claims") else {}
        return TokenCheck(r.valid, r.reason, r.subject, list(r.scopes), claims)

    def verify_api_key(self, key, environment="", permissions=(), source_ip="", cost=0):
        r = self.call("APIKeyService/VerifyAPIKey",
                      apikeys_pb2.VerifyAPIKeyRequest(key=key, environment=environment, permissions=list(permissions),
                                                      source_ip=source_ip, cost=cost),
                      apikeys_pb2.VerifyAPIKeyResponse)
        code = apikeys_pb2.APIKeyCode.Name(r.code).removeprefix("API_KEY_CODE_")
        retry = r.retry_after.seconds + r.retry_after.nanos / 1e9 if r.HasField("retry_after") else None
        return APIKeyCheck(code == "VALID", code, r.reason, r.key_id, r.owner, dict(r.metadata), retry)
