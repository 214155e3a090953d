"""Ed25519 signatures over raw documents: valid, tampered, extended, unsigned, wrong key."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.protocol.codec import decode, decode_raw, encode, encode_document
from fleet.protocol.errors import ConfigError, InvalidMessage, InvalidSignature
from fleet.protocol.messages import Command, DesiredState, ReleaseRef
from fleet.protocol.signing import (
    InvalidKey,
    canonical_bytes,
    decode_signed,
    load_private_key,
    load_public_key,
    sign_document,
    sign_manifest,
    sign_message,
    sign_model,
    verify_document,
    verify_manifest,
)

TOPIC = "fleet/v1/nodes/gw1/desired"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _desired() -> DesiredState:
    release = ReleaseRef(name="app", version="2.0", digest="ab" * 32, size=10, chunk_size=4)
    return DesiredState(generation=3, release=release, config={"mode": "fast"}, issued_at=1_700_000_000.0)


def test_valid_signature_verifies(key: Ed25519PrivateKey) -> None:
    doc = sign_document({"generation": 1, "config": {"a": "ü"}}, key)
    assert len(base64.b64decode(doc["signature"])) == 64
    verify_document(doc, key.public_key())


def test_signing_does_not_change_the_input(key: Ed25519PrivateKey) -> None:
    original = {"generation": 1}
    signed = sign_document(original, key)
    assert original == {"generation": 1}
    assert signed.keys() == {"generation", "signature"}


def test_hex_signature_is_accepted(key: Ed25519PrivateKey) -> None:
    doc = sign_document({"generation": 1}, key)
    doc["signature"] = base64.b64decode(doc["signature"]).hex()
    verify_document(doc, key.public_key())


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(generation=2),
        lambda d: d["config"].update(mode="slow"),
        lambda d: d.update(added_later=True),  # a field an older receiver would ignore is still covered
        lambda d: d.pop("config"),
    ],
)
def test_tampering_breaks_the_signature(key: Ed25519PrivateKey, tamper: Any) -> None:
    doc = sign_document({"generation": 1, "config": {"mode": "fast"}}, key)
    tamper(doc)
    with pytest.raises(InvalidSignature) as info:
        verify_document(doc, key.public_key())
    assert info.value.field == "signature"


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "not signed"),
        (42, "must be a string"),
        ("not base64 at all!", "neither base64 nor hex"),
        (base64.b64encode(b"\x00" * 10).decode(), "64 bytes"),
        ("zz" * 64, "neither base64 nor hex"),
        (base64.b64encode(b"\x00" * 64).decode(), "does not match"),
    ],
)
def test_missing_or_malformed_signature(key: Ed25519PrivateKey, signature: object, reason: str) -> None:
    doc: dict[str, Any] = {"generation": 1}
    if signature is not None:
        doc["signature"] = signature
    with pytest.raises(InvalidSignature, match=reason):
        verify_document(doc, key.public_key())


def test_wrong_key(key: Ed25519PrivateKey, other_key: Ed25519PrivateKey) -> None:
    doc = sign_document({"generation": 1}, key)
    with pytest.raises(InvalidSignature):
        verify_document(doc, other_key.public_key())


def test_canonical_form_is_stable() -> None:
    assert canonical_bytes({"b": 1, "a": {"y": 2.0, "x": "é"}, "signature": "ignored"}) == (
        '{"a":{"x":"é","y":2},"b":1}'.encode()
    )
    assert canonical_bytes({"t": 1.0}) == canonical_bytes({"t": 1})
    assert canonical_bytes({"t": 0.1}) == b'{"t":0.1}'


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"data": b"raw"}, "data"),
        ({"a": {"b": [1, b"x"]}}, "a.b.1"),
        ({"f": float("nan")}, "f"),
        ({"a": {1: "x"}}, "a"),
        ({"s": {1, 2}}, "s"),
    ],
)
def test_unsignable_values_are_refused(key: Ed25519PrivateKey, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        sign_document(doc, key)
    assert info.value.field == field
    assert not isinstance(info.value, InvalidSignature)
    with pytest.raises(InvalidSignature):
        verify_document({**doc, "signature": "AA" * 64}, key.public_key())


def test_signed_model_survives_the_wire_in_msgpack_and_json(key: Ed25519PrivateKey) -> None:
    signed = sign_message(_desired(), key)
    assert signed.signature is not None
    assert decode_signed(TOPIC, encode(signed), DesiredState, key.public_key()) == signed
    as_json = signed.model_dump_json(exclude_none=True).encode()
    assert decode_signed(TOPIC, as_json, DesiredState, key.public_key()) == signed


def test_sign_model_returns_the_wire_map(key: Ed25519PrivateKey) -> None:
    command = Command(id="c1", action="reboot", args={"force": True}, issued_at=5.0)
    doc = sign_model(command, key)
    assert doc["id"] == "c1"
    assert "expires_at" not in doc  # None fields are not sent, so not signed either
    raw = decode_raw("t", encode_document(doc))
    verify_document(raw, key.public_key())
    assert decode("t", encode_document(doc), Command).signature == doc["signature"]


def test_newer_sender_fields_are_covered(key: Ed25519PrivateKey) -> None:
    doc = sign_document({"id": "c1", "action": "reboot", "priority": "high"}, key)
    payload = encode_document(doc)
    assert decode_signed("t", payload, Command, key.public_key()).id == "c1"
    forged = encode_document({**doc, "priority": "low"})
    with pytest.raises(InvalidSignature) as info:
        decode_signed("t", forged, Command, key.public_key())
    assert info.value.topic == "t"


def test_decode_signed_rejects_unsigned_and_wrong_key(key: Ed25519PrivateKey, other_key: Ed25519PrivateKey) -> None:
    with pytest.raises(InvalidSignature, match="not signed"):
        decode_signed(TOPIC, encode(_desired()), DesiredState, key.public_key())
    with pytest.raises(InvalidSignature):
        decode_signed(TOPIC, encode(sign_message(_desired(), other_key)), DesiredState, key.public_key())


def test_decode_signed_still_validates(key: Ed25519PrivateKey) -> None:
    payload = encode_document(sign_document({"generation": "three"}, key))
    with pytest.raises(InvalidMessage) as info:
        decode_signed(TOPIC, payload, DesiredState, key.public_key())
    assert info.value.field == "generation"
    assert not isinstance(info.value, InvalidSignature)


def test_manifests(key: Ed25519PrivateKey) -> None:
    manifest = sign_manifest({"name": "app", "version": "2.0", "chunks": ["ab" * 32]}, key)
    verify_manifest(manifest, key.public_key())
    with pytest.raises(InvalidSignature):
        verify_manifest({**manifest, "version": "2.1"}, key.public_key())


def test_keys_load_from_pem(key: Ed25519PrivateKey) -> None:
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    loaded = load_private_key(private_pem)
    verify_document(sign_document({"a": 1}, loaded), load_public_key(public_pem))


def test_bad_key_material_is_a_config_error() -> None:
    ec_key = generate_private_key(SECP256R1())
    ec_private = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidKey, match="Ed25519"):
        load_private_key(ec_private)
    with pytest.raises(InvalidKey, match="Ed25519"):
        load_public_key(ec_public)
    with pytest.raises(InvalidKey, match="PEM"):
        load_private_key(b"garbage")
    with pytest.raises(InvalidKey, match="PEM"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    assert issubclass(InvalidKey, ConfigError)
