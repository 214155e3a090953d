"""The wire protocol: topics, message models and the codec. Pure: no I/O.

The names below are loaded lazily (module ``__getattr__``): ``import fleet.protocol.ids`` or
``from fleet.protocol.errors import ...`` costs only that module, so ``fleet-agent --version`` does not
build the pydantic models or load msgpack. ``from fleet.protocol import Command`` works as before.
Signatures live in ``fleet.protocol.signing``, imported only where needed (it loads ``cryptography``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what mypy and editors see; at run time __getattr__ below loads each on first use
    from fleet.protocol.codec import (
        MAX_PAYLOAD,
        Decoded,
        decode,
        decode_for_channel,
        decode_raw,
        encode,
        encode_document,
        to_json_line,
        validate,
    )
    from fleet.protocol.errors import (
        ConfigError,
        FleetError,
        InvalidMessage,
        InvalidSignature,
        Rejected,
        TransportError,
    )
    from fleet.protocol.ids import NODE_ID_PATTERN, InvalidNodeId, is_valid_node_id, validate_node_id
    from fleet.protocol.messages import (
        CHANNEL_MODEL,
        MAX_CHUNK_SIZE,
        Ack,
        AckStatus,
        ArtifactChunk,
        ArtifactRequest,
        Command,
        DesiredState,
        Event,
        Health,
        Heartbeat,
        Message,
        ProbeResult,
        ProbeSpec,
        ReleaseRef,
        Reported,
        Status,
        UpdateState,
        digest_hex,
    )
    from fleet.protocol.topics import (
        ALL,
        DEVICE_PUBLISHES,
        DEVICE_SUBSCRIBES,
        ROOT,
        Channel,
        all_nodes_filter,
        channel_qos,
        channel_retained,
        node_filter,
        node_topic,
        node_topic_template,
        parse_node_topic,
        topic_matches,
    )

# Submodule -> the public names it provides (the same names as the TYPE_CHECKING imports above;
# tests/protocol/test_package.py checks that this table, __all__ and the submodules agree).
_SUBMODULE_NAMES: dict[str, tuple[str, ...]] = {
    "codec": (
        "MAX_PAYLOAD",
        "Decoded",
        "decode",
        "decode_for_channel",
        "decode_raw",
        "encode",
        "encode_document",
        "to_json_line",
        "validate",
    ),
    "errors": ("ConfigError", "FleetError", "InvalidMessage", "InvalidSignature", "Rejected", "TransportError"),
    "ids": ("NODE_ID_PATTERN", "InvalidNodeId", "is_valid_node_id", "validate_node_id"),
    "messages": (
        "CHANNEL_MODEL",
        "MAX_CHUNK_SIZE",
        "Ack",
        "AckStatus",
        "ArtifactChunk",
        "ArtifactRequest",
        "Command",
        "DesiredState",
        "Event",
        "Health",
        "Heartbeat",
        "Message",
        "ProbeResult",
        "ProbeSpec",
        "ReleaseRef",
        "Reported",
        "Status",
        "UpdateState",
        "digest_hex",
    ),
    "topics": (
        "ALL",
        "DEVICE_PUBLISHES",
        "DEVICE_SUBSCRIBES",
        "ROOT",
        "Channel",
        "all_nodes_filter",
        "channel_qos",
        "channel_retained",
        "node_filter",
        "node_topic",
        "node_topic_template",
        "parse_node_topic",
        "topic_matches",
    ),
}
_SUBMODULE_OF: dict[str, str] = {name: module for module, names in _SUBMODULE_NAMES.items() for name in names}


if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any name from this module

    def __getattr__(name: str) -> object:
        """Load a public name's submodule on first access and cache the name in this module."""
        module = _SUBMODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


__all__ = [
    "ALL",
    "CHANNEL_MODEL",
    "DEVICE_PUBLISHES",
    "DEVICE_SUBSCRIBES",
    "MAX_CHUNK_SIZE",
    "MAX_PAYLOAD",
    "NODE_ID_PATTERN",
    "ROOT",
    "Ack",
    "AckStatus",
    "ArtifactChunk",
    "ArtifactRequest",
    "Channel",
    "Command",
    "ConfigError",
    "Decoded",
    "DesiredState",
    "Event",
    "FleetError",
    "Health",
    "Heartbeat",
    "InvalidMessage",
    "InvalidNodeId",
    "InvalidSignature",
    "Message",
    "ProbeResult",
    "ProbeSpec",
    "Rejected",
    "ReleaseRef",
    "Reported",
    "Status",
    "TransportError",
    "UpdateState",
    "all_nodes_filter",
    "channel_qos",
    "channel_retained",
    "decode",
    "decode_for_channel",
    "decode_raw",
    "digest_hex",
    "encode",
    "encode_document",
    "is_valid_node_id",
    "node_filter",
    "node_topic",
    "node_topic_template",
    "parse_node_topic",
    "to_json_line",
    "topic_matches",
    "validate",
    "validate_node_id",
]
