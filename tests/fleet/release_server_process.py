"""A release service in its own process, driven over stdin: what the flood test measures.

    python -m tests.fleet.release_server_process HOST PORT CA CERT KEY STORE

Prints ``{"ready": true}`` once it serves, then answers each ``stats`` line on stdin with one JSON
line of its counters; stops when stdin closes. Its own process, so the devices of the test (and
their GIL) do not share the service's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.releases import ReleaseStore


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("host", "port", "ca", "cert", "key", "store"):
        parser.add_argument(name)
    args = parser.parse_args()
    identity = TlsIdentity(Path(args.ca), Path(args.cert), Path(args.key))
    mqtt = FleetMqtt(args.host, int(args.port), identity, options=MqttOptions(reconnect_min=1, reconnect_max=2))
    mqtt.start()
    service = ReleaseService(mqtt, ReleaseServer(ReleaseStore(Path(args.store))))
    service.start()
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(dataclasses.asdict(service.stats())), flush=True)
    finally:
        service.stop()
        mqtt.close()


if __name__ == "__main__":
    main()
