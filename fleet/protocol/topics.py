"""The topic layout: the only place in the system where topic strings are spelled out.

Node topics are ``fleet/v1/nodes/{node_id}/{channel}``; a channel may itself hold a ``/``
(``artifact/req``), so parsing splits off the node id first and looks the rest up whole.
"""

from __future__ import annotations

from enum import StrEnum

from fleet.protocol.errors import InvalidMessage
from fleet.protocol.ids import is_valid_node_id, validate_node_id

ROOT = "fleet/v1"
NODES = f"{ROOT}/nodes"
ALL = f"{ROOT}/#"

_NODES_PREFIX = f"{NODES}/"


class Channel(StrEnum):
    """The last topic levels of a node topic; the value is the topic suffix."""

    DESIRED = "desired"
    REPORTED = "reported"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    HEALTH = "health"
    CMD = "cmd"
    ACK = "ack"
    EVENTS = "events"
    ARTIFACT_REQ = "artifact/req"
    ARTIFACT_CHUNK = "artifact/chunk"


DEVICE_PUBLISHES: frozenset[Channel] = frozenset(
    {
        Channel.REPORTED,
        Channel.STATUS,
        Channel.HEARTBEAT,
        Channel.HEALTH,
        Channel.ACK,
        Channel.EVENTS,
        Channel.ARTIFACT_REQ,
    }
)
DEVICE_SUBSCRIBES: frozenset[Channel] = frozenset({Channel.DESIRED, Channel.CMD, Channel.ARTIFACT_CHUNK})

# Retained channels carry state a late subscriber must see at once (level-triggered desired state,
# last reported state, online/offline including the last will).
_RETAINED: frozenset[Channel] = frozenset({Channel.DESIRED, Channel.REPORTED, Channel.STATUS})
# Heartbeats are frequent and superseded by the next one: losing one is cheaper than queueing it.
_QOS0: frozenset[Channel] = frozenset({Channel.HEARTBEAT})


def channel_qos(channel: Channel) -> int:
    """Default QoS of a channel (DESIGN.md section 2)."""
    return 0 if channel in _QOS0 else 1


def channel_retained(channel: Channel) -> bool:
    """Whether messages on the channel are published retained."""
    return channel in _RETAINED


def node_topic(node_id: str, channel: Channel) -> str:
    """The topic of ``channel`` for one node; refuses an invalid node id."""
    validate_node_id(node_id)
    return f"{NODES}/{node_id}/{Channel(channel).value}"


def node_topic_template(channel: Channel, placeholder: str) -> str:
    """A node topic with ``placeholder`` (e.g. ``%u``) in place of the node id, for ACL renderers."""
    return f"{NODES}/{placeholder}/{Channel(channel).value}"


def all_nodes_filter(channel: Channel) -> str:
    """Subscription filter for one channel of every node."""
    return node_topic_template(channel, "+")


def node_filter(node_id: str) -> str:
    """Subscription filter for every channel of one node."""
    validate_node_id(node_id)
    return f"{NODES}/{node_id}/#"


def parse_node_topic(topic: str) -> tuple[str, Channel]:
    """Split a node topic into ``(node_id, channel)``; anything else raises ``InvalidMessage``."""
    if not isinstance(topic, str) or not topic.startswith(_NODES_PREFIX):
        raise InvalidMessage(f"not a node topic: expected {NODES}/<node_id>/<channel>", topic=_shown(topic))
    node_id, sep, suffix = topic[len(_NODES_PREFIX) :].partition("/")
    if not sep or not is_valid_node_id(node_id):
        raise InvalidMessage(f"{node_id!r} is not a node id", topic=topic, field="node_id")
    try:
        channel = Channel(suffix)
    except ValueError:
        raise InvalidMessage(f"unknown channel {suffix!r}", topic=topic, field="channel") from None
    return node_id, channel


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic matching (section 4.7): ``+`` one level, ``#`` the rest, no ``$`` via wildcards.

    A malformed filter raises ``InvalidMessage``; a topic containing wildcards matches nothing.
    """
    _check_filter(topic_filter)
    if not topic or "+" in topic or "#" in topic:
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    # Topics starting with "$" are reserved for the broker and only match filters that name them.
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level itself: "a/#" matches "a"
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def _check_filter(topic_filter: str) -> None:
    if not isinstance(topic_filter, str) or not topic_filter:
        raise InvalidMessage("empty topic filter", field="filter")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise InvalidMessage(f"'#' must be a whole, last level: {topic_filter!r}", field="filter")
        if "+" in level and level != "+":
            raise InvalidMessage(f"'+' must be a whole level: {topic_filter!r}", field="filter")


def _shown(topic: object) -> str:
    """A topic for an error message, even when the caller passed something else."""
    return topic if isinstance(topic, str) else repr(topic)
