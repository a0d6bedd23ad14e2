"""keyward_plugin: write a keyward plugin in Python.

A plugin is an object with the methods of its capabilities; serve() does
the rest: it checks that keywardd started it, makes the TLS certificate of
go-plugin's AutoMTLS, serves gRPC on a Unix socket, answers the health
check and the shutdown call, prints the handshake line, and logs to
standard error as JSON lines keywardd understands. docs/plugins.md ("The
handshake, for a plugin not in Go") says what each step is for.

    import keyward_plugin as kp

    class Mine:
        name, version = "mine", "1.0.0"
        events = [kp.API_KEY_REVOKED]

        def check_config(self, credential): ...
        def revoke(self, operation_id, event): ...

    kp.serve(Mine())

Methods (define those of your capabilities; the others answer
UNIMPLEMENTED):

- check_config(credential) -> None
- create(operation_id, credential, secret, current_handle) -> handle, or
  (handle, secret) for a plugin that generates its secrets
- test(operation_id, credential, handle, secret) -> None
- activate(operation_id, credential, handle, previous_handle) -> None
- retire(operation_id, credential, handle) -> None
- revoke(operation_id, event) -> None

credential has .name and .config (the JSON bytes keywardd holds for it);
event has .kind, .id, .subject, .time (a datetime) and .detail. Raise
Permanent for a failure keywardd must not retry (a bad configuration);
anything else is retried with backoff. Every step may be repeated with the
same operation_id: do it once.

Dependencies: grpcio, protobuf (Debian: python3-grpcio, python3-protobuf)
and cryptography (python3-cryptography). plugin_pb2.py is generated from
plugins/proto/v1/plugin.proto (see README.md); the gRPC services are
registered by hand here, so grpcio-tools is not needed.
"""

import base64
import ctypes
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import plugin_pb2 as pb

__all__ = ["serve", "log", "Permanent", "API_KEY_REVOKED", "TOKEN_REVOKED", "KEY_VERSION_REVOKED",
           "CREDENTIAL_REVOKED", "ROTATION_DUE", "ANOMALY", "KEY_VERSION_RETIRED", "API_KEY_LEAKED"]

# The cookie keywardd sets: a plugin is not run by hand.
COOKIE_KEY, COOKIE_VALUE = "KEYWARD_PLUGIN", "7c9f0e2a-keyward-plugin-v1"
# go-plugin's protocol version, and keyward's plugin protocol's.
CORE_PROTOCOL, APP_PROTOCOL = 1, 1

API_KEY_REVOKED = pb.EVENT_KIND_API_KEY_REVOKED
TOKEN_REVOKED = pb.EVENT_KIND_TOKEN_REVOKED
KEY_VERSION_REVOKED = pb.EVENT_KIND_KEY_VERSION_REVOKED
CREDENTIAL_REVOKED = pb.EVENT_KIND_CREDENTIAL_REVOKED
ROTATION_DUE = pb.EVENT_KIND_ROTATION_DUE
ANOMALY = pb.EVENT_KIND_ANOMALY
KEY_VERSION_RETIRED = pb.EVENT_KIND_KEY_VERSION_RETIRED
API_KEY_LEAKED = pb.EVENT_KIND_API_KEY_LEAKED


class Permanent(Exception):
    """A failure keywardd must not retry (FAILED_PRECONDITION)."""


# As the Go SDK's sdk.SecretName: an attribute so named is redacted.
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "private", "apikey", "api_key")
_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error", "critical": "error"}
_stderr = sys.stderr  # the log's, kept before serve() points sys.stdout at it


