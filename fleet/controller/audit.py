"""The audit trail and idempotency keys of the HTTP API, both in the controller's SQLite file.

**Audit trail.** Every request that asks for a change (POST, PUT, PATCH, DELETE) is recorded with
who asked (certificate CN or token name, how, with which role), what (the operation id and its
target), when, the request id and the outcome: ``ok``, ``failed`` (the controller refused it, e.g.
404 or 409) or ``denied`` (authenticated, but the role does not allow it). Requests without valid
credentials are not recorded (anyone could fill the table); they are counted in the metrics.
Entries are committed before the response is sent, survive restarts and are never changed.

**Idempotency keys.** A client may send ``Idempotency-Key`` with a POST that creates something
(a command, a rollout). The first request with a key stores its answer; a retry with the same key,
by the same caller, on the same route with the same body gets that answer again (and nothing
happens twice); the same key with another body is a 422; a retry while the first is still running
is a 409. Keys are kept for ``IDEMPOTENCY_TTL``.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.controller.facade import AuditEntry, BadRequest, Conflict, RolloutAction
from fleet.controller.storage import Database

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL = 24 * 3600.0
MAX_PAGE = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    via TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    request_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_target ON audit (target, seq);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    actor TEXT NOT NULL,
    key TEXT NOT NULL,
    route TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER,
    body TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (actor, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created);
"""

OK, FAILED, DENIED = "ok", "failed", "denied"
REPLAY = "idempotent replay"  # the detail of an answer sent again for a repeated Idempotency-Key
ROLLOUT_ACTIONS = ("start_rollout", "pause_rollout", "resume_rollout", "abort_rollout")


@dataclass(frozen=True)
class AuditRecord:
    actor: str
    via: str
    role: str
    action: str
    target: str | None
    request_id: str
    outcome: str
    status: int
    detail: str | None = None


def encode_cursor(value: Any) -> str:
    """An opaque page cursor for ``value`` (the last key of the page)."""
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: type) -> Any:
    """The key in ``cursor``; ``BadRequest`` for anything not made by ``encode_cursor`` for this list."""
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError) as exc:
        raise BadRequest(f"cursor {cursor[:40]!r}: not a cursor from this list") from exc
    if kind is list and isinstance(value, list) and value:
        return value
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise BadRequest(f"cursor {cursor[:40]!r}: not a cursor from this list")


