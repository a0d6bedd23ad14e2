"""An example application using keyward from Python: an HTTP service that
admits a request only with a valid API key (Authorization: Bearer ...),
keeps what it is sent sealed under a data key, and gives it back.

    KEYWARD_SOCKET=/run/keyward/keyward.sock PYTHONPATH=daemon/api/client/python \\
        python3 daemon/api/client/python/example_app.py 8080

    curl -H "Authorization: Bearer kw_..." -d hello localhost:8080/notes/1
    curl -H "Authorization: Bearer kw_..." localhost:8080/notes/1

The policy must grant its uid EnvelopeService.GenerateDataKey and Decrypt
on the key "notes", and APIKeyService.VerifyAPIKey.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyward_client as kw

client = kw.Client()
notes = {}  # name -> (wrapped data key, nonce, ciphertext)


class Handler(BaseHTTPRequestHandler):
    def admitted(self, perm):
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        check = client.verify_api_key(key, environment=os.environ.get("APP_ENV", "prod"), permissions=[perm],
                                      source_ip=self.client_address[0])
        if not check.valid:
            status = {"RATE_LIMITED": 429, "USAGE_EXCEEDED": 429, "FORBIDDEN": 403, "IP_NOT_ALLOWED": 403}.get(check.code, 401)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(("refused: %s\n" % check.code).encode())
            return False
        return True

    def do_POST(self):
        if not self.admitted("notes:write"):
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        name = self.path.rsplit("/", 1)[-1]
        dk = client.generate_data_key("notes", {"note": name})
        nonce = os.urandom(12)
        notes[name] = (dk.wrapped, nonce, AESGCM(dk.plaintext).encrypt(nonce, body, name.encode()))
        del dk  # the plaintext key goes; the wrapped one stays with the note
        self.send_response(204)
        self.end_headers()

    def do_GET(self):
        if not self.admitted("notes:read"):
            return
        name = self.path.rsplit("/", 1)[-1]
        if name not in notes:
            self.send_response(404)
            self.end_headers()
            return
        wrapped, nonce, sealed = notes[name]
        key = client.decrypt(wrapped, {"note": name})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(AESGCM(key).decrypt(nonce, sealed, name.encode()))


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8080), Handler).serve_forever()
