"""An example keyward plugin in Python: it records each revocation keywardd
sends it, once per operation, in the file EXAMPLE_REVOCATIONS names.

Package it with the SDK as one zipapp, and configure it with its
interpreter, both pinned (docs/plugins.md):

    mkdir -p build && cp -r keyward_plugin build/ && cp example_plugin.py build/__main__.py
    python3 -m zipapp build -o example-py.pyz

    plugins:
      - name: example-py
        path: /usr/lib/keyward/plugins/example-py.pyz
        sha256: ...                       # sha256sum example-py.pyz
        interpreter: /usr/bin/python3.11
        interpreter_sha256: ...           # sha256sum /usr/bin/python3.11
        interpreter_args: ["-I"]          # isolated: imports from the zipapp and the system only
        env: {EXAMPLE_REVOCATIONS: /var/lib/keyward-example/revocations}
"""

import json
import os
import threading

import keyward_plugin as kp

# The SDK calls methods concurrently, and keywardd may repeat an operation
# while the first call still runs: one revocation at a time.
_lock = threading.Lock()


class Example:
    name, version = "example-py", "1.0.0"
    events = [kp.API_KEY_REVOKED, kp.TOKEN_REVOKED]

    def check_config(self, credential):
        try:
            cfg = json.loads(credential.config or b"{}")
        except ValueError as e:
            raise kp.Permanent("the configuration is not JSON: %s" % e)
        if not isinstance(cfg.get("label", ""), str):
            raise kp.Permanent("label must be a string")

    def revoke(self, operation_id, event):
        with _lock:
            self._revoke(operation_id, event)

    def _revoke(self, operation_id, event):
        path = os.environ["EXAMPLE_REVOCATIONS"]
        done = open(path).read().splitlines() if os.path.exists(path) else []
        if any(line.startswith(operation_id + " ") for line in done):
            return  # a repeat of a step done: done
        with open(path, "a") as f:
            f.write("%s %s %s %s\n" % (operation_id, kp.pb.EventKind.Name(event.kind), event.id, event.subject))
        kp.log("info", "revoked", operation=operation_id, id=event.id)


kp.serve(Example())
