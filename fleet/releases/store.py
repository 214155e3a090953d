"""The release store on disk: building releases into it, reading them back, deltas made ahead of time.

Layout (see the package docstring) is content-addressed where it matters: a delta's file name is
made of the two payload digests, so a cached delta can never silently belong to another payload.

Deltas are expensive (zstd -19 with long-distance matching over base + target: seconds of a core
per MiB), so whoever serves devices never makes one for them: ``prepare`` queues the pairs a
rollout will need for one background thread, and ``prepared_delta`` only looks for a finished file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet.protocol.artifacts import apply_delta, compress_full, decompress_full, make_delta, sha256_digest
from fleet.protocol.messages import MAX_CHUNK_SIZE, ProbeSpec, digest_hex
from fleet.releases.errors import ArtifactMismatch, ReleaseError, ReleaseNotFound
from fleet.releases.manifest import (
    MAX_CHUNKS,
    NAME_PATTERN,
    RESERVED_VERSIONS,
    ReleaseManifest,
    parse_manifest,
    read_manifest_file,
    verify_manifest_file,
)
from fleet.releases.payload import build_payload, chunk_count, chunk_digests

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ARTIFACT_FILE = "payload.tar.zst"
DELTAS_DIR = "deltas"
DELTA_WORTH_RATIO = 0.6
"""A delta is kept only below this fraction of the full artifact: the gain must pay for the extra
failure mode (a device whose base is not what the controller believes falls back to the full one)."""
MAX_PENDING_DELTAS = 1000
"""Pairs waiting for the delta worker; more are not queued (a rollout names a few bases at most)."""
DELTA_WORKER_NICE = 10
"""The delta worker thread runs at this nice value, so serving devices keeps its share of the CPU."""


def build_release(
    source: Path,
    *,
    name: str,
    version: str,
    store: Path,
    release_key: Ed25519PrivateKey,
    entry: list[str],
    health: ProbeSpec | None,
    chunk_size: int,
    force: bool = False,
) -> ReleaseManifest:
    """Pack ``source``, sign its manifest and add it to ``store`` as ``name@version``.

    Refuses an existing complete version unless ``force``. The manifest is written last, so a build
    interrupted at any point leaves a version directory that the store does not list.
    """
    _check_name("name", name)
    _check_name("version", version)
    _check_chunk_size(chunk_size)
    version_dir = store / name / version
    payload = build_payload(source)
    _check_chunk_count(len(payload), chunk_size)
    manifest = parse_manifest(
        {
            "name": name,
            "version": version,
            "digest": sha256_digest(payload),
            "size": len(payload),
            "chunk_size": chunk_size,
            "chunk_digests": chunk_digests(payload, chunk_size),
            "entry": entry,
            "health": health.model_dump() if health is not None else None,
            "created_at": int(time.time()),
        },
        source=f"release {name}@{version}",
    ).signed(release_key)
    manifest_path = version_dir / MANIFEST_FILE
    if manifest_path.exists():
        if not force:
            raise ReleaseError(f"{manifest_path}: {name}@{version} already exists (use --force to replace it)")
        # Hide the old version first: its manifest must never sit next to the new artifact.
        _remove_durably(manifest_path)
    _write_atomic(version_dir / ARTIFACT_FILE, compress_full(payload))
    _write_atomic(manifest_path, manifest.to_json())
    logger.info("built %s (%s, %d bytes)", manifest.label, manifest.digest, manifest.size)
    return manifest


@dataclass(frozen=True)
class DeltaStats:
    queued: int = 0
    """Pairs accepted by ``prepare`` (not already made, pending or the same payload)."""
    made: int = 0
    """Deltas written (a ``.zst`` file)."""
    not_worth_it: int = 0
    """Pairs answered with a ``.none`` file (the delta would not be small enough)."""
    skipped: int = 0
    """Pairs dropped by the worker: base or target not (or no longer) in the store."""
    failed: int = 0
    """Pairs whose delta could not be made (read or write error, a delta that does not decode)."""
    overflow: int = 0
    """Pairs refused because ``MAX_PENDING_DELTAS`` were already waiting."""


class ReleaseStore:
    """Read access to a store directory, plus deltas made ahead of time by one background thread.

    Listing and lookups trust the store's own disk (no signature check); :meth:`verify` re-checks
    signature, artifact digest and chunk digests. Parsed manifests are kept per file (and re-read
    when the file changes), so looking a digest up costs a directory walk, not a parse per release.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._manifests: dict[Path, tuple[tuple[int, int, int], ReleaseManifest]] = {}
        self._manifests_lock = threading.Lock()
        # The delta worker (started by the first prepare()): pairs of (base, target) payload digests.
        self._deltas_lock = threading.Condition()
        self._delta_queue: deque[tuple[str, str]] = deque()
        self._delta_busy: tuple[str, str] | None = None
        self._delta_worker: threading.Thread | None = None
        self._delta_closing = False
        self._delta_stats = DeltaStats()

    def list(self) -> list[ReleaseManifest]:
        """Every complete release (one with a manifest), sorted by name, then version."""
        manifests = [self._read_manifest(path) for path in sorted(self.root.glob(f"*/*/{MANIFEST_FILE}"))]
        return sorted(manifests, key=lambda manifest: (manifest.name, _version_key(manifest.version)))

    def _read_manifest(self, path: Path) -> ReleaseManifest:
        """``read_manifest_file``, parsed again only when the file changed (a rebuild replaces it)."""
        try:
            stat = path.stat()
        except OSError:
            return read_manifest_file(path)  # gone meanwhile: let the reader name the error
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._manifests_lock:
            known = self._manifests.get(path)
        if known is not None and known[0] == key:
            return known[1]
        manifest = read_manifest_file(path)
        with self._manifests_lock:
            self._manifests[path] = (key, manifest)
        return manifest

    def get(self, name: str, version: str) -> ReleaseManifest:
        """The manifest of ``name@version``; ``ReleaseNotFound`` if the store has no complete one."""
        path = self.manifest_path(name, version)
        if not (_is_valid_name(name) and _is_valid_name(version) and path.is_file()):
            raise ReleaseNotFound(f"{name}@{version}: no such release in {self.root}")
        manifest = read_manifest_file(path)
        if (manifest.name, manifest.version) != (name, version):
            raise ReleaseError(f"{path}: describes {manifest.label}, not {name}@{version}")
        return manifest

    def by_digest(self, digest: str) -> ReleaseManifest | None:
        """The release whose payload has ``digest`` (with or without ``sha256:``), if any."""
        wanted = digest_hex(digest)
        return next((manifest for manifest in self.list() if digest_hex(manifest.digest) == wanted), None)

    def manifest_path(self, name: str, version: str) -> Path:
        return self.root / name / version / MANIFEST_FILE

    def artifact_path(self, manifest: ReleaseManifest) -> Path:
        """The full artifact (zstd of the payload)."""
        return self.root / manifest.name / manifest.version / ARTIFACT_FILE

    def payload(self, manifest: ReleaseManifest) -> bytes:
        """The uncompressed payload, checked against the manifest's digest."""
        path = self.artifact_path(manifest)
        try:
            return decompress_full(_read(path), manifest.digest)
        except ArtifactMismatch as exc:
            raise ArtifactMismatch(f"{path}: {exc.reason}", field=exc.field) from exc

    def delta_path(self, base: ReleaseManifest, target: ReleaseManifest) -> Path:
        return self._delta_file(target, base.digest)

    def _delta_file(self, target: ReleaseManifest, base_digest: str) -> Path:
        """``ValueError`` if ``base_digest`` is not a sha256 digest (it becomes part of a file name)."""
        base_hex = digest_hex(base_digest)
        if not _HEX_DIGEST.fullmatch(base_hex):
            raise ValueError(f"{base_digest!r} is not a sha256 digest")
        return self.root / target.name / DELTAS_DIR / f"{base_hex}-{digest_hex(target.digest)}.zst"

    def prepared_delta(self, target: ReleaseManifest, base_digest: str) -> Path | None:
        """The delta from the payload ``base_digest`` to ``target`` if it has been made; never makes one.

        One ``stat``: cheap enough for every request a device sends. ``None`` also when the pair was
        found not worth a delta, or is still waiting for :meth:`prepare`'s worker.
        """
        try:
            path = self._delta_file(target, base_digest)
        except ValueError:  # not a digest: no file can be named after it
            return None
        return path if path.is_file() else None

    def delta(self, base: ReleaseManifest, target: ReleaseManifest) -> Path | None:
        """The cached delta from ``base`` to ``target``, computed now if needed; ``None`` if not worth it.

        Synchronous and expensive: for the CLI, benchmarks and :meth:`prepare`'s worker, never for
        a device's request. "Not worth it" (at least ``DELTA_WORTH_RATIO`` of the full artifact) is
        cached too, as an empty ``.none`` file: the controller asks for the same pair once per device.
        """
        path = self.delta_path(base, target)
        refused = path.with_suffix(".none")
        if path.is_file():
            return path
        if refused.is_file():
            return None
        base_payload, target_payload = self.payload(base), self.payload(target)
        delta = make_delta(base_payload, target_payload)
        full_size = self.artifact_path(target).stat().st_size
        if len(delta) >= DELTA_WORTH_RATIO * full_size:
            logger.info(
                "delta %s -> %s is %d bytes, full artifact %d: not kept",
                base.label,
                target.label,
                len(delta),
                full_size,
            )
            _write_atomic(refused, b"")
            return None
        # Prove it decodes before anyone downloads it: a bad delta would fail on every device.
        apply_delta(base_payload, delta, target.digest)
        _write_atomic(path, delta)
        return path

    # ---- deltas ahead of time ------------------------------------------------------------------

    def prepare(self, target: ReleaseManifest, bases: Iterable[str]) -> int:
        """Queue the deltas from each payload digest in ``bases`` to ``target`` for the background worker.

        Returns at once with the number of pairs queued: pairs already made (or found not worth it),
        already waiting, or with ``target`` itself as base are not. The worker makes one delta at a
        time, at a lower CPU priority; a base that is not a release in this store is skipped there
        (the lookup is the worker's, not the caller's). Until a pair is made, devices asking for it
        get the full artifact.
        """
        queued = 0
        target_hex = digest_hex(target.digest)
        with self._deltas_lock:
            if self._delta_closing:
                return 0
            for base in dict.fromkeys(bases):
                try:
                    made = self._delta_file(target, base)
                except ValueError:
                    continue
                pair = (digest_hex(base), target_hex)
                if pair[0] == target_hex or pair in self._delta_queue or pair == self._delta_busy:
                    continue
                if made.is_file() or made.with_suffix(".none").is_file():
                    continue
                if len(self._delta_queue) >= MAX_PENDING_DELTAS:
                    self._count_delta(overflow=1)
                    logger.warning("delta queue full (%d pairs): %s -> %s not queued", MAX_PENDING_DELTAS, base, target)
                    continue
                self._delta_queue.append(pair)
                queued += 1
            if queued:
                self._count_delta(queued=queued)
                self._start_delta_worker()
                self._deltas_lock.notify_all()
        if queued:
            logger.info("%s: %d delta(s) queued", target.label, queued)
        return queued

    def delta_stats(self) -> DeltaStats:
        with self._deltas_lock:
            return self._delta_stats

    def deltas_pending(self) -> int:
        """Pairs queued or being made."""
        with self._deltas_lock:
            return len(self._delta_queue) + (self._delta_busy is not None)

    def wait_prepared(self, timeout: float) -> bool:
        """Wait until every queued delta is made (or skipped) and the worker has ended; False if
        some are still pending at ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._deltas_lock:
            while self._delta_queue or self._delta_busy is not None or self._delta_worker is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._deltas_lock.wait(remaining)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the delta worker: pending pairs are forgotten, the one being made is finished (bounded wait)."""
        with self._deltas_lock:
            self._delta_closing = True
            self._delta_queue.clear()
            self._deltas_lock.notify_all()
            worker = self._delta_worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _count_delta(self, **increments: int) -> None:  # with _deltas_lock held
        stats = self._delta_stats
        self._delta_stats = DeltaStats(**{k: getattr(stats, k) + increments.get(k, 0) for k in vars(stats)})

    def _start_delta_worker(self) -> None:  # with _deltas_lock held
        if self._delta_worker is None:
            self._delta_worker = threading.Thread(target=self._make_deltas, name="release-deltas", daemon=True)
            self._delta_worker.start()

    def _make_deltas(self) -> None:
        # Linux applies a thread's own nice value (the tid is a PID for setpriority).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DELTA_WORKER_NICE)
        while True:
            with self._deltas_lock:
                if self._delta_closing or not self._delta_queue:
                    # Idle or closing: the thread ends (the next prepare() starts another one).
                    self._delta_worker = None
                    self._deltas_lock.notify_all()
                    return
                pair = self._delta_busy = self._delta_queue.popleft()
            try:
                outcome = self._make_one(*pair)
            except Exception:  # one bad pair (disk full, corrupt base) must not stop the others
                logger.exception("delta %s -> %s failed", *pair)
                outcome = "failed"
            with self._deltas_lock:
                self._delta_busy = None
                self._count_delta(**{outcome: 1})
                self._deltas_lock.notify_all()

    def _make_one(self, base_hex: str, target_hex: str) -> str:
        base, target = self.by_digest(base_hex), self.by_digest(target_hex)
        if base is None or target is None:
            logger.info("delta %s -> %s: not both releases of this store, skipped", base_hex[:12], target_hex[:12])
            return "skipped"
        started = time.monotonic()
        path = self.delta(base, target)
        logger.info(
            "delta %s -> %s %s in %.1fs",
            base.label,
            target.label,
            "made" if path is not None else "not worth it",
            time.monotonic() - started,
        )
        return "made" if path is not None else "not_worth_it"

    # ---- checking a release ----------------------------------------------------------------------

    def verify(self, name: str, version: str, public_key: Ed25519PublicKey) -> ReleaseManifest:
        """Check the manifest's signature, the artifact's digest and every chunk digest."""
        self.get(name, version)  # "no such release" rather than "no such file", and names checked
        manifest = verify_manifest_file(self.manifest_path(name, version), public_key)
        payload = self.payload(manifest)
        path = self.artifact_path(manifest)
        if len(payload) != manifest.size:
            raise ArtifactMismatch(f"{path}: payload is {len(payload)} bytes, manifest says {manifest.size}")
        for index, (actual, expected) in enumerate(
            zip(chunk_digests(payload, manifest.chunk_size), manifest.chunk_digests, strict=True)
        ):
            if actual != expected:
                raise ArtifactMismatch(f"{path}: chunk {index} does not match its digest", field="chunk_digests")
        return manifest


