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
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyward_client as kw

client = kw.Client()
notes = {}  # (owner, name) -> (wrapped data key, nonce, ciphertext): each key's owner sees its own notes
NAME = re.compile(r"^/notes/([a-z0-9-]{1,64})$")
MAX_NOTE = 64 << 10


class Handler(BaseHTTPRequestHandler):
    def admitted(self, perm):
        """The key's owner, if the request may go on; else None, answered."""
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        check = client.verify_api_key(key, environment=os.environ.get("APP_ENV", "prod"), permissions=[perm],
                                      source_ip=self.client_address[0])
        if not check.valid:
            status = {"RATE_LIMITED": 429, "USAGE_EXCEEDED": 429, "FORBIDDEN": 403, "IP_NOT_ALLOWED": 403}.get(check.code, 401)
            self.send_response(status)
            if check.retry_after is not None and status == 429:
                self.send_header("Retry-After", str(int(check.retry_after) + 1))
            self.end_headers()
            self.wfile.write(("refused: %s\n" % check.code).encode())
            return None
        return check.owner

    def note(self):
        m = NAME.match(self.path)
        if not m:
            self.send_response(404)
            self.end_headers()
        return m and m.group(1)

    def do_POST(self):
        owner = self.admitted("notes:write")
        name = owner and self.note()
        if not name:
            return
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_NOTE:
            self.send_response(413 if n > MAX_NOTE else 411)
            self.end_headers()
            return
        body = self.rfile.read(n)
        # The context binds the data key to its owner and note: another
        # owner's key does not open it.
        context = {"owner": owner, "note": name}
        dk = client.generate_data_key("notes", context)
        nonce = os.urandom(12)
        notes[(owner, name)] = (dk.wrapped, nonce, AESGCM(dk.plaintext).encrypt(nonce, body, name.encode()))
        # Only the wrapped key is kept (Python cannot wipe dk.plaintext;
        # dropping it is what it can do).
        self.send_response(204)
        self.end_headers()

    def do_GET(self):
        owner = self.admitted("notes:read")
        name = owner and self.note()
        if not name:
            return
        if (owner, name) not in notes:
            self.send_response(404)
            self.end_headers()
            return
        wrapped, nonce, sealed = notes[(owner, name)]
        key = client.decrypt(wrapped, {"owner": owner, "note": name})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(AESGCM(key).decrypt(nonce, sealed, name.encode()))


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8080), Handler).serve_forever()
