"""Property tests: whatever arrives on the wire, the protocol answers with a value or InvalidMessage."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped,unused-ignore]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.protocol.codec import decode, decode_for_channel, decode_raw, encode, to_json_line
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import CHANNEL_MODEL, Heartbeat, Message
from fleet.protocol.topics import Channel, node_topic, parse_node_topic, topic_matches

T = TypeVar("T")

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODELS: list[type[Message]] = list(dict.fromkeys(CHANNEL_MODEL.values()))
FIELD_NAMES = sorted({name for model in MODELS for name in model.model_fields} | {"release", "size"})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["idle", "online", "done", "ping", "sha256:" + "ab" * 32, "ab" * 32, "http"])
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=15,
)
documents = st.dictionaries(keys, values, max_size=10)


def _msgpack(doc: Any) -> bytes:
    return bytes(msgpack.packb(doc, use_bin_type=True))


def _json_bytes(doc: Any) -> bytes:
    # bytes are not JSON; render them as text so the JSON branch sees the same shapes.
    return json.dumps(doc, default=lambda b: b.hex()).encode()


def _outcome(function: Callable[..., T], *args: Any) -> tuple[T | None, InvalidMessage | None]:
    """Call ``function``; any exception other than InvalidMessage propagates and fails the test."""
    try:
        return function(*args), None
    except InvalidMessage as exc:
        return None, exc


def _decodes_or_rejects(topic: str, payload: bytes, model: type[Message]) -> None:
    message, error = _outcome(decode, topic, payload, model)
    if error is not None:
        assert error.topic == topic
    else:
        # Anything accepted must survive a round trip unchanged.
        assert message is not None
        assert decode(topic, encode(message), model) == message


@FAST
@given(model=st.sampled_from(MODELS), payload=st.binary(max_size=200))
def test_random_bytes(model: type[Message], payload: bytes) -> None:
    _decodes_or_rejects("t", payload, model)


@FAST
@given(model=st.sampled_from(MODELS), doc=documents | values)
def test_random_msgpack_structures(model: type[Message], doc: Any) -> None:
    _decodes_or_rejects("t", _msgpack(doc), model)


@FAST
@given(model=st.sampled_from(MODELS), doc=documents)
def test_random_json_structures(model: type[Message], doc: Any) -> None:
    _decodes_or_rejects("t", _json_bytes(doc), model)


@FAST
@given(payload=st.binary(max_size=120) | documents.map(_msgpack))
def test_truncations_and_corruptions(payload: bytes) -> None:
    for cut in range(len(payload)):
        raw, error = _outcome(decode_raw, "t", payload[:cut])
        assert (raw is None) != (error is None)
    flipped = bytes(b ^ 0x5A for b in payload)
    _decodes_or_rejects("t", flipped, CHANNEL_MODEL[Channel.CMD])


@FAST
@given(topic=st.text(max_size=60) | st.sampled_from(Channel).map(lambda ch: f"fleet/v1/nodes/n1/{ch}x"))
def test_parse_node_topic_never_raises_anything_else(topic: str) -> None:
    parsed, error = _outcome(parse_node_topic, topic)
    if error is not None:
        assert error.topic == topic
    else:
        assert parsed is not None
        assert node_topic(*parsed) == topic


@FAST
@given(
    node_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"),
    channel=st.sampled_from(Channel),
    payload=st.binary(max_size=80) | documents.map(_msgpack),
)
def test_decode_for_channel_never_raises_anything_else(node_id: str, channel: Channel, payload: bytes) -> None:
    topic = node_topic(node_id, channel)
    decoded, error = _outcome(decode_for_channel, topic, payload)
    if error is not None:
        assert error.topic == topic
    else:
        assert decoded is not None
        assert decoded.node_id == node_id
        assert isinstance(decoded.message, CHANNEL_MODEL[channel])


@FAST
@given(payload=st.binary(max_size=120) | documents.map(_msgpack) | documents.map(_json_bytes))
def test_to_json_line_gives_json_or_invalid_message(payload: bytes) -> None:
    line, error = _outcome(to_json_line, "t", payload)
    if line is None:
        assert error is not None
        return
    assert isinstance(json.loads(line), dict)
    assert "\n" not in line


@FAST
@given(topic=st.text(alphabet="ab/+#$", max_size=12), topic_filter=st.text(alphabet="ab/+#$", max_size=12))
def test_topic_matches_is_total(topic: str, topic_filter: str) -> None:
    matched, error = _outcome(topic_matches, topic_filter, topic)
    if error is not None:
        assert error.field == "filter"
    else:
        assert isinstance(matched, bool)
        if matched:
            assert "+" not in topic
            assert "#" not in topic


@FAST
@given(
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    uptime=st.floats(min_value=0, max_value=1e9),
    cpu=st.floats(min_value=0, max_value=100),
    latency=st.none() | st.floats(min_value=0, max_value=1e5),
)
def test_heartbeat_round_trips_exactly_and_stays_small(
    seq: int, uptime: float, cpu: float, latency: float | None
) -> None:
    beat = Heartbeat(
        seq=seq, uptime=uptime, cpu=cpu, mem_free=2**33, disk_free=2**40, latency_ms=latency, version="1.4.2"
    )
    payload = encode(beat)
    assert decode("t", payload, Heartbeat) == beat
    assert len(payload) < 100
