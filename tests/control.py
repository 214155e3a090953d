"""Signed control-plane messages for tests, made as the controller and ``fleet sign`` make them:
bound to a node and channel and signed with the PKI's ``control.key`` (fleet.protocol.signing)."""

from __future__ import annotations

import json
import time
from typing import Any

from certs import PkiPaths, load_control_key
from fleet.protocol.codec import encode
from fleet.protocol.messages import Command, DesiredState
from fleet.protocol.signing import sign_control


def signed_command(
    pki: PkiPaths,
    node: str,
    command_id: str,
    action: str,
    *,
    args: dict[str, Any] | None = None,
    expires_in: float = 600.0,
    issued_at: float | None = None,
) -> Command:
    """A command for ``node`` signed with the control key, issued at ``issued_at`` (default now)."""
    now = time.time() if issued_at is None else issued_at
    command = Command(id=command_id, action=action, args=args or {}, expires_at=now + expires_in)
    return sign_control(command, node, load_control_key(pki), issued_at=now)


def signed_command_json(pki: PkiPaths, node: str, command_id: str, action: str, **options: Any) -> str:
    """:func:`signed_command` as the JSON line ``fleet sign`` prints (for ``mosquitto_pub -m``)."""
    command = signed_command(pki, node, command_id, action, **options)
    return json.dumps(command.model_dump(mode="json", exclude_none=True), separators=(",", ":"))


def signed_desired(pki: PkiPaths, node: str, desired: DesiredState, *, issued_at: float | None = None) -> DesiredState:
    """``desired`` bound to ``node`` and signed with the control key."""
    now = time.time() if issued_at is None else issued_at
    return sign_control(desired, node, load_control_key(pki), issued_at=now)


def signed_desired_payload(pki: PkiPaths, node: str, desired: DesiredState) -> bytes:
    return encode(signed_desired(pki, node, desired))
