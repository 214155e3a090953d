"""The access policy of DESIGN.md section 3, as data.

One policy, three consumers: the embedded broker evaluates it per packet, and the Mosquitto and
EMQX renderers turn the same rules into their ACL syntax. Topic strings come from
``fleet.protocol.topics`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from certs import Identity, Role
from fleet.protocol.topics import (
    ALL,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    Channel,
    all_nodes_filter,
    node_topic_template,
    topic_matches,
)

# Stands for "the connecting identity's own name" in rule templates; each renderer swaps in its
# own placeholder (Mosquitto %u, EMQX ${cert_common_name}).
OWN_ID = "{own_id}"


class Access(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"  # also governs delivery: what one may subscribe to, one may receive


@dataclass(frozen=True)
class Rule:
    role: Role
    access: Access
    filter_template: str

    @property
    def per_identity(self) -> bool:
        return OWN_ID in self.filter_template

    def filter_for(self, identity_name: str) -> str:
        return self.filter_template.replace(OWN_ID, identity_name)


def _device_rules() -> list[Rule]:
    publish = [
        Rule(Role.DEVICE, Access.PUBLISH, node_topic_template(ch, OWN_ID)) for ch in Channel if ch in DEVICE_PUBLISHES
    ]
    subscribe = [
        Rule(Role.DEVICE, Access.SUBSCRIBE, node_topic_template(ch, OWN_ID))
        for ch in Channel
        if ch in DEVICE_SUBSCRIBES
    ]
    return publish + subscribe


POLICY: tuple[Rule, ...] = (
    *_device_rules(),
    Rule(Role.CONTROLLER, Access.PUBLISH, ALL),
    Rule(Role.CONTROLLER, Access.SUBSCRIBE, ALL),
    Rule(Role.OPERATOR, Access.PUBLISH, all_nodes_filter(Channel.CMD)),
    Rule(Role.OPERATOR, Access.SUBSCRIBE, ALL),
)


def rules_for(role: Role) -> list[Rule]:
    return [rule for rule in POLICY if rule.role == role]


def filter_covers(granted: str, requested: str) -> bool:
    """True when every topic matching ``requested`` also matches ``granted`` (both MQTT filters).

    A subscription is allowed only if it cannot reach beyond what is granted, so a device asking
    for ``fleet/v1/nodes/+/cmd`` is refused even though its own cmd topic is among the matches.
    """
    granted_levels = granted.split("/")
    requested_levels = requested.split("/")
    for index, level in enumerate(granted_levels):
        if level == "#":
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#":
            return False
        if level == "+":
            continue
        if wanted != level:
            return False
    return len(granted_levels) == len(requested_levels)


def may_publish(identity: Identity, topic: str) -> bool:
    return any(topic_matches(rule.filter_for(identity.name), topic) for rule in _rules(identity, Access.PUBLISH))


def may_subscribe(identity: Identity, topic_filter: str) -> bool:
    return any(
        filter_covers(rule.filter_for(identity.name), topic_filter) for rule in _rules(identity, Access.SUBSCRIBE)
    )


def may_receive(identity: Identity, topic: str) -> bool:
    return any(topic_matches(rule.filter_for(identity.name), topic) for rule in _rules(identity, Access.SUBSCRIBE))


def _rules(identity: Identity, access: Access) -> list[Rule]:
    return [rule for rule in POLICY if rule.role == identity.role and rule.access == access]
