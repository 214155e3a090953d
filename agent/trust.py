"""The control plane's trust: the controller's key, what it must have signed, and its clock.

Desired state and commands are signed by the controller's control key (``control.pub`` of the PKI)
and bound to this node and their channel (fleet.protocol.signing): anything else is refused with
the reason. Unsigned commands pass only for the harmless actions of ``unsigned_actions`` (default
``ping``, ``report``), so ``mosquitto_pub`` keeps working for those. Without a key the agent does
not start, unless ``insecure_unsigned_control: true`` says to accept unsigned control.

The controller's clock: every verified message's ``issued_at`` teaches the offset between the
controller's clock and ours (agent.core), kept in ``agent.db`` across restarts, and command expiry
is judged on controller time, so a gateway whose clock is hours off still runs fresh commands and
refuses expired ones. A step of our own wall clock (NTP) is measured against the boot-time clock,
which does not step, and moves the offset with it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import core
from agent.config import AgentSettings
from fleet.protocol.errors import ConfigError, InvalidSignature

if TYPE_CHECKING:
    from agent.store import Store

log = logging.getLogger(__name__)

CONTROL_PUB = "control.pub"
"""The file name of the controller's public key next to ``tls.ca`` (the default key)."""

CLOCK_KEY = "controller_clock"
"""agent.db key of the learned controller clock."""

CLOCK_STEP = 2.0
"""Seconds our wall clock may drift from the boot-time clock between two looks before it counts as set."""

CLOCK_WARN = 300.0
"""An offset to the controller's clock past this is logged as a warning."""

_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # counts suspend too, never steps


def controller_key_path(settings: AgentSettings) -> Path | None:
    """``controller_public_key``, or ``control.pub`` next to ``tls.ca`` if that file exists."""
    if settings.controller_public_key is not None:
        return settings.controller_public_key
    if settings.tls is not None:
        candidate = settings.tls.ca.parent / CONTROL_PUB
        if candidate.exists():
            return candidate
    return None


def unsigned_refusal(action: object, allowed: Collection[str]) -> str:
    """Why an unsigned command is refused."""
    shown = action if isinstance(action, str) else "?"
    allowed_text = ", ".join(sorted(allowed)) if allowed else "none"
    return f"unsigned command: {shown} needs a signature (allowed unsigned: {allowed_text})"


class ControllerKey:
    """The controller's public key (None: ``insecure_unsigned_control``, nothing is verified) and
    the controller's clock as learned from what it signed."""

    def __init__(self, path: Path | None, *, node: str = "", store: Store | None = None) -> None:
        self._key = _load(path)
        self.path = path
        self.node = node
        self._store = store
        self._clock = _load_clock(store, node)
        self._ref: tuple[float, float] | None = None  # (wall, boot-time clock) at the last look

    @classmethod
    def from_settings(cls, settings: AgentSettings, store: Store | None = None) -> ControllerKey:
        """The key the settings name or imply; ``ConfigError`` when there is none and unsigned
        control was not allowed explicitly."""
        path = controller_key_path(settings)
        if path is None and not settings.insecure_unsigned_control:
            next_to_ca = f" or {settings.tls.ca.parent / CONTROL_PUB}" if settings.tls is not None else ""
            raise ConfigError(
                f"no controller key: set controller_public_key (the PKI's control.pub){next_to_ca};"
                " insecure_unsigned_control: true accepts unsigned desired state and commands"
            )
        if path is None:
            log.warning("%s: insecure_unsigned_control: desired state and commands are NOT verified", settings.node_id)
        return cls(path, node=settings.node_id, store=store)

    @property
    def configured(self) -> bool:
        return self._key is not None

    def verify(self, raw: dict[str, Any]) -> None:
        """InvalidMessage unless ``raw`` carries a valid signature by this key."""
        from fleet.protocol.signing import verify_document

        assert self._key is not None
        verify_document(raw, self._key)

    # ---- control-plane documents -----------------------------------------------------------

    def check_desired(self, raw: dict[str, Any]) -> None:
        """``InvalidSignature`` unless ``raw`` is a desired state signed for this node (nothing is
        checked without a key); a verified one teaches the controller's clock."""
        from fleet.protocol.signing import DESIRED_KIND, verify_control

        if self._key is None:
            return
        if "signature" not in raw:
            raise InvalidSignature("desired state is not signed", field="signature")
        verify_control(raw, self._key, node=self.node, kind=DESIRED_KIND)
        self._learn(raw["issued_at"], "desired state")

    def check_command(self, raw: dict[str, Any], unsigned_actions: Collection[str]) -> None:
        """``InvalidSignature`` unless ``raw`` is a command signed for this node, or an unsigned one
        whose action is in ``unsigned_actions`` (nothing is checked without a key); a verified one
        teaches the controller's clock."""
        from fleet.protocol.signing import COMMAND_KIND, verify_control

        if self._key is None:
            return
        if "signature" not in raw:
            action = raw.get("action")
            if isinstance(action, str) and action in unsigned_actions:
                return
            raise InvalidSignature(unsigned_refusal(action, unsigned_actions), field="signature")
        verify_control(raw, self._key, node=self.node, kind=COMMAND_KIND)
        self._learn(raw["issued_at"], "command")

    # ---- the controller's clock ------------------------------------------------------------

    @property
    def clock(self) -> core.ControllerClock | None:
        self._follow_steps()
        return self._clock

    def controller_now(self) -> float:
        """Controller time now as far as we know (our own clock before any signed message)."""
        self._follow_steps()
        return core.controller_now(self._clock, time.time())

    def _learn(self, issued_at: float, what: str) -> None:
        self._follow_steps()
        before = self._clock
        self._clock = core.learn_controller_time(before, float(issued_at), time.time())
        if self._clock == before:
            return
        self._save()
        if before is None or abs(self._clock.offset - before.offset) > core.CLOCK_CONFIRM:
            level = logging.WARNING if abs(self._clock.offset) > CLOCK_WARN else logging.INFO
            log.log(
                level,
                "%s: controller clock is %+.1fs from ours (learned from a signed %s)",
                self.node,
                self._clock.offset,
                what,
            )

    def _follow_steps(self) -> None:
        wall, steady = time.time(), time.clock_gettime(_CLOCK_ID)
        ref, self._ref = self._ref, (wall, steady)
        if ref is None or self._clock is None:
            return
        step = (wall - ref[0]) - (steady - ref[1])
        if abs(step) > CLOCK_STEP:
            self._clock = core.clock_stepped(self._clock, step)
            self._save()
            log.info(
                "%s: our clock was set by %+.1fs; controller clock offset now %+.1fs",
                self.node,
                step,
                self._clock.offset,
            )

    def _save(self) -> None:
        if self._store is not None and self._clock is not None:
            value = {"offset": self._clock.offset, "at": self._clock.at}
            self._store.put(CLOCK_KEY, json.dumps(value).encode())


def _load_clock(store: Store | None, node: str) -> core.ControllerClock | None:
    raw = store.get(CLOCK_KEY) if store is not None else None
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return core.ControllerClock(float(value["offset"]), float(value["at"]))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("%s: stored controller clock unreadable, learning it again: %s", node, exc)
        return None


def _load(path: Path | None) -> Any:
    if path is None:
        return None
    from fleet.protocol.signing import InvalidKey, load_public_key

    try:
        return load_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except InvalidKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
