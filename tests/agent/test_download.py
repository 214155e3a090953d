"""The MQTT download's chunk intake (``agent.update.download``), as ``agent.core.check_chunk`` decides."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentSettings
from agent.store import Store
from agent.transport import Inbound
from agent.update.download import Downloader
from agent.update.hooks import Hooks
from fleet.protocol.codec import encode
from fleet.protocol.messages import ArtifactChunk, ReleaseRef
from fleet.protocol.topics import Channel, node_topic

CHUNK = 1024
DIGEST = "sha256:" + "ab" * 32
ARTIFACT = "sha256:" + "cd" * 32


class FakeTransport:
    def __init__(self) -> None:
        self.acked = 0
        self.connects = 1

    def ack(self, _inbound: Inbound) -> None:
        self.acked += 1


@pytest.fixture
def downloader(tmp_path: Path) -> Iterator[tuple[Downloader, list[tuple[str, str | None]]]]:
    settings = AgentSettings.model_validate(
        {"node_id": "gw-a", "server_addr": "127.0.0.1:1", "tls_enabled": False, "state_dir": str(tmp_path / "state")}
    )
    store = Store(tmp_path / "state" / "agent.db")
    events: list[tuple[str, str | None]] = []

    async def run_release(_release: object) -> None:
        pass

    hooks = Hooks(
        report=lambda *_: None,
        event=lambda kind, detail, _data: events.append((kind, detail)),
        run_release=run_release,
        workload_exits=lambda: 0,
    )
    loader = Downloader(settings, store, FakeTransport(), hooks)  # type: ignore[arg-type]
    loader._downloading = ReleaseRef(name="app", version="1.0.0", digest=DIGEST, size=3 * CHUNK, chunk_size=CHUNK)
    try:
        yield loader, events
    finally:
        store.close()


def chunk_message(index: int, total: int, data: bytes, **changes: Any) -> Inbound:
    chunk = ArtifactChunk(
        digest=DIGEST,
        index=index,
        data=data,
        total=total,
        size=total * CHUNK,
        artifact=ARTIFACT,
        sha256="sha256:" + hashlib.sha256(data).hexdigest(),
    ).model_copy(update=changes)
    return Inbound(node_topic("gw-a", Channel.ARTIFACT_CHUNK), encode(chunk), 0, 0, False, 1)


def test_a_verified_chunk_is_written_and_recorded(downloader: tuple[Downloader, list[Any]]) -> None:
    loader, events = downloader
    loader.on_chunk(chunk_message(1, 3, b"x" * CHUNK))
    assert loader.store.stored_chunks(DIGEST) == {1}
    assert loader.part_path(DIGEST).read_bytes()[CHUNK:] == b"x" * CHUNK
    assert events == []


def test_a_chunk_past_the_last_is_refused_not_written_past_the_end(
    downloader: tuple[Downloader, list[Any]],
) -> None:
    loader, events = downloader
    loader.on_chunk(chunk_message(7, 3, b"x" * CHUNK))
    part = loader.part_path(DIGEST)
    assert not part.exists() or part.stat().st_size <= 3 * CHUNK
    assert loader.store.stored_chunks(DIGEST) == set()
    assert events == [("chunk_refused", "chunk 7 is past the last of 3 chunks")]


def test_a_corrupt_chunk_is_refused_and_a_stale_one_ignored(downloader: tuple[Downloader, list[Any]]) -> None:
    loader, events = downloader
    loader.on_chunk(chunk_message(0, 3, b"x" * CHUNK, sha256="sha256:" + "00" * 32))
    loader.on_chunk(chunk_message(0, 3, b"x" * CHUNK, digest="sha256:" + "ef" * 32))
    assert loader.store.stored_chunks(DIGEST) == set()
    assert events == [("chunk_refused", "chunk 0 digest mismatch")]


def test_a_server_error_is_kept_for_the_download_loop(downloader: tuple[Downloader, list[Any]]) -> None:
    loader, _events = downloader
    loader.on_chunk(chunk_message(0, 3, b"", error="unknown release"))
    assert loader._server_error == "unknown release"
