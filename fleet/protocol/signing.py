"""Ed25519 signatures over desired state, commands and release manifests.

The signature covers the canonical JSON of the *raw* document (every key but ``signature``), not
of a model, so fields an older receiver does not know are still covered. Canonical JSON: sorted
keys, no spaces, UTF-8, integral floats written as integers (``1.0`` and ``1`` sign the same, as
JSON writers disagree on them). Import this module only where signatures are used: it loads
``cryptography``, which the agent's idle path avoids.

Control-plane documents (desired state and commands, signed with the controller's control key)
are also *bound*: the signed fields name the node (``node``), the channel (``kind``: ``desired``
or ``cmd``) and the controller's issue time (``issued_at``); a command also its expiry
(``expires_at``). Generation and command id are signed fields already. :func:`sign_control` writes
them, :func:`verify_control` checks signature and binding, so a document signed for one node or
channel is refused everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from fleet.protocol.codec import MAX_PAYLOAD, Payload, decode_raw, validate
from fleet.protocol.errors import ConfigError, InvalidMessage, InvalidSignature
from fleet.protocol.messages import Command, DesiredState

SIGNATURE_FIELD = "signature"
_SIGNATURE_LEN = 64

DESIRED_KIND = "desired"
"""``kind`` of a signed desired state (the channel name)."""
COMMAND_KIND = "cmd"
"""``kind`` of a signed command (the channel name)."""

M = TypeVar("M", bound=BaseModel)
S = TypeVar("S", DesiredState, Command)


class InvalidKey(ConfigError):
    """Key material that is not a usable Ed25519 key; the message says why."""


# --- keys ---------------------------------------------------------------------------------------


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An unencrypted PEM (PKCS#8) Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidKey(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """A PEM (SubjectPublicKeyInfo) Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidKey(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


# --- documents ----------------------------------------------------------------------------------


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: canonical JSON of ``doc`` without its ``signature``."""
    unsigned = {key: value for key, value in doc.items() if key != SIGNATURE_FIELD}
    text = json.dumps(
        _canonical(unsigned, ""),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return text.encode("utf-8")


def sign_document(doc: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``doc`` with ``signature`` set to the base64 Ed25519 signature of its canonical bytes."""
    signature = private_key.sign(canonical_bytes(doc))
    signed = dict(doc)
    signed[SIGNATURE_FIELD] = base64.b64encode(signature).decode("ascii")
    return signed


def verify_document(doc: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    """Raise ``InvalidSignature`` unless ``doc`` carries a valid signature by ``public_key``."""
    signature = _signature_bytes(doc.get(SIGNATURE_FIELD))
    try:
        payload = canonical_bytes(doc)
    except InvalidMessage as exc:
        raise InvalidSignature(f"document cannot be signed: {exc.reason}", field=exc.field) from exc
    try:
        public_key.verify(signature, payload)
    except _CryptoInvalidSignature as exc:
        raise InvalidSignature("signature does not match the document and key", field=SIGNATURE_FIELD) from exc


# --- models -------------------------------------------------------------------------------------


def sign_model(model: BaseModel, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The model as the raw map ``codec.encode`` sends (no ``None`` fields), signed."""
    return sign_document(_wire_dict(model), private_key)


def sign_message(message: S, private_key: Ed25519PrivateKey) -> S:
    """A ``DesiredState`` or ``Command`` with its ``signature`` set; ``codec.encode`` of it verifies."""
    signed = sign_model(message, private_key)
    return message.model_copy(update={SIGNATURE_FIELD: signed[SIGNATURE_FIELD]})


def sign_manifest(manifest: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A release manifest (a plain map for now) with its signature."""
    return sign_document(manifest, private_key)


def verify_manifest(manifest: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    verify_document(manifest, public_key)


# --- control plane: desired state and commands, bound to node and channel ------------------------


def kind_of(message: DesiredState | Command) -> str:
    """The ``kind`` a desired state or command is signed as: the name of its channel."""
    return DESIRED_KIND if isinstance(message, DesiredState) else COMMAND_KIND


def bind(message: S, node: str, issued_at: float) -> S:
    """``message`` naming ``node``, its channel and ``issued_at`` (controller time), unsigned."""
    update = {"node": node, "kind": kind_of(message), "issued_at": issued_at, SIGNATURE_FIELD: None}
    return message.model_copy(update=update)


def sign_control(message: S, node: str, private_key: Ed25519PrivateKey, *, issued_at: float) -> S:
    """A desired state or command for ``node`` bound (:func:`bind`) and signed with the control key.

    ``ValueError`` for a command without ``expires_at``: a signed command must end (its id is
    remembered for a limited time only, so an endless one could be replayed after that)."""
    if isinstance(message, Command) and message.expires_at is None:
        raise ValueError("a signed command needs expires_at")
    return sign_message(bind(message, node, issued_at), private_key)


def verify_control(raw: Mapping[str, Any], public_key: Ed25519PublicKey, *, node: str, kind: str) -> None:
    """``InvalidSignature`` unless ``raw`` is signed by ``public_key`` and bound to ``node`` and
    ``kind`` (:func:`check_binding`); the reason says which."""
    verify_document(raw, public_key)
    check_binding(raw, node=node, kind=kind)


def check_binding(raw: Mapping[str, Any], *, node: str, kind: str) -> None:
    """``InvalidSignature`` unless the (verified) document names ``node`` and ``kind`` and carries
    ``issued_at``, and, as a command, ``expires_at``. Checked on the raw map, before any model."""
    signed_kind = raw.get("kind")
    if not isinstance(signed_kind, str):
        raise InvalidSignature(f"signed without kind (must be {kind!r})", field="kind")
    if signed_kind != kind:
        raise InvalidSignature(f"signed as {_short(signed_kind)!r}, not as {kind!r}", field="kind")
    signed_node = raw.get("node")
    if not isinstance(signed_node, str):
        raise InvalidSignature(f"signed without node (must be {node!r})", field="node")
    if signed_node != node:
        raise InvalidSignature(f"signed for node {_short(signed_node)!r}, not for {node!r}", field="node")
    if not _is_time(raw.get("issued_at")):
        raise InvalidSignature("signed without issued_at", field="issued_at")
    if kind == COMMAND_KIND and not _is_time(raw.get("expires_at")):
        raise InvalidSignature("signed command without expires_at", field="expires_at")


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _short(text: str) -> str:
    return text if len(text) <= 64 else text[:61] + "..."


def decode_signed(
    topic: str,
    payload: Payload,
    model: type[M],
    public_key: Ed25519PublicKey,
    *,
    max_size: int = MAX_PAYLOAD,
) -> M:
    """Decode, check the signature over the raw map, then validate: forged documents never reach a model."""
    raw = decode_raw(topic, payload, max_size=max_size)
    try:
        verify_document(raw, public_key)
    except InvalidSignature as exc:
        raise InvalidSignature(exc.reason, topic=topic, field=exc.field) from exc
    return validate(topic, raw, model)


# --- helpers ------------------------------------------------------------------------------------


def _wire_dict(model: BaseModel) -> dict[str, Any]:
    # Enums become their string values, exactly as they arrive on the other side.
    plain: dict[str, Any] = _plain(model.model_dump(mode="python", exclude_none=True))
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _canonical(value: Any, path: str) -> Any:
    """``value`` with integral floats as ints; refuses what JSON cannot carry exactly."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessage(f"{value} cannot be signed", field=path or None)
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidMessage(f"map key {key!r} is not a string", field=path or None)
            out[key] = _canonical(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{path}.{index}") for index, item in enumerate(value)]
    raise InvalidMessage(f"a signed document cannot hold {type(value).__name__} values", field=path or None)


def _signature_bytes(value: object) -> bytes:
    """The raw signature from its base64 (as written by ``sign_document``) or hex form."""
    if value is None:
        raise InvalidSignature("document is not signed", field=SIGNATURE_FIELD)
    if not isinstance(value, str):
        raise InvalidSignature("signature must be a string", field=SIGNATURE_FIELD)
    try:
        is_hex = len(value) == 2 * _SIGNATURE_LEN  # base64 of 64 bytes is 88 characters
        raw = bytes.fromhex(value) if is_hex else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidSignature("signature is neither base64 nor hex", field=SIGNATURE_FIELD) from exc
    if len(raw) != _SIGNATURE_LEN:
        raise InvalidSignature(f"signature must be {_SIGNATURE_LEN} bytes, not {len(raw)}", field=SIGNATURE_FIELD)
    return raw