# --- checks -------------------------------------------------------------------------------------

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def _is_valid_name(value: str) -> bool:
    return re.fullmatch(NAME_PATTERN, value) is not None


def _check_name(what: str, value: str) -> None:
    # Checked before anything else: the value becomes a directory name in the store.
    if not _is_valid_name(value):
        raise ReleaseError(f"{what} {value!r}: use letters, digits and . _ + - (not first), at most 128 characters")
    if what == "version" and value in RESERVED_VERSIONS:
        raise ReleaseError(f"version {value!r}: reserved (the store keeps deltas under that name)")


def _check_chunk_size(chunk_size: int) -> None:
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ReleaseError(f"chunk size {chunk_size}: must be between 1 and {MAX_CHUNK_SIZE} bytes")


def _check_chunk_count(size: int, chunk_size: int) -> None:
    count = chunk_count(size, chunk_size)
    if count <= MAX_CHUNKS:
        return
    needed = chunk_count(size, MAX_CHUNKS)
    if needed > MAX_CHUNK_SIZE:
        raise ReleaseError(
            f"payload of {size} bytes needs more than {MAX_CHUNKS} chunks even at the largest chunk size "
            f"({MAX_CHUNK_SIZE} bytes): make the release smaller"
        )
    raise ReleaseError(
        f"payload of {size} bytes would be {count} chunks of {chunk_size} bytes, at most {MAX_CHUNKS} allowed: "
        f"use --chunk-size {_round_up_kib(needed)}KiB or more (max {MAX_CHUNK_SIZE // 1024}KiB)"
    )


def _round_up_kib(size: int) -> int:
    return -(-size // 1024)


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """Natural order: 1.10.0 after 1.9.0 (numbers compare as numbers, before any text)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part]


# --- crash-safe files ---------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, complete."""
    _make_dirs_durably(path.parent)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # served to devices; mkstemp's 0600 helps nobody here
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ReleaseError(f"{path}: cannot write: {exc.strerror}") from exc
    _fsync_dir(path.parent)


def _remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot remove: {exc.strerror}") from exc
    _fsync_dir(path.parent)


def _make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` that also syncs each new directory's parent, so the new entries survive a crash."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReleaseError(f"{directory}: cannot create: {exc.strerror}") from exc
    for created in reversed(missing):
        _fsync_dir(created.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ReleaseError(f"{directory}: cannot open to sync: {exc.strerror}") from exc
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
