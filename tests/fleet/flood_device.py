"""A misbehaving device, as its own process: floods ``artifact/req`` as fast as QoS 1 lets it.

    python -m tests.fleet.flood_device HOST PORT CA CERT KEY NODE TARGET... --base BASE...

Cycles through every target with every delta base (and none), always asking for the largest window
the protocol allows from a varying first chunk, with up to ``--inflight`` requests unacknowledged by
the broker (paho's default of 20). It reads its chunks (as a greedy device would) and stops when its
stdin closes or after ``--seconds``; then prints one JSON line of what it sent and received.
``--channel events`` sends the same flood where no service reads it: what the flood costs the
machine and the broker alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.protocol.codec import encode
from fleet.protocol.messages import ArtifactRequest
from fleet.protocol.topics import Channel, node_topic


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("host", "port", "ca", "cert", "key", "node"):
        parser.add_argument(name)
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--base", action="append", default=[])
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--channel", default=Channel.ARTIFACT_REQ.value, help="events: a control flood nobody serves")
    args = parser.parse_args()

    received = {"chunks": 0, "bytes": 0}
    lock = threading.Lock()
    connected = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with lock:
            received["chunks"] += 1
            received["bytes"] += len(message.payload)

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        client.subscribe(node_topic(args.node, Channel.ARTIFACT_CHUNK), 1)
        connected.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.node, protocol=mqtt.MQTTv311)
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    client.tls_set_context(context)
    client.max_inflight_messages_set(args.inflight)
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect(args.host, int(args.port), keepalive=30)
    client.loop_start()
    if not connected.wait(15):
        sys.exit("flooder: not connected")

    stop = threading.Event()

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    topic = node_topic(args.node, Channel(args.channel))
    bases: list[str | None] = [*args.base, None]
    requests = itertools.cycle(
        [
            encode(ArtifactRequest(digest=target, first=first, window=256, delta_base=base))
            for first in (0, 3, 9, 17)
            for target in args.targets
            for base in bases
        ]
    )
    sent = 0
    pending: list[mqtt.MQTTMessageInfo] = []
    deadline = time.monotonic() + args.seconds
    print(json.dumps({"started": True}), flush=True)
    while not stop.is_set() and time.monotonic() < deadline:
        pending.append(client.publish(topic, next(requests), qos=1))
        sent += 1
        if len(pending) >= args.inflight:  # keep paho's own queue bounded: wait for the oldest
            pending.pop(0).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    with lock:
        print(json.dumps({"sent": sent, **received}), flush=True)


if __name__ == "__main__":
    main()
