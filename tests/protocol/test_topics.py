"""Topic layout: building, parsing, directions, QoS and MQTT wildcard matching."""

from __future__ import annotations

import pytest

from fleet.protocol import topics
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.ids import InvalidNodeId
from fleet.protocol.topics import (
    ALL,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
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


@pytest.mark.parametrize("channel", list(Channel))
@pytest.mark.parametrize("node_id", ["gw-01", "A", "node.with_dots-and_underscores", "x" * 64])
def test_node_topic_round_trips(node_id: str, channel: Channel) -> None:
    topic = node_topic(node_id, channel)
    assert topic == f"fleet/v1/nodes/{node_id}/{channel.value}"
    assert parse_node_topic(topic) == (node_id, channel)


def test_artifact_channels_have_two_levels() -> None:
    assert node_topic("gw1", Channel.ARTIFACT_REQ) == "fleet/v1/nodes/gw1/artifact/req"
    assert parse_node_topic("fleet/v1/nodes/gw1/artifact/chunk") == ("gw1", Channel.ARTIFACT_CHUNK)


@pytest.mark.parametrize("node_id", ["", "-lead", "has space", "a/b", "+", "#", "x" * 65, "ü"])
def test_node_topic_refuses_bad_node_ids(node_id: str) -> None:
    with pytest.raises(InvalidNodeId):
        node_topic(node_id, Channel.CMD)


@pytest.mark.parametrize(
    ("topic", "field"),
    [
        ("fleet/v2/nodes/gw1/cmd", None),
        ("fleet/v1/node/gw1/cmd", None),
        ("/fleet/v1/nodes/gw1/cmd", None),
        ("fleet/v1/nodes/gw1", "node_id"),
        ("fleet/v1/nodes/+/cmd", "node_id"),
        ("fleet/v1/nodes/#", "node_id"),
        ("fleet/v1/nodes//cmd", "node_id"),
        ("fleet/v1/nodes/gw1/#", "channel"),
        ("fleet/v1/nodes/gw1/+", "channel"),
        ("fleet/v1/nodes/gw1/command", "channel"),
        ("fleet/v1/nodes/gw1/cmd/", "channel"),
        ("fleet/v1/nodes/gw1/artifact", "channel"),
        ("fleet/v1/nodes/gw1/artifact/req/x", "channel"),
        ("", None),
    ],
)
def test_parse_node_topic_rejects_everything_else(topic: str, field: str | None) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_node_topic(topic)
    assert info.value.topic == topic
    assert info.value.field == field


def test_parse_node_topic_rejects_non_strings() -> None:
    with pytest.raises(InvalidMessage):
        parse_node_topic(b"fleet/v1/nodes/gw1/cmd")  # type: ignore[arg-type]


def test_directions_partition_the_channels() -> None:
    assert set(Channel) == DEVICE_PUBLISHES | DEVICE_SUBSCRIBES
    assert not DEVICE_PUBLISHES & DEVICE_SUBSCRIBES
    assert {Channel.DESIRED, Channel.CMD, Channel.ARTIFACT_CHUNK} == DEVICE_SUBSCRIBES


def test_qos_and_retain_follow_the_design_table() -> None:
    retained = {ch for ch in Channel if channel_retained(ch)}
    assert retained == {Channel.DESIRED, Channel.REPORTED, Channel.STATUS}
    assert channel_qos(Channel.HEARTBEAT) == 0
    assert all(channel_qos(ch) == 1 for ch in Channel if ch is not Channel.HEARTBEAT)


def test_filters_and_templates() -> None:
    assert ALL == "fleet/v1/#"
    assert all_nodes_filter(Channel.CMD) == "fleet/v1/nodes/+/cmd"
    assert node_filter("gw1") == "fleet/v1/nodes/gw1/#"
    assert node_topic_template(Channel.ARTIFACT_REQ, "%u") == "fleet/v1/nodes/%u/artifact/req"
    assert node_topic_template(Channel.DESIRED, "${cert_common_name}") == ("fleet/v1/nodes/${cert_common_name}/desired")
    with pytest.raises(InvalidNodeId):
        node_filter("+")


def test_filters_match_the_topics_they_are_for() -> None:
    topic = node_topic("gw1", Channel.ARTIFACT_CHUNK)
    assert topic_matches(ALL, topic)
    assert topic_matches(node_filter("gw1"), topic)
    assert not topic_matches(node_filter("gw2"), topic)
    assert topic_matches(all_nodes_filter(Channel.ARTIFACT_CHUNK), topic)
    assert not topic_matches(all_nodes_filter(Channel.CMD), topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),  # an empty level is a level
        ("+/+", "/x", True),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("+", "a/b", False),
        ("a/b/c", "a/b", False),
        ("#", "$SYS/broker", False),
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/b", "a/+", False),  # a topic with wildcards is never published
        ("a/#", "a/#", False),
        ("a", "", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad_filter", ["", "a/#/b", "a#", "a/b+", "+a/b", "##"])
def test_topic_matches_refuses_malformed_filters(bad_filter: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        topic_matches(bad_filter, "a/b")
    assert info.value.field == "filter"


def test_topic_strings_are_built_from_root() -> None:
    assert topics.ROOT == "fleet/v1"
    assert node_topic("n", Channel.STATUS).startswith(topics.ROOT + "/")
