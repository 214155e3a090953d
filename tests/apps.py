"""A tiny sample workload for update and rollout tests: an HTTP server with a health endpoint."""

from __future__ import annotations

import random
import sys
from pathlib import Path

APP = """#!{python}
import http.server, os
VERSION = {version!r}
HEALTHY = {healthy!r}
with open(os.environ["MARKER"], "a") as marker:
    marker.write(VERSION + "\\n")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if HEALTHY else 500)
        self.end_headers()
        self.wfile.write(VERSION.encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Handler).serve_forever()
"""


def app_tree(root: Path, version: str, *, healthy: bool = True, edits: int = 0) -> Path:
    """A small app plus 200 kB of incompressible data (about 13 chunks); versions differ by a few
    edited bytes, so a delta is tiny while the full artifact is not."""
    root.mkdir(parents=True)
    run = root / "run"
    run.write_text(APP.format(python=sys.executable, version=version, healthy=healthy))
    run.chmod(0o755)
    data = bytearray(random.Random(7).randbytes(200_000))
    edit = random.Random(version)
    for _ in range(edits):
        data[edit.randrange(len(data))] = edit.randrange(256)
    (root / "data.bin").write_bytes(bytes(data))
    return root
