"""The agent's durable state in one SQLite file: seen commands, the outbox, applied desired state.

Every change is a transaction with ``synchronous=FULL``, so a ``kill -9`` or power loss at any
line leaves either the state before or after it. The outbox keeps what must reach the controller
while the link is down: acks are never dropped; telemetry is dropped oldest-first past the limit;
state (retained topics) keeps only the newest message per topic.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    payload BLOB,
    received_at REAL NOT NULL,
    expires_at REAL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS commands_received ON commands (received_at);
CREATE TABLE IF NOT EXISTS downloads (
    target TEXT PRIMARY KEY,
    base TEXT,
    artifact TEXT NOT NULL,
    size INTEGER NOT NULL,
    total INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (target TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (target, idx));
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _only_owner(path: Path) -> None:
    if path.stat().st_mode & 0o777 != 0o600:
        os.chmod(path, 0o600)


class OutboxKind(StrEnum):
    ACK = "ack"  # never dropped
    STATE = "state"  # retained topic: only the newest per topic matters
    TELEMETRY = "telemetry"  # events, health: the oldest go first when full


class CommandStatus(StrEnum):
    RECEIVED = "received"  # stored, not started: run it after a crash
    EXECUTING = "executing"  # started: never run again, it may have taken effect
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Download:
    target: str  # payload digest the artifact decodes to
    base: str | None  # delta base payload digest; None for a full artifact
    artifact: str  # sha256 of the whole artifact
    size: int
    total: int  # number of chunks


@dataclass(frozen=True)
class CommandRecord:
    id: str
    action: str
    status: CommandStatus
    payload: bytes | None
    detail: str | None


class Store:
    def __init__(self, path: Path, *, outbox_limit: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 whatever the umask: SQLite gives the -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        _only_owner(path)
        # check_same_thread=False: only the event loop thread uses it, but tests open it elsewhere.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        for journal in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if journal.exists():
                _only_owner(journal)  # an older agent's, made before the database file was 0600
        self.outbox_limit = outbox_limit
        self.telemetry_dropped = 0

    def close(self) -> None:
        self._db.close()

    # ---- key/value -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_text(self, key: str) -> str | None:
        value = self.get(key)
        return None if value is None else value.decode()

    def put(self, key: str, value: bytes) -> None:
        self._db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    # ---- commands --------------------------------------------------------------------------

    def record_command(
        self, command_id: str, action: str, payload: bytes, expires_at: float | None
    ) -> CommandRecord | None:
        """Insert a new command as RECEIVED; return the existing record if the id was seen before."""
        with self._transaction():
            row = self._db.execute(
                "SELECT id, action, status, payload, detail FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
            if row is not None:
                return _command(row)
            self._db.execute(
                "INSERT INTO commands (id, action, status, payload, received_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (command_id, action, CommandStatus.RECEIVED, payload, time.time(), expires_at),
            )
        return None

    def record_refused(self, command_id: str, action: str, status: CommandStatus, detail: str) -> None:
        """A command refused before execution is still remembered, so a resend gets `duplicate`."""
        self._db.execute(
            "INSERT OR IGNORE INTO commands (id, action, status, received_at, detail) VALUES (?, ?, ?, ?, ?)",
            (command_id, action, status, time.time(), detail),
        )

    def set_command_status(self, command_id: str, status: CommandStatus, detail: str | None = None) -> None:
        self._db.execute("UPDATE commands SET status = ?, detail = ? WHERE id = ?", (status, detail, command_id))

    def commands_in(self, status: CommandStatus) -> list[CommandRecord]:
        rows = self._db.execute(
            "SELECT id, action, status, payload, detail FROM commands WHERE status = ? ORDER BY received_at", (status,)
        ).fetchall()
        return [_command(row) for row in rows]

    def prune_commands(self, older_than: float, keep_at_most: int) -> int:
        """Forget old command ids; ids still RECEIVED or EXECUTING are never forgotten."""
        with self._transaction():
            done = (CommandStatus.RECEIVED, CommandStatus.EXECUTING)
            removed = self._db.execute(
                "DELETE FROM commands WHERE received_at < ? AND status NOT IN (?, ?)", (older_than, *done)
            ).rowcount
            removed += self._db.execute(
                "DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE status NOT IN (?, ?)"
                " ORDER BY received_at DESC LIMIT -1 OFFSET ?)",
                (*done, keep_at_most),
            ).rowcount
        return int(removed)

    # ---- downloads: which verified chunks of which artifact are on disk ----------------------

    def download(self, target: str) -> Download | None:
        row = self._db.execute(
            "SELECT target, base, artifact, size, total FROM downloads WHERE target = ?", (target,)
        ).fetchone()
        return None if row is None else Download(str(row[0]), row[1], str(row[2]), int(row[3]), int(row[4]))

    def start_download(self, download: Download) -> None:
        """Record which artifact is being fetched for ``target``; a different one starts over."""
        with self._transaction():
            self._db.execute("DELETE FROM chunks WHERE target = ?", (download.target,))
            self._db.execute(
                "INSERT OR REPLACE INTO downloads (target, base, artifact, size, total) VALUES (?, ?, ?, ?, ?)",
                (download.target, download.base, download.artifact, download.size, download.total),
            )

    def chunk_stored(self, target: str, index: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO chunks (target, idx) VALUES (?, ?)", (target, index))

    def stored_chunks(self, target: str) -> set[int]:
        return {int(row[0]) for row in self._db.execute("SELECT idx FROM chunks WHERE target = ?", (target,))}

    def forget_download(self, target: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM chunks WHERE target = ?", (target,))
            self._db.execute("DELETE FROM downloads WHERE target = ?", (target,))

    def put_many(self, values: dict[str, bytes | None]) -> None:
        """Set (or delete, for None) several keys in one transaction."""
        with self._transaction():
            for key, value in values.items():
                if value is None:
                    self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
                else:
                    self.put(key, value)

    # ---- outbox ----------------------------------------------------------------------------

    def enqueue(self, topic: str, payload: bytes, *, qos: int, retain: bool, kind: OutboxKind) -> None:
        with self._transaction():
            if kind is OutboxKind.STATE:
                self._db.execute("DELETE FROM outbox WHERE kind = ? AND topic = ?", (kind, topic))
            self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, kind, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), kind, time.time()),
            )
            self._trim_telemetry()

    def _trim_telemetry(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        excess = int(count) - self.outbox_limit
        if excess <= 0:
            return
        dropped = self._db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE kind = ? ORDER BY seq LIMIT ?)",
            (OutboxKind.TELEMETRY, excess),
        ).rowcount
        if dropped:
            self.telemetry_dropped += dropped
            log.warning("outbox full: dropped %d oldest telemetry messages", dropped)

    def pending(self, limit: int, after_seq: int = 0) -> list[OutboxItem]:
        rows = self._db.execute(
            "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [OutboxItem(int(s), str(t), bytes(p), int(q), bool(r)) for s, t, p, q, r in rows]

    def delivered(self, seq: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def outbox_size(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _command(row: tuple[object, ...]) -> CommandRecord:
    command_id, action, status, payload, detail = row
    return CommandRecord(
        str(command_id),
        str(action),
        CommandStatus(str(status)),
        payload if isinstance(payload, bytes) else None,
        None if detail is None else str(detail),
    )
