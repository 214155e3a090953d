"""The one exception tree of the system.

Every layer translates foreign exceptions into these at its boundary (``raise ... from exc``).
Whether an error is worth retrying is decided by its type: only ``TransportError`` is.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error this system raises on purpose."""


class ConfigError(FleetError):
    """A configuration file, flag or environment value is unusable; the message names it."""


class TransportError(FleetError):
    """The link to the broker failed; retrying later may succeed."""


class InvalidMessage(FleetError):
    """A payload or topic does not follow the wire contract; the message names topic and field."""

    def __init__(self, reason: str, *, topic: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        self.field = field
        where = ""
        if topic is not None:
            where += f" on {topic}"
        if field is not None:
            where += f" (field {field})"
        super().__init__(f"invalid message{where}: {reason}")


class InvalidSignature(InvalidMessage):
    """A signed document is unsigned, forged or signed by an unknown key."""


class Rejected(FleetError):
    """A well-formed request that the receiver refuses (unknown action, bad arguments, expired)."""
