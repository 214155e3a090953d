"""The HTTPS artifact source: the Range client and the updater's resumable download over it.

``RangeServer`` serves a directory (the release store) over TLS with the PKI's server certificate
and answers ``Range: bytes=a-b`` with 206; it can cut a response short or refuse with 404, and it
records every range asked for. The e2e test in ``test_updates.py`` uses it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentSettings
from agent.https_source import RangeClient, SourceError, check_url, tls_context
from agent.store import Download, Store
from agent.update.decode import decode_artifact
from agent.update.hooks import Hooks
from agent.updater import Updater
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import ReleaseRef
from tests.conftest import Pki

RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass
class ServerControl:
    """What the handler does next; mutated by tests."""

    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    cut_next: int = 0  # cut this many responses short (half the body, then close)
    status: int | None = None  # answer every request with this status (e.g. 404)


class RangeServer:
    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        control = self.control = ServerControl()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = (root / self.path.lstrip("/")).resolve()
                match = RANGE.match(self.headers.get("Range", ""))
                if control.status is not None or not path.is_file() or not path.is_relative_to(root.resolve()):
                    self._empty(control.status or 404)
                    return
                if match is None:
                    self._empty(416)
                    return
                data = path.read_bytes()
                start, end = int(match[1]), min(int(match[2]), len(data) - 1)
                control.ranges.append((self.path, start, end))
                body = data[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if control.cut_next > 0:
                    control.cut_next -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base_url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CHUNK = 1024
SIZE = 10 * CHUNK + 100  # 11 chunks, the last one short


@pytest.fixture
def served(pki: Pki, tmp_path: Path) -> Iterator[tuple[RangeServer, bytes]]:
    data = hashlib.sha256(b"seed").digest() * (SIZE // 32 + 1)
    data = data[:SIZE]
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "artifact.zst").write_bytes(data)
    with RangeServer(tmp_path / "www", pki.paths.server_cert, pki.paths.server_key) as server:
        yield server, data


def client(server: RangeServer, pki: Pki) -> RangeClient:
    return RangeClient(f"{server.base_url}/artifact.zst", timeout=5, context=tls_context(pki.paths.ca_cert))


def test_client_fetches_exact_ranges_over_one_tls_connection(served: tuple[RangeServer, bytes], pki: Pki) -> None:
    server, data = served
    source = client(server, pki)
    pieces = [source.fetch(start, min(CHUNK, SIZE - start), SIZE) for start in range(0, SIZE, CHUNK)]
    source.close()
    assert b"".join(pieces) == data
    assert [(start, end) for _path, start, end in server.control.ranges][-1] == (10 * CHUNK, SIZE - 1)


def test_client_refuses_a_server_outside_the_trusted_cas(served: tuple[RangeServer, bytes], pki: Pki) -> None:
    server, _data = served
    untrusted = RangeClient(f"{server.base_url}/artifact.zst", timeout=5, context=tls_context(None))
    with pytest.raises(SourceError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.fetch(0, CHUNK, SIZE)


def test_client_reports_a_cut_mid_range_and_recovers(served: tuple[RangeServer, bytes], pki: Pki) -> None:
    server, data = served
    source = client(server, pki)
    server.control.cut_next = 1
    with pytest.raises(SourceError, match=r"IncompleteRead|of 1024 bytes"):
        source.fetch(0, CHUNK, SIZE)
    assert source.fetch(0, CHUNK, SIZE) == data[:CHUNK]  # a new connection after the cut
    source.close()


def test_client_reports_404_and_a_wrong_total(served: tuple[RangeServer, bytes], pki: Pki) -> None:
    server, _data = served
    missing = RangeClient(f"{server.base_url}/nope.zst", timeout=5, context=tls_context(pki.paths.ca_cert))
    with pytest.raises(SourceError, match="HTTP 404"):
        missing.fetch(0, CHUNK, SIZE)
    wrong_total = client(server, pki)
    with pytest.raises(SourceError, match="Content-Range"):
        wrong_total.fetch(0, CHUNK, SIZE + 1)  # the file is not the size the ref names


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://cdn.example.com/app/1.0/payload.tar.zst", True),
        ("http://127.0.0.1:8080/a", True),
        ("http://localhost/a", True),
        ("http://[::1]/a", True),
        ("http://cdn.example.com/a", False),
        ("ftp://127.0.0.1/a", False),
        ("https:///a", False),
    ],
)
def test_only_https_or_loopback_http_is_allowed(url: str, allowed: bool) -> None:
    if allowed:
        check_url(url)
    else:
        with pytest.raises(SourceError):
            check_url(url)


# ---- the updater's download over the range client -----------------------------------------------


@dataclass
class Recorder:
    events: list[tuple[str, str | None]] = field(default_factory=list)

    def hooks(self) -> Hooks:
        async def run_release(_release: object) -> None:
            pass

        return Hooks(
            report=lambda *_: None,
            event=lambda kind, detail, _data: self.events.append((kind, detail)),
            run_release=run_release,
            workload_exits=lambda: 0,
        )


def make_updater(tmp_path: Path, pki: Pki, recorder: Recorder, max_failures: int = 5) -> tuple[Updater, Store]:
    settings = AgentSettings.model_validate(
        {
            "node_id": "gw-a",
            "server_addr": "127.0.0.1:1",
            "tls": {"ca": str(pki.paths.ca_cert), "cert": str(pki.paths.server_cert), "key": str(pki.paths.server_key)},
            "state_dir": str(tmp_path / "state"),
            "update": {"max_failures": max_failures, "request_timeout": "5s"},
        }
    )
    store = Store(tmp_path / "state" / "agent.db")
    # Transport and health monitor are not used by the HTTPS download.
    return Updater(settings, store, None, None, recorder.hooks()), store  # type: ignore[arg-type]


def ref_for(server: RangeServer, data: bytes, digest: str | None = None) -> ReleaseRef:
    return ReleaseRef(
        name="app",
        version="1.0.0",
        digest="sha256:" + "ab" * 32,
        size=SIZE,
        chunk_size=CHUNK,
        url=f"{server.base_url}/artifact.zst",
        artifact_size=len(data),
        artifact_digest=digest or "sha256:" + hashlib.sha256(data).hexdigest(),
    )


def test_download_resumes_from_the_first_missing_chunk_of_a_partial_file(
    served: tuple[RangeServer, bytes], pki: Pki, tmp_path: Path
) -> None:
    server, data = served
    updater, store = make_updater(tmp_path, pki, Recorder())
    ref = ref_for(server, data)
    assert ref.artifact_digest is not None
    # As a kill -9 after chunk 3 leaves it: chunks 0-3 on disk and recorded.
    store.start_download(Download(ref.digest, None, ref.artifact_digest, SIZE, 11))
    part = updater.downloader.part_path(ref.digest)
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: 4 * CHUNK])
    for index in range(4):
        store.chunk_stored(ref.digest, index)
    assert asyncio.run(updater.downloader.over_https(ref)) is True
    assert part.read_bytes() == data
    assert [start for _path, start, _end in server.control.ranges] == [index * CHUNK for index in range(4, 11)]
    store.close()


def test_download_survives_cuts_and_a_wrong_digest_is_refused(
    served: tuple[RangeServer, bytes], pki: Pki, tmp_path: Path
) -> None:
    server, data = served
    recorder = Recorder()
    updater, store = make_updater(tmp_path, pki, recorder)
    server.control.cut_next = 2
    ref = ref_for(server, data, digest="sha256:" + "00" * 32)
    assert asyncio.run(updater.downloader.over_https(ref)) is True
    assert updater.downloader.part_path(ref.digest).read_bytes() == data
    assert [kind for kind, _ in recorder.events] == ["download_error", "download_error"]
    with pytest.raises(InvalidMessage, match="does not match its digest"):
        decode_artifact(ref, store, updater.releases)
    store.close()


def test_repeated_failures_give_up_for_mqtt_with_an_event(
    served: tuple[RangeServer, bytes], pki: Pki, tmp_path: Path
) -> None:
    server, data = served
    recorder = Recorder()
    updater, store = make_updater(tmp_path, pki, recorder, max_failures=2)
    server.control.status = 503
    assert asyncio.run(updater.downloader.over_https(ref_for(server, data))) is False
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["download_error", "download_error", "https_fallback"]
    assert "HTTP 503" in (recorder.events[-1][1] or "")
    store.close()


def test_plain_http_to_a_remote_host_is_refused_with_an_event(
    served: tuple[RangeServer, bytes], pki: Pki, tmp_path: Path
) -> None:
    server, data = served
    recorder = Recorder()
    updater, store = make_updater(tmp_path, pki, recorder)
    ref = ref_for(server, data).model_copy(update={"url": "http://cdn.example.com/app/1.0.0/payload.tar.zst"})
    assert updater.downloader.https_usable(ref) is False
    assert [kind for kind, _ in recorder.events] == ["https_refused", "https_fallback"]
    store.close()
