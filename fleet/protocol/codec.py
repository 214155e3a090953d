"""Bytes <-> messages: msgpack on the wire, JSON accepted from people, every failure an ``InvalidMessage``.

A payload whose first non-whitespace byte is ``{`` is JSON (so ``mosquitto_pub -m '{...}'`` works);
anything else is msgpack. Both decode to the same plain structure (``decode_raw``), which signatures
are checked against before the model sees it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

# msgpack ships no type hints; pyproject could list it under ignore_missing_imports instead.
import msgpack  # type: ignore[import-untyped,unused-ignore]
from pydantic import BaseModel, ValidationError

from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import CHANNEL_MODEL, Message
from fleet.protocol.topics import Channel, parse_node_topic

MAX_PAYLOAD = 256 * 1024
"""Default size cap; an artifact chunk (up to 128 KiB, or its base64 in JSON) fits."""

MAX_DEPTH = 32
"""Deepest nesting of maps and arrays accepted; deeper payloads are refused before validation."""

_WHITESPACE = b" \t\r\n"

M = TypeVar("M", bound=BaseModel)

Payload = bytes | bytearray | memoryview


class Decoded(NamedTuple):
    node_id: str
    channel: Channel
    message: Message


def encode(msg: BaseModel, *, max_size: int = MAX_PAYLOAD) -> bytes:
    """A message as a msgpack map, without its ``None`` fields."""
    data = msg.model_dump(mode="python", exclude_none=True)
    float32_fields: frozenset[str] = getattr(type(msg), "WIRE_FLOAT32", frozenset())
    return _pack_map(data, float32_fields, max_size)


def encode_document(doc: Mapping[str, Any], *, max_size: int = MAX_PAYLOAD) -> bytes:
    """A plain map (for example a signed document) as msgpack, exactly as given."""
    return _pack_map(doc, frozenset(), max_size)


def decode(topic: str, payload: Payload, model: type[M], *, max_size: int = MAX_PAYLOAD) -> M:
    """Decode and validate a payload; any failure is an ``InvalidMessage`` naming topic and field."""
    return validate(topic, decode_raw(topic, payload, max_size=max_size), model)


def validate(topic: str, raw: Mapping[str, Any], model: type[M]) -> M:
    """Validate an already decoded map (see ``decode_raw``) against ``model``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        field, reason = _first_error(exc)
        raise InvalidMessage(reason, topic=topic, field=field) from exc
    except (ValueError, TypeError, OverflowError) as exc:  # a validator failing outside pydantic's wrapping
        raise InvalidMessage(f"{type(exc).__name__}: {exc}", topic=topic) from exc


def decode_raw(topic: str, payload: Payload, *, max_size: int = MAX_PAYLOAD) -> dict[str, Any]:
    """The payload's top-level map before validation: plain str/int/float/bool/None/bytes/list/dict."""
    data = _as_bytes(topic, payload)
    if len(data) > max_size:
        raise InvalidMessage(f"payload of {len(data)} bytes exceeds the limit of {max_size}", topic=topic)
    body = data.lstrip(_WHITESPACE)
    if not body:
        raise InvalidMessage("empty payload", topic=topic)
    value = _parse_json(topic, body) if body.startswith(b"{") else _parse_msgpack(topic, data, max_size)
    if not isinstance(value, dict):
        raise InvalidMessage(f"top level must be a map, not {_kind(value)}", topic=topic)
    _check_plain(topic, value)
    return value


def decode_for_channel(topic: str, payload: Payload, *, max_size: int = MAX_PAYLOAD) -> Decoded:
    """Decode a payload on any node topic into the model of its channel."""
    node_id, channel = parse_node_topic(topic)
    message = decode(topic, payload, CHANNEL_MODEL[channel], max_size=max_size)
    return Decoded(node_id, channel, message)


def to_json_line(topic: str, payload: Payload, *, max_size: int = MAX_PAYLOAD) -> str:
    """Any payload as one line of JSON for people (``fleet watch``); bytes show as ``{"$bytes": n}``."""
    raw = decode_raw(topic, payload, max_size=max_size)
    return json.dumps(_jsonable(raw), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# --- encoding -----------------------------------------------------------------------------------


def _pack_map(data: Mapping[str, Any], float32_fields: frozenset[str], max_size: int) -> bytes:
    """Pack a map key by key, so chosen top-level floats can go as float32 (5 bytes instead of 9)."""
    wide = msgpack.Packer(use_bin_type=True)
    narrow = msgpack.Packer(use_bin_type=True, use_single_float=True)
    parts = [wide.pack_map_header(len(data))]
    try:
        for key, value in data.items():
            packer = narrow if key in float32_fields and isinstance(value, float) else wide
            parts.append(wide.pack(key))
            parts.append(packer.pack(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidMessage(f"cannot encode: {exc}") from exc
    encoded = b"".join(parts)
    if len(encoded) > max_size:
        raise InvalidMessage(f"encoded message of {len(encoded)} bytes exceeds the limit of {max_size}")
    return encoded


# --- decoding -----------------------------------------------------------------------------------


def _as_bytes(topic: str, payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise InvalidMessage(f"payload must be bytes, not {_kind(payload)}", topic=topic)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _parse_json(topic: str, body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"JSON payload is not UTF-8: {exc.reason}", topic=topic) from exc
    except RecursionError as exc:
        raise InvalidMessage("JSON payload is nested too deeply", topic=topic) from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise InvalidMessage(f"malformed JSON: {exc}", topic=topic) from exc


def _parse_msgpack(topic: str, data: bytes, max_size: int) -> Any:
    try:
        # Explicit limits keep a tiny header from announcing a huge container (msgpack bombs);
        # ext types (timestamps included) are not part of the contract, so none are accepted.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise InvalidMessage("trailing bytes after the msgpack map", topic=topic) from exc
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        # UnicodeDecodeError (a ValueError) lands here too: msgpack strings must be UTF-8.
        raise InvalidMessage(f"malformed msgpack: {type(exc).__name__}: {exc}", topic=topic) from exc


def _check_plain(topic: str, root: dict[Any, Any]) -> None:
    """Refuse deep nesting, non-string keys, NaN/infinity and foreign types, naming the path.

    Iterative, so a hostile payload cannot exhaust the stack here either.
    """
    stack: list[tuple[Any, int, str]] = [(root, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            raise InvalidMessage(f"nested deeper than {MAX_DEPTH} levels", topic=topic, field=path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidMessage(f"map key {key!r} is not a string", topic=topic, field=path or None)
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}.{index}") for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidMessage(f"{value} is not allowed", topic=topic, field=path)
        elif not isinstance(value, str | int | float | bytes | None):  # bool is an int
            raise InvalidMessage(f"unsupported value of type {_kind(value)}", topic=topic, field=path)


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in error["loc"]) or None
    return field, str(error["msg"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": len(value)}
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
