"""What authentication costs a request: the controller's HTTPS API, measured from a client.

    python bench/api_latency.py [--requests 400]

A real ``fleet controller`` process (embedded broker, fresh PKI) answers, over one kept-alive TLS
connection each: ``GET /healthz`` (public: the gate without authentication), ``GET /v1/whoami``
with an API token and with the operator certificate (authentication and the role check), and
``GET /v1/nodes`` (a list); then ``GET /v1/whoami`` on a new connection per request (a full TLS
handshake with a client certificate). Prints one JSON document: median and p95 per case, in ms.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import BenchPki, run_and_print, running_broker, say
from tests.conftest import Pki
from tests.controllerproc import ControllerProcess


def timed(call: Any, requests: int) -> dict[str, float]:
    for _ in range(20):  # warm-up
        call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        response = call()
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples) * 1000, 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1] * 1000, 2),
    }


def run(requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fleet-api-bench-") as tmp:
        workdir = Path(tmp)
        bench_pki = BenchPki.create(workdir / "pki", "gw-bench")
        pki = Pki(bench_pki.paths, bench_pki.paths)
        with running_broker("amqtt", bench_pki, workdir) as endpoint:
            controller = ControllerProcess(pki, endpoint, workdir, workdir / "store", identity="ctl-bench")
            controller.start()
            try:
                token = controller.post("/tokens", {"name": "bench", "role": "viewer"})["token"]
                results: dict[str, Any] = {"requests_per_case": requests}
                ca = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
                with httpx.Client(base_url=controller.url, verify=ca) as public:
                    say("GET /healthz (public)")
                    results["healthz_public"] = timed(lambda: public.get("/healthz"), requests)
                with controller.http(token=token) as tokened:
                    say("GET /v1/whoami with a token")
                    results["whoami_token"] = timed(lambda: tokened.get("/v1/whoami"), requests)
                with controller.http() as certified:
                    say("GET /v1/whoami and /v1/nodes with the operator certificate")
                    results["whoami_certificate"] = timed(lambda: certified.get("/v1/whoami"), requests)
                    results["list_nodes_certificate"] = timed(lambda: certified.get("/v1/nodes"), requests)

                def handshake() -> httpx.Response:
                    with controller.http() as fresh:
                        return fresh.get("/v1/whoami")

                say("GET /v1/whoami on a new TLS connection each")
                results["whoami_certificate_new_connection"] = timed(handshake, max(requests // 4, 20))
            finally:
                controller.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per case (default 400)")
    args = parser.parse_args(argv)
    return run_and_print(lambda: run(args.requests))


if __name__ == "__main__":
    sys.exit(main())