def _redact(v):
    if isinstance(v, dict):
        return {k: "[redacted]" if any(w in str(k).lower() for w in _SECRET_WORDS) else _redact(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_redact(x) for x in v]
    return v


def log(level, message, **attrs):
    """Writes one JSON log line to standard error: keywardd's log line at
    level (debug, info, warn or warning, error or critical). An attribute
    whose name says it holds a secret is redacted, at any depth."""
    line = {"@level": _LEVELS.get(level, "info"), "@message": message,
            "@timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    line.update(_redact(attrs))
    _stderr.write(json.dumps(line, default=str) + "\n")
    _stderr.flush()


class _Event:
    def __init__(self, e):
        self.kind, self.id, self.subject, self.detail = e.kind, e.id, e.subject, e.detail
        self.time = e.time.ToDatetime(tzinfo=datetime.timezone.utc) if e.HasField("time") else None


def _certificate():
    """A fresh self-signed certificate for this launch, as go-plugin's
    AutoMTLS expects: a CA naming localhost, for server and client auth."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False, key_agreement=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert, key_pem


def _scrub(text, request):
    """text without the request's secret, as the Go SDK's errors: a
    plugin's message or traceback may quote it (a failed login)."""
    secret = getattr(request, "secret", b"")
    if secret:
        for form in (repr(secret), secret.decode("utf-8", "replace")):
            text = text.replace(form, "[redacted]")
    return text


def _unary(fn, request_type, response_type):
    """A gRPC handler calling fn(request) -> response, with the plugin's
    failures as statuses: Permanent is FAILED_PRECONDITION, anything else
    UNAVAILABLE (retried); the request's secret never in a message or a
    log line. The methods are called concurrently (a retry may overlap the
    call it repeats): guard what they share."""
    def handle(request, context):
        if getattr(request, "operation_id", None) == "" and hasattr(request, "operation_id"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no operation_id")
        try:
            return fn(request) or response_type()
        except Permanent as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, _scrub(str(e), request))
        except NotImplementedError:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a capability of this plugin")
        except Exception as e:  # a plugin's bug or its system's failure: retried
            log("error", "a call failed", error=_scrub(repr(e), request),
                trace=_scrub(traceback.format_exc(limit=5), request))
            context.abort(grpc.StatusCode.UNAVAILABLE, _scrub(str(e), request))
    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                               response_serializer=lambda m: m.SerializeToString())


def _watch_parent():
    """Exits when keywardd does: PR_SET_PDEATHSIG fires when the thread
    that started the plugin ends, not keywardd, so the parent is polled
    too (as the Go SDK's watchdog)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def poll():
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(1)
    threading.Thread(target=poll, daemon=True).start()


def _raw(fn):
    """A handler of raw bytes: the health check's and the controller's,
    whose messages are too small to need their generated code."""
    return grpc.unary_unary_rpc_method_handler(lambda req, ctx: fn(req), request_deserializer=lambda b: b,
                                               response_serializer=lambda b: b)


def serve(plugin):
    """Serves plugin until keywardd stops it. Never returns but by exit."""
    if os.environ.get(COOKIE_KEY) != COOKIE_VALUE:
        sys.stderr.write("This is a keyward plugin: keywardd runs it (docs/plugins.md), not a person.\n")
        sys.exit(1)
    versions = os.environ.get("PLUGIN_PROTOCOL_VERSIONS", str(APP_PROTOCOL)).split(",")
    if str(APP_PROTOCOL) not in versions:
        sys.stderr.write("keywardd speaks plugin protocol versions %s; this plugin speaks %d\n" % (versions, APP_PROTOCOL))
        sys.exit(1)
    client_cert = os.environ.get("PLUGIN_CLIENT_CERT", "").encode()
    if not client_cert:
        sys.stderr.write("no PLUGIN_CLIENT_CERT: keywardd gives one (go-plugin's AutoMTLS)\n")
        sys.exit(1)

    caps, handlers = [], {}
    has = lambda m: callable(getattr(plugin, m, None))
    if all(has(m) for m in ("create", "test", "activate", "retire")):
        caps.append(pb.CAPABILITY_ROTATOR)
    if has("revoke"):
        caps.append(pb.CAPABILITY_REVOKER)
    describe = pb.DescribeResponse(name=plugin.name, version=plugin.version, capabilities=caps,
                                   events=list(getattr(plugin, "events", [])))
    if getattr(plugin, "plugin_generates", False):
        describe.secret.plugin_generates = True

    handlers["keyward.plugin.v1.PluginService"] = {
        "Describe": _unary(lambda r: describe, pb.DescribeRequest, pb.DescribeResponse),
        "CheckConfig": _unary(lambda r: plugin.check_config(r.credential) if has("check_config") else None,
                              pb.CheckConfigRequest, pb.CheckConfigResponse),
    }
    if pb.CAPABILITY_ROTATOR in caps:
        def create(r):
            out = plugin.create(r.operation_id, r.credential, r.secret, r.current_handle)
            handle, secret = out if isinstance(out, tuple) else (out, b"")
            return pb.CreateResponse(handle=handle, secret=secret)
        handlers["keyward.plugin.v1.RotatorService"] = {
            "Create": _unary(create, pb.CreateRequest, pb.CreateResponse),
            "Test": _unary(lambda r: plugin.test(r.operation_id, r.credential, r.handle, r.secret),
                           pb.TestRequest, pb.TestResponse),
            "Activate": _unary(lambda r: plugin.activate(r.operation_id, r.credential, r.handle, r.previous_handle),
                               pb.ActivateRequest, pb.ActivateResponse),
            "Retire": _unary(lambda r: plugin.retire(r.operation_id, r.credential, r.handle),
                             pb.RetireRequest, pb.RetireResponse),
        }
    if pb.CAPABILITY_REVOKER in caps:
        handlers["keyward.plugin.v1.RevokerService"] = {
            "Revoke": _unary(lambda r: plugin.revoke(r.operation_id, _Event(r.event)),
                             pb.RevokeRequest, pb.RevokeResponse),
        }
    stop = threading.Event()
    # grpc.health.v1.Health/Check: SERVING (field 1, varint 1), whatever
    # the service asked; go-plugin asks for "plugin".
    handlers["grpc.health.v1.Health"] = {"Check": _raw(lambda req: b"\x08\x01")}
    # go-plugin's controller: Shutdown(Empty) returns Empty.
    handlers["plugin.GRPCController"] = {"Shutdown": _raw(lambda req: (stop.set(), b"")[1])}

    cert, key_pem = _certificate()
    creds = grpc.ssl_server_credentials([(key_pem, cert.public_bytes(serialization.Encoding.PEM))],
                                        root_certificates=client_cert, require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(s, m) for s, m in handlers.items()])
    _watch_parent()
    sock_dir = tempfile.mkdtemp(prefix="keyward-plugin-", dir=os.environ.get("PLUGIN_UNIX_SOCKET_DIR") or None)
    sock = os.path.join(sock_dir, "plugin.sock")
    server.add_secure_port("unix:" + sock, creds)
    server.start()
    der = cert.public_bytes(serialization.Encoding.DER)
    # The sixth field: the certificate's DER in base64 without padding
    # (the line has no room for PEM's newlines).
    line = "%d|%d|unix|%s|grpc|%s" % (CORE_PROTOCOL, APP_PROTOCOL, sock, base64.b64encode(der).decode().rstrip("="))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    # Standard output was the handshake's: go-plugin drops whatever comes
    # after, so a stray print goes to the log instead.
    sys.stdout = sys.stderr
    log("info", "serving", plugin=plugin.name, version=plugin.version)
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    shutil.rmtree(sock_dir, ignore_errors=True)
    sys.exit(0)
