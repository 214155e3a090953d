"""Messages through the codec: round trips, JSON input, and every way a payload can be wrong."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
from pydantic import BaseModel

from fleet.protocol import codec
from fleet.protocol.codec import (
    MAX_DEPTH,
    MAX_PAYLOAD,
    decode,
    decode_for_channel,
    decode_raw,
    encode,
    encode_document,
    to_json_line,
)
from fleet.protocol.errors import InvalidMessage
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
    ProbeResult,
    ProbeSpec,
    ReleaseRef,
    Reported,
    Status,
    UpdateState,
    digest_hex,
)
from fleet.protocol.topics import Channel, node_topic

DIGEST = "sha256:" + "ab" * 32
TOPIC = "fleet/v1/nodes/gw1/cmd"

EXAMPLES: dict[Channel, BaseModel] = {
    Channel.DESIRED: DesiredState(
        generation=7,
        release=ReleaseRef(
            name="app",
            version="1.2.0",
            digest=DIGEST,
            size=1_000_000,
            chunk_size=65536,
            chunk_digests=["cd" * 32, "sha256:" + "ef" * 32],
            delta_bases=["01" * 32],
        ),
        config={"log_level": "debug", "rate": 2.5, "nested": {"list": [1, "two", None, True]}},
        health=ProbeSpec(kind="http", target="http://127.0.0.1:8080/healthz", initial_delay=5, period=2.5),
        issued_at=1_700_000_000.25,
    ),
    Channel.REPORTED: Reported(
        generation=7,
        version="1.2.0",
        previous_version="1.1.0",
        state=UpdateState.ROLLED_BACK,
        config_digest="abc",
        progress=0.5,
        detail="probe failed",
        ts=1_700_000_001.5,
    ),
    Channel.STATUS: Status(state="offline", ts=1_700_000_000, agent_version="0.1.0"),
    Channel.HEARTBEAT: Heartbeat(
        seq=4242, uptime=3600.5, cpu=12.3, mem_free=512 * 2**20, disk_free=8 * 2**30, latency_ms=7.25
    ),
    Channel.HEALTH: Health(
        version="1.2.0",
        healthy=False,
        probes=[ProbeResult(name="http", ok=False, detail="503", latency_ms=3.5), ProbeResult(name="tcp", ok=True)],
        consecutive_failures=3,
        ts=1_700_000_002.0,
    ),
    Channel.CMD: Command(id="c-1", action="restart", args={"delay": 5}, expires_at=1_700_000_100.0),
    Channel.ACK: Ack(id="c-1", status=AckStatus.DUPLICATE, detail="seen", ts=1_700_000_003.0),
    Channel.EVENTS: Event(kind="update", detail="downloading", data={"chunk": 3, "of": 16}, ts=1.0),
    Channel.ARTIFACT_REQ: ArtifactRequest(digest=DIGEST, first=16, window=8, delta_base="12" * 32),
    Channel.ARTIFACT_CHUNK: ArtifactChunk(digest=DIGEST, index=3, data=bytes(range(256)) * 4, total=16),
}


def test_every_channel_has_a_model_and_an_example() -> None:
    assert set(CHANNEL_MODEL) == set(Channel)
    assert set(EXAMPLES) == set(Channel)
    assert all(isinstance(EXAMPLES[ch], CHANNEL_MODEL[ch]) for ch in Channel)


@pytest.mark.parametrize("channel", list(Channel))
def test_round_trip_through_msgpack(channel: Channel) -> None:
    message = EXAMPLES[channel]
    payload = encode(message)
    assert payload[:1] != b"{"  # msgpack, not JSON
    assert decode(node_topic("gw1", channel), payload, CHANNEL_MODEL[channel]) == message


@pytest.mark.parametrize("channel", list(Channel))
def test_decode_for_channel_picks_the_model(channel: Channel) -> None:
    topic = node_topic("gw-7", channel)
    node_id, decoded_channel, message = decode_for_channel(topic, encode(EXAMPLES[channel]))
    assert (node_id, decoded_channel) == ("gw-7", channel)
    assert message == EXAMPLES[channel]


@pytest.mark.parametrize("channel", list(Channel))
def test_round_trip_through_json(channel: Channel) -> None:
    message = EXAMPLES[channel]
    payload = message.model_dump_json(exclude_none=True).encode()
    assert decode(node_topic("gw1", channel), payload, CHANNEL_MODEL[channel]) == message


def test_encode_drops_none_and_writes_enums_as_strings() -> None:
    raw = msgpack.unpackb(encode(Ack(id="c1", status=AckStatus.DONE, ts=1.0)), raw=False)
    assert raw == {"id": "c1", "status": "done", "ts": 1.0}
    assert type(raw["status"]) is str


def test_bytes_stay_bytes() -> None:
    raw = msgpack.unpackb(encode(EXAMPLES[Channel.ARTIFACT_CHUNK]), raw=False)
    assert raw["data"] == bytes(range(256)) * 4


def test_json_from_mosquitto_pub_decodes_to_a_command() -> None:
    command = decode(TOPIC, b'{"id":"c1","action":"ping"}', Command)
    assert command == Command(id="c1", action="ping")
    assert command.args == {}


def test_json_may_start_with_whitespace() -> None:
    assert decode(TOPIC, b' \n\t{"id":"c1","action":"ping"}\n', Command).id == "c1"


def test_json_chunk_data_is_base64() -> None:
    doc = {"digest": DIGEST, "index": 0, "data": base64.b64encode(b"\x00\xffhello").decode()}
    chunk = decode("t", json.dumps(doc).encode(), ArtifactChunk)
    assert chunk.data == b"\x00\xffhello"
    doc["data"] = base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode()
    assert decode("t", json.dumps(doc).encode(), ArtifactChunk).data == b"\xfb\xff\xfe"
    doc["data"] = "not base64!"
    with pytest.raises(InvalidMessage) as info:
        decode("t", json.dumps(doc).encode(), ArtifactChunk)
    assert info.value.field == "data"


def test_unknown_fields_are_ignored() -> None:
    payload = encode_document({"id": "c1", "action": "ping", "priority": 9, "future": {"x": [1]}})
    assert decode(TOPIC, payload, Command) == Command(id="c1", action="ping")
    assert decode(TOPIC, b'{"id":"c1","action":"ping","new_field":true}', Command).action == "ping"


def test_int_is_accepted_where_a_float_is_expected() -> None:
    ack = decode("t", encode_document({"id": "c1", "status": "done", "ts": 17}), Ack)
    assert ack.ts == 17.0
    assert isinstance(ack.ts, float)


def test_heartbeat_is_small() -> None:
    typical = Heartbeat(
        seq=123_456,
        uptime=86_400.5,
        cpu=12.3,
        mem_free=2_000_000_000,
        disk_free=20_000_000_000,
        latency_ms=12.7,
        version="1.4.2",
    )
    payload = encode(typical)
    assert len(payload) < 100
    assert decode("t", payload, Heartbeat) == typical


def test_heartbeat_measurements_keep_about_seven_digits() -> None:
    beat = Heartbeat(seq=1, uptime=1234.567, cpu=99.9, mem_free=1, disk_free=1, latency_ms=0.125)
    assert (beat.uptime, beat.cpu, beat.latency_ms) == (1234.567, 99.9, 0.125)
    with pytest.raises(ValueError, match="less than or equal"):
        Heartbeat(seq=1, uptime=1e39, cpu=1, mem_free=1, disk_free=1)


def test_digest_hex_strips_the_prefix() -> None:
    assert digest_hex(DIGEST) == "ab" * 32
    assert digest_hex("cd" * 32) == "cd" * 32


# --- rejections ---------------------------------------------------------------------------------


def _reject(payload: bytes, model: type[BaseModel], **kwargs: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode(TOPIC, payload, model, **kwargs)
    assert info.value.topic == TOPIC
    assert TOPIC in str(info.value)
    return info.value


def test_missing_field_is_named() -> None:
    error = _reject(encode_document({"id": "c1"}), Command)
    assert error.field == "action"
    assert "required" in error.reason.lower()


@pytest.mark.parametrize(
    ("doc", "model", "field"),
    [
        ({"id": "c1", "action": 5}, Command, "action"),
        ({"id": "c1", "action": "Restart"}, Command, "action"),
        ({"id": "has space", "action": "ping"}, Command, "id"),
        ({"id": "", "action": "ping"}, Command, "id"),
        ({"id": "c1", "action": "ping", "args": []}, Command, "args"),
        ({"id": "c1", "action": "ping", "expires_at": "soon"}, Command, "expires_at"),
        ({"generation": "12"}, DesiredState, "generation"),
        ({"generation": -1}, DesiredState, "generation"),
        ({"generation": True}, DesiredState, "generation"),
        ({"generation": 2**63}, DesiredState, "generation"),
        (
            {
                "generation": 1,
                "release": {"name": "a", "version": "1", "digest": DIGEST, "size": "12", "chunk_size": 10},
            },
            DesiredState,
            "release.size",
        ),
        (
            {
                "generation": 1,
                "release": {"name": "a", "version": "1", "digest": "sha1:00", "size": 1, "chunk_size": 10},
            },
            DesiredState,
            "release.digest",
        ),
        (
            {
                "generation": 1,
                "release": {
                    "name": "a",
                    "version": "1",
                    "digest": DIGEST,
                    "size": 1,
                    "chunk_size": 10,
                    "chunk_digests": [DIGEST, "xyz"],
                },
            },
            DesiredState,
            "release.chunk_digests.1",
        ),
        ({"generation": 1, "health": {"kind": "grpc", "target": "x"}}, DesiredState, "health.kind"),
        ({"generation": 1, "state": "sleeping", "ts": 1.0}, Reported, "state"),
        ({"generation": 1, "state": "idle", "ts": 1.0, "progress": 1.5}, Reported, "progress"),
        ({"state": "away"}, Status, "state"),
        ({"seq": 1, "uptime": 1, "cpu": "high", "mem_free": 1, "disk_free": 1}, Heartbeat, "cpu"),
        ({"healthy": 1, "ts": 1.0}, Health, "healthy"),
        ({"healthy": True, "ts": 1.0, "probes": [{"name": "a"}]}, Health, "probes.0.ok"),
        ({"id": "c1", "status": "maybe", "ts": 1.0}, Ack, "status"),
        ({"kind": "", "ts": 1.0}, Event, "kind"),
        ({"digest": DIGEST, "first": 0, "window": 0}, ArtifactRequest, "window"),
        ({"digest": DIGEST, "first": 0, "window": 257}, ArtifactRequest, "window"),
        ({"digest": DIGEST, "index": 0, "data": 5}, ArtifactChunk, "data"),
        ({"digest": DIGEST, "index": 0, "data": b"x" * (MAX_CHUNK_SIZE + 1)}, ArtifactChunk, "data"),
    ],
)
def test_wrong_values_are_rejected_with_their_field(doc: dict[str, Any], model: type[BaseModel], field: str) -> None:
    assert _reject(encode_document(doc), model).field == field


def test_oversize_payload_names_its_size() -> None:
    payload = encode_document({"id": "c1", "action": "ping", "pad": "x" * 2000})
    error = _reject(payload, Command, max_size=1000)
    assert str(len(payload)) in error.reason
    assert "1000" in error.reason


def test_default_cap_fits_a_full_chunk_but_not_more() -> None:
    chunk = ArtifactChunk(digest=DIGEST, index=0, data=b"\x01" * MAX_CHUNK_SIZE)
    assert decode("t", encode(chunk), ArtifactChunk) == chunk
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode_raw("t", b"\x80" + b" " * MAX_PAYLOAD)


def test_encode_refuses_what_no_reader_would_accept() -> None:
    with pytest.raises(InvalidMessage, match="exceeds"):
        encode(Event(kind="big", data={"blob": "x" * MAX_PAYLOAD}, ts=1.0))
    with pytest.raises(InvalidMessage, match="cannot encode"):
        encode(Event(kind="odd", data={"set": {1, 2}}, ts=1.0))


@pytest.mark.parametrize("payload", [b"", b"   ", b"\n\t "])
def test_empty_payload(payload: bytes) -> None:
    assert "empty" in _reject(payload, Command).reason


def test_truncated_msgpack() -> None:
    payload = encode(EXAMPLES[Channel.CMD])
    for cut in range(1, len(payload)):
        _reject(payload[:cut], Command)


def test_trailing_bytes_after_msgpack() -> None:
    assert "trailing" in _reject(encode(EXAMPLES[Channel.CMD]) + b"\x00", Command).reason


@pytest.mark.parametrize(
    "payload",
    [msgpack.packb([1, 2]), msgpack.packb("text"), msgpack.packb(None), msgpack.packb(3)],
)
def test_top_level_must_be_a_map(payload: bytes) -> None:
    assert "top level must be a map" in _reject(payload, Command).reason


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": "c1", "action": ',
        b'{"id": "c1"} trailing',
        b'{"id": NaN, "action": "x"}',
        b'{"x": ' + b"9" * 5000 + b"}",
        b'{"id": "\xff"}',
    ],
)
def test_malformed_json(payload: bytes) -> None:
    assert _reject(payload, Command).field is None


def test_deep_nesting_is_refused_before_validation() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    error = _reject(encode_document({"id": "c1", "action": "x", "args": {"a": deep}}), Command)
    assert "nested" in error.reason
    json_bomb = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _reject(json_bomb, Command).field is None


def test_msgpack_bomb_header_is_refused() -> None:
    # A 5-byte array header announcing 2**32-1 elements must not allocate anything big.
    _reject(b"\xdd\xff\xff\xff\xff", Command)
    _reject(b"\xdf\xff\xff\xff\xff", Command)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (msgpack.packb({"id": "c1", "action": "x", "args": {"t": msgpack.Timestamp(1)}}), None),
        (msgpack.packb({"id": "c1", "action": "x", "args": {"e": msgpack.ExtType(5, b"x")}}), None),
        (msgpack.packb({"id": "c1", "action": "x", "args": {"f": float("nan")}}), "args.f"),
        (msgpack.packb({"id": "c1", "action": "x", "args": {"f": [float("inf")]}}), "args.f.0"),
        (msgpack.packb({"id": "c1", "action": "x", b"k": 1}, use_bin_type=True), None),
        (msgpack.packb({"id": "c1", "action": "x", "args": {b"k": 1}}, use_bin_type=True), "args"),
        (msgpack.packb({"id": b"\xff", "action": "x"}, use_bin_type=False), None),  # not UTF-8
    ],
)
def test_foreign_values_are_refused(payload: bytes, field: str | None) -> None:
    assert _reject(payload, Command).field == field


def test_payload_must_be_bytes() -> None:
    assert decode_raw("t", bytearray(b'{"a":1}')) == {"a": 1}
    with pytest.raises(InvalidMessage, match="must be bytes"):
        decode_raw("t", '{"a":1}')  # type: ignore[arg-type]


def test_decode_for_channel_rejects_bad_topics_and_payloads() -> None:
    with pytest.raises(InvalidMessage) as info:
        decode_for_channel("fleet/v1/nodes/gw1/unknown", encode(EXAMPLES[Channel.CMD]))
    assert info.value.field == "channel"
    with pytest.raises(InvalidMessage) as info:
        decode_for_channel("fleet/v1/nodes/gw1/ack", encode(EXAMPLES[Channel.CMD]))
    assert info.value.field == "status"


# --- human rendering ----------------------------------------------------------------------------


def test_to_json_line_renders_msgpack_and_json_alike() -> None:
    from_msgpack = to_json_line(TOPIC, encode(Command(id="c1", action="ping", args={"n": 1})))
    from_json = to_json_line(TOPIC, b'{"id": "c1", "action": "ping", "args": {"n": 1}}')
    assert json.loads(from_msgpack) == json.loads(from_json) == {"id": "c1", "action": "ping", "args": {"n": 1}}
    assert "\n" not in from_msgpack


def test_to_json_line_shows_bytes_by_length() -> None:
    line = to_json_line("t", encode(EXAMPLES[Channel.ARTIFACT_CHUNK]))
    assert json.loads(line)["data"] == {"$bytes": 1024}


def test_to_json_line_keeps_unicode_and_raises_only_invalid_message() -> None:
    assert json.loads(to_json_line("t", encode_document({"text": "grüße"}))) == {"text": "grüße"}
    with pytest.raises(InvalidMessage):
        to_json_line("t", b"\xc1")


def test_codec_module_constants() -> None:
    assert codec.MAX_PAYLOAD == 256 * 1024
    assert MAX_CHUNK_SIZE * 4 // 3 + 1024 < codec.MAX_PAYLOAD  # base64 chunks fit in JSON too
