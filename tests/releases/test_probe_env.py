"""A release's health probe declares the workload variables its target may use (``health.env``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.protocol.errors import InvalidSignature
from fleet.protocol.messages import ProbeSpec
from fleet.protocol.signing import verify_manifest
from fleet.releases import ReleaseError, ReleaseProbe, build_release, verify_manifest_file
from fleet.releases.manifest import parse_manifest
from tests.releases import make_tree

TARGET = "http://127.0.0.1:${APP_PORT}/healthz"


KEY = Ed25519PrivateKey.generate()


def build(tmp_path: Path, health: ProbeSpec | None) -> tuple[Path, dict[str, Any]]:
    key = KEY
    manifest = build_release(
        make_tree(tmp_path / "src"),
        name="app",
        version="1.0.0",
        store=tmp_path / "store",
        release_key=key,
        entry=["bin/app"],
        health=health,
        chunk_size=64 * 1024,
    )
    path = tmp_path / "store" / "app" / "1.0.0" / "manifest.json"
    verify_manifest_file(path, key.public_key())
    return path, manifest.document()


def test_declared_variables_are_signed_with_the_manifest(tmp_path: Path) -> None:
    _path, document = build(tmp_path, ReleaseProbe(kind="http", target=TARGET, env=["APP_PORT"]))
    assert document["health"] == {
        "kind": "http",
        "target": TARGET,
        "initial_delay": 0.0,
        "period": 10.0,
        "timeout": 1.0,
        "failure_threshold": 3,
        "env": ["APP_PORT"],
    }
    verify_manifest(document, KEY.public_key())
    tampered = {**document, "health": {**document["health"], "env": ["APP_PORT", "API_TOKEN"]}}
    with pytest.raises(InvalidSignature):
        verify_manifest(tampered, KEY.public_key())


def test_a_probe_without_declared_variables_is_signed_as_before(tmp_path: Path) -> None:
    _path, document = build(tmp_path, ProbeSpec(kind="http", target=TARGET))
    assert "env" not in document["health"]


def test_only_variable_names_may_be_declared() -> None:
    with pytest.raises(ReleaseError, match="env"):
        parse_manifest(
            {
                "name": "app",
                "version": "1.0.0",
                "digest": "sha256:" + "ab" * 32,
                "size": 1,
                "chunk_size": 1024,
                "chunk_digests": ["ab" * 32],
                "entry": ["run"],
                "health": {"kind": "http", "target": TARGET, "env": ["APP PORT; rm -rf /"]},
                "created_at": 0,
            },
            source="test",
        )
