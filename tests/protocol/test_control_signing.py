"""Control-plane signatures: desired state and commands bound to node, channel, issue time and expiry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.protocol.codec import decode_raw, encode
from fleet.protocol.errors import InvalidSignature
from fleet.protocol.messages import Command, DesiredState
from fleet.protocol.signing import (
    COMMAND_KIND,
    DESIRED_KIND,
    bind,
    check_binding,
    sign_control,
    sign_document,
    verify_control,
)
from fleet.protocol.topics import Channel

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
NOW = 1_764_000_000.25


def _command(**fields: Any) -> Command:
    return Command(id="c1", action="restart", expires_at=NOW + 600, **fields)


def _raw(message: DesiredState | Command) -> dict[str, Any]:
    return decode_raw("t", encode(message))


def test_kinds_are_the_channel_names() -> None:
    assert (Channel.DESIRED.value, Channel.CMD.value) == (DESIRED_KIND, COMMAND_KIND)


def test_sign_control_binds_node_kind_and_issue_time() -> None:
    signed = sign_control(_command(), "gw-a", KEY, issued_at=NOW)
    assert (signed.node, signed.kind, signed.issued_at) == ("gw-a", "cmd", NOW)
    verify_control(_raw(signed), PUBLIC, node="gw-a", kind=COMMAND_KIND)
    desired = sign_control(DesiredState(generation=3), "gw-a", KEY, issued_at=NOW)
    assert (desired.node, desired.kind) == ("gw-a", "desired")
    verify_control(_raw(desired), PUBLIC, node="gw-a", kind=DESIRED_KIND)


def test_a_signed_command_survives_json_as_mosquitto_pub_sends_it() -> None:
    signed = sign_control(_command(args={"to": "1.0"}), "gw-a", KEY, issued_at=NOW)
    text = json.dumps(signed.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
    verify_control(decode_raw("t", text.encode()), PUBLIC, node="gw-a", kind=COMMAND_KIND)


@pytest.mark.parametrize(
    ("node", "kind", "reason"),
    [
        ("gw-b", COMMAND_KIND, "signed for node 'gw-a', not for 'gw-b'"),
        ("gw-a", DESIRED_KIND, "signed as 'cmd', not as 'desired'"),
    ],
)
def test_a_document_is_refused_for_another_node_or_channel(node: str, kind: str, reason: str) -> None:
    raw = _raw(sign_control(_command(), "gw-a", KEY, issued_at=NOW))
    with pytest.raises(InvalidSignature) as caught:
        verify_control(raw, PUBLIC, node=node, kind=kind)
    assert caught.value.reason == reason


def test_rebinding_after_signing_breaks_the_signature() -> None:
    raw = _raw(sign_control(_command(), "gw-a", KEY, issued_at=NOW))
    raw["node"] = "gw-b"
    with pytest.raises(InvalidSignature, match="signature does not match"):
        verify_control(raw, PUBLIC, node="gw-b", kind=COMMAND_KIND)


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        ("kind", "signed without kind (must be 'cmd')"),
        ("node", "signed without node (must be 'gw-a')"),
        ("issued_at", "signed without issued_at"),
        ("expires_at", "signed command without expires_at"),
    ],
)
def test_a_signature_without_the_binding_is_not_enough(drop: str, reason: str) -> None:
    # Signed by the right key, but the document (e.g. hand-made, or from an older signer) lacks a field.
    raw = _raw(bind(_command(), "gw-a", NOW))
    del raw[drop]
    signed = sign_document(raw, KEY)
    with pytest.raises(InvalidSignature) as caught:
        verify_control(signed, PUBLIC, node="gw-a", kind=COMMAND_KIND)
    assert caught.value.reason == reason


def test_an_unsigned_document_is_refused_before_its_binding() -> None:
    raw = _raw(bind(_command(), "gw-a", NOW))
    with pytest.raises(InvalidSignature, match="document is not signed"):
        verify_control(raw, PUBLIC, node="gw-a", kind=COMMAND_KIND)


def test_desired_state_needs_no_expiry() -> None:
    raw = _raw(sign_control(DesiredState(generation=1), "gw-a", KEY, issued_at=NOW))
    assert "expires_at" not in raw
    check_binding(raw, node="gw-a", kind=DESIRED_KIND)


@pytest.mark.parametrize("value", ["1764000000", True, -1, None])
def test_issue_time_must_be_a_time(value: object) -> None:
    raw = {"id": "c1", "action": "ping", "node": "gw-a", "kind": "cmd", "issued_at": value, "expires_at": NOW}
    with pytest.raises(InvalidSignature, match="signed without issued_at"):
        check_binding(raw, node="gw-a", kind=COMMAND_KIND)


def test_a_signed_command_must_expire() -> None:
    with pytest.raises(ValueError, match="needs expires_at"):
        sign_control(Command(id="c1", action="ping"), "gw-a", KEY, issued_at=NOW)


def test_older_readers_ignore_the_binding_fields() -> None:
    # Unknown fields are ignored on decode, and the new ones are optional: both directions work.
    signed = sign_control(_command(), "gw-a", KEY, issued_at=NOW)
    assert Command.model_validate(_raw(signed)).node == "gw-a"
    assert Command.model_validate({"id": "c1", "action": "ping"}).node is None


def test_a_long_foreign_node_name_is_cut_in_the_reason() -> None:
    raw = _raw(bind(_command(), "gw-a", NOW))
    raw["node"] = "x" * 200
    with pytest.raises(InvalidSignature) as caught:
        check_binding(raw, node="gw-a", kind=COMMAND_KIND)
    assert len(caught.value.reason) < 120
