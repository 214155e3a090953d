"""Node ids: the one rule for what names a device (and so its certificate CN and topic level); and
what may name a release or a version."""

from __future__ import annotations

import re

from fleet.protocol.errors import InvalidMessage

NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)


RELEASE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
"""Release names and versions: directory names in the release store and on devices (no separator,
no dot first: no hidden file, no ``..``)."""
_RELEASE_NAME_RE = re.compile(RELEASE_NAME_PATTERN)


def is_safe_release_name(value: str) -> bool:
    """Whether a release name or version may be a path component: :data:`RELEASE_NAME_PATTERN` and
    no ``..`` anywhere (the agent checks this before it builds a path from one)."""
    return _RELEASE_NAME_RE.fullmatch(value) is not None and ".." not in value


class InvalidNodeId(InvalidMessage):
    """A string that cannot be a node id (and so no certificate CN, topic level or directory name)."""


def is_valid_node_id(value: str) -> bool:
    return _NODE_ID_RE.fullmatch(value) is not None


def validate_node_id(value: str) -> str:
    """Return ``value`` when it is a valid node id, else raise ``InvalidNodeId`` naming it."""
    if not isinstance(value, str) or not is_valid_node_id(value):
        raise InvalidNodeId(
            f"{value!r} is not a node id: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            field="node_id",
        )
    return value