class AuditLog:
    """Appends and reads the audit trail. Thread-safe (the database serialises writes)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        db.migrate(SCHEMA)

    def record(self, entry: AuditRecord) -> None:
        self.db.execute(
            "INSERT INTO audit (ts, actor, via, role, action, target, request_id, outcome, status, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.clock(),
                entry.actor,
                entry.via,
                entry.role,
                entry.action,
                entry.target,
                entry.request_id,
                entry.outcome,
                entry.status,
                entry.detail,
            ),
        )
        log.info(
            "audit: %s (%s %s) %s %s: %s %d [%s]",
            entry.actor,
            entry.via,
            entry.role,
            entry.action,
            entry.target or "-",
            entry.outcome,
            entry.status,
            entry.request_id,
        )

    def page(
        self,
        *,
        since: float | None = None,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[AuditEntry], str | None]:
        """Entries oldest first, filtered; returns the page and the cursor of the next one."""
        after = decode_cursor(cursor, int)
        clauses, params = ["seq > ?"], [after or 0]
        for column, value in (("actor", actor), ("action", action), ("target", target), ("outcome", outcome)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("ts >= ?")
            params.append(since)
        where = " AND ".join(clauses)  # built from the constant column names above, never from input
        rows = self.db.query(
            "SELECT seq, ts, actor, via, role, action, target, request_id, outcome, status, detail FROM audit"  # noqa: S608
            " WHERE " + where + " ORDER BY seq LIMIT ?",
            (*params, limit + 1),
        )
        entries = [_entry(row) for row in rows[:limit]]
        more = len(rows) > limit
        return entries, encode_cursor(entries[-1].seq) if more and entries else None

    def rollout_actions(self, rollout_ids: list[str]) -> dict[str, list[RolloutAction]]:
        """Who started, paused, resumed or aborted each rollout (successful requests), oldest first."""
        found: dict[str, list[RolloutAction]] = {rollout_id: [] for rollout_id in rollout_ids}
        if not rollout_ids:
            return found
        rows = self.db.query(
            "SELECT target, action, actor, via, ts, request_id FROM audit"
            " WHERE target IN (SELECT value FROM json_each(?)) AND outcome = ? AND detail IS NOT ? ORDER BY seq",
            (json.dumps(rollout_ids), OK, REPLAY),
        )
        for target, action, actor, via, ts, request_id in rows:
            if action in ROLLOUT_ACTIONS:
                found[target].append(RolloutAction(action=action, actor=actor, via=via, ts=ts, request_id=request_id))
        return found


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, ts, actor, via, role, action, target, request_id, outcome, status, detail = row
    return AuditEntry(
        seq=seq,
        ts=ts,
        actor=actor,
        via=via,
        role=role,
        action=action,
        target=target,
        request_id=request_id,
        outcome=outcome,
        status=status,
        detail=detail,
    )


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    body: str


class IdempotencyStore:
    """Answers stored per (caller, key). ``claim`` before doing the work, ``finish`` or ``release`` after."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time, ttl: float = IDEMPOTENCY_TTL) -> None:
        self.db = db
        self.clock = clock
        self.ttl = ttl
        self._lock = threading.Lock()
        self._pruned_at = float("-inf")
        db.migrate(SCHEMA)

    def claim(self, actor: str, key: str, route: str, fingerprint: str) -> StoredAnswer | None:
        """None: go ahead (the key is now taken); a StoredAnswer: send it again. ``Conflict`` while
        the first request is still running, ``BadRequest`` (422 at the API) for a key reused with
        another route or body."""
        now = self.clock()
        self._prune(now)
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT route, fingerprint, status, body, created FROM idempotency_keys WHERE actor = ? AND key = ?",
                (actor, key),
            ).fetchone()
            if row is not None and row[4] <= now - self.ttl:
                conn.execute("DELETE FROM idempotency_keys WHERE actor = ? AND key = ?", (actor, key))
                row = None
            if row is None:
                conn.execute(
                    "INSERT INTO idempotency_keys (actor, key, route, fingerprint, created) VALUES (?, ?, ?, ?, ?)",
                    (actor, key, route, fingerprint, now),
                )
                return None
        stored_route, stored_fingerprint, status, body, _created = row
        if stored_route != route or stored_fingerprint != fingerprint:
            raise KeyReused(
                f"Idempotency-Key {key!r} was used for another request ({stored_route}); use a new key per request"
            )
        if status is None:
            raise Conflict(f"a request with Idempotency-Key {key!r} is still being processed; retry later")
        return StoredAnswer(int(status), str(body))

    def finish(self, actor: str, key: str, status: int, body: str) -> None:
        self.db.execute(
            "UPDATE idempotency_keys SET status = ?, body = ? WHERE actor = ? AND key = ?", (status, body, actor, key)
        )

    def release(self, actor: str, key: str) -> None:
        """Forget a claim whose request failed unexpectedly, so a retry runs it."""
        self.db.execute("DELETE FROM idempotency_keys WHERE actor = ? AND key = ? AND status IS NULL", (actor, key))

    def _prune(self, now: float) -> None:
        with self._lock:
            if now - self._pruned_at < 60:
                return
            self._pruned_at = now
        self.db.execute("DELETE FROM idempotency_keys WHERE created <= ?", (now - self.ttl,))


class KeyReused(BadRequest):
    """An idempotency key sent again with a different request (HTTP 422)."""
