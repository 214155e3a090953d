"""``fleet watch FILTER``: follow fleet traffic as one JSON line per message.

Subscribes with an operator identity (operators may subscribe to everything, see broker/policy.py)
and prints ``{"topic": ..., "payload": ...}`` with msgpack decoded to JSON. A payload that does not
decode is still shown, as ``{"topic": ..., "error": ..., "size": n}``: watching is for debugging,
and the broken message is the interesting one.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Annotated

import typer

from certs import PkiPaths
from fleet.cli import client_identity, fail, parse_host_port
from fleet.controller.mqtt import FleetMqtt, TlsIdentity
from fleet.protocol.codec import to_json_line
from fleet.protocol.errors import FleetError, InvalidMessage

_POLL = 0.2
"""Seconds between checks for Ctrl-C while no message arrives."""


def format_message(topic: str, payload: bytes) -> str:
    """One JSON line for one message; the payload is spliced in as ``to_json_line`` rendered it."""
    try:
        decoded = to_json_line(topic, payload)
    except InvalidMessage as exc:
        return json.dumps({"topic": topic, "error": exc.reason, "size": len(payload)}, ensure_ascii=False)
    return f'{{"topic":{json.dumps(topic, ensure_ascii=False)},"payload":{decoded}}}'


def operator_identity(certs: Path, name: str | None) -> TlsIdentity:
    """The shared operator.pem, or ``certs/operators/<name>``; a missing file is named."""
    pki = PkiPaths(certs)
    client = pki.default_operator if name is None else pki.operator(name)
    hint = "run `fleet certs init`" if name is None else f"run `fleet certs operator {certs} {name}`"
    return client_identity(pki, client, hint)


def watch(
    topic_filter: Annotated[str, typer.Argument(help="MQTT topic filter, e.g. 'fleet/v1/nodes/+/health'.")],
    broker: Annotated[
        str, typer.Option("--broker", envvar="FLEET_BROKER", help="The MQTT broker.", metavar="HOST:PORT")
    ],
    certs: Annotated[Path, typer.Option("--certs", envvar="FLEET_CERTS", help="The PKI directory.", metavar="DIR")],
    identity: Annotated[
        str | None,
        typer.Option(
            "--identity",
            help="Operator name under certs/operators/ (default: operator.pem). "
            "The broker uses the certificate CN as client id: two watches need two identities.",
        ),
    ] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after this many messages.")] = None,
) -> None:
    """Print the messages on FILTER as JSON lines (msgpack decoded) until --count or Ctrl-C."""
    host, port = parse_host_port("--broker", broker)
    tls = operator_identity(certs, identity)
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    try:
        mqtt = FleetMqtt(host, port, tls)
        # Handlers run on paho's thread: hand messages over, print them from this one.
        mqtt.subscribe(topic_filter, lambda topic, payload: inbox.put((topic, payload)))
        mqtt.start()
    except FleetError as exc:
        fail(str(exc))
    try:
        _print_messages(inbox, count)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch normally ends
    finally:
        # The session is persistent (clean_session=False): without this the broker would keep
        # queueing this filter's traffic for the operator until the next watch replays it.
        mqtt.unsubscribe(topic_filter)
        mqtt.close()


def _print_messages(inbox: queue.Queue[tuple[str, bytes]], count: int | None) -> None:
    printed = 0
    while count is None or printed < count:
        try:
            topic, payload = inbox.get(timeout=_POLL)
        except queue.Empty:
            continue
        typer.echo(format_message(topic, payload))
        printed += 1
