"""Release store tests: real files under tmp_path, real PKIs, real zstd."""

from __future__ import annotations

import random
from pathlib import Path


def make_tree(root: Path, *, app: bytes = b"#!/bin/sh\nexec sleep 1000\n") -> Path:
    """A small workload tree: an executable, a config file, a nested dir, an in-tree symlink."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(app)
    (root / "bin" / "app").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("port = 8080\n")
    (root / "run").write_bytes(b"#!/bin/sh\nexec ./bin/app\n")
    (root / "run").chmod(0o755)
    (root / "etc" / "current.conf").symlink_to("app.conf")
    (root / "empty").mkdir()
    return root


def binaryish(seed: int, size: int) -> bytearray:
    """Data that compresses like a program: a random vocabulary of blocks repeated in random order.

    Seeded, so every run measures the same thing; pure random bytes would not compress at all.
    """
    rng = random.Random(seed)
    vocabulary = [rng.randbytes(rng.randint(16, 96)) for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(vocabulary)
    return out[:size]


def patch(data: bytearray, seed: int, *, edits: int, edit_size: int) -> bytearray:
    """A "patch release" of ``data``: a few small rewrites plus one insertion that shifts the rest."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(edits):
        at = rng.randrange(len(out) - edit_size)
        out[at : at + edit_size] = rng.randbytes(edit_size)
    at = rng.randrange(len(out))
    out[at:at] = rng.randbytes(edit_size)
    return out
