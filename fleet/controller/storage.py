"""The controller's SQLite database: one file, WAL, one connection shared under a lock.

Each module that persists something owns its tables and registers their schema here with
``Database.migrate`` (the API's tokens, audit trail and idempotency keys too: fleet.controller.auth,
fleet.controller.audit). Rollout transitions use ``transaction()`` (committed and fsynced before
anything is published); telemetry is written in batches so heartbeat ingest is not bound by fsync.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.protocol.errors import ConfigError


class Database:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            if self.path != Path(":memory:"):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed rollout transition survives power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Controllers sharing one file (a shared-ingest pair) wait for each other's writes.
            self._db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the database: {exc}") from exc
        self.lock = threading.RLock()

    def migrate(self, schema: str) -> None:
        """Create a module's tables (idempotent: CREATE ... IF NOT EXISTS)."""
        with self.lock:
            self._db.executescript(schema)

    def add_column(self, table: str, column: str, declaration: str) -> bool:
        """Add ``column`` to a table created by an older version (idempotent); True if it was added.

        ``table``, ``column`` and ``declaration`` come from the calling module's constants, never
        from input (SQLite cannot bind names). A new column goes into the module's CREATE TABLE as
        well, so a new database has it from the start and this only upgrades old files.
        """
        with self.lock:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column in columns:
                return False
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            return True

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; ROLLBACK on any exception."""
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement in its own implicit transaction (autocommit)."""
        with self.lock:
            return self._db.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self._db.execute(sql, params).fetchall())

    def ping(self, timeout: float = 1.0) -> str | None:
        """None if the database answers a trivial query within ``timeout`` seconds, else the problem
        (for ``/healthz``: never waits long behind a writer holding the lock)."""
        if not self.lock.acquire(timeout=timeout):
            return f"busy for more than {timeout:g}s"
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            return f"error: {exc}"
        finally:
            self.lock.release()
        return None

    def close(self) -> None:
        with self.lock:
            self._db.close()
