"""Commands with delivery tracking: persisted, published, resent until acknowledged or expired.

The broker's QoS-1 queue is not enough (amqtt drops in-flight messages on disconnect, a node that
never had a session gets nothing), so the controller resends every command that has no ack at all,
with capped exponential backoff per command, until it expires. The agent dedupes by command id and
answers a repeat with ``duplicate``, so a resend never executes twice. Each command is committed
to SQLite before its first publish: a crash between the two leaves a pending command that the next
``resend_due`` publishes, never a command that went out without a record.

An ack is the device's word: its detail is cut and its timestamp kept within the controller's
clock window (fleet/controller/bounds.py), and a command keeps at most ``MAX_ACKS`` acks, so a
device cannot grow the database through acks to its own commands. Rejects are counted in
``rejects`` and logged.

Every command is bound to its node and signed with the control key (``control.key`` of the PKI;
fleet.protocol.signing): ``node``, ``kind`` ``cmd``, ``issued_at`` and ``expires_at`` are signed
fields, so agents refuse it on another node and judge its expiry on the controller's clock. The
signed bytes are stored, so a resend is byte-identical.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fleet.controller.bounds import Rejects, screen
from fleet.controller.facade import AckRecord, BadRequest, CommandView, Conflict, NotFound
from fleet.controller.storage import Database
from fleet.protocol.codec import MAX_PAYLOAD, decode_for_channel, encode
from fleet.protocol.errors import FleetError, InvalidMessage
from fleet.protocol.messages import Ack, AckStatus, Command
from fleet.protocol.signing import bind, sign_control
from fleet.protocol.topics import Channel, all_nodes_filter, node_topic

log = logging.getLogger(__name__)

ACK_FILTER = all_nodes_filter(Channel.ACK)
"""Subscribe this and route it to ``CommandTracker.on_ack``."""

MAX_ACKS = 16
"""Acks kept per command: an agent sends two or three (accepted, then done or failed)."""

PENDING = "pending"  # published, no ack at all yet: the only status that is resent
EXPIRED = "expired"
CANCELLED = "cancelled"  # an operator stopped the resends before any ack (an ack arriving later still shows)

# Which status a command shows when several acks arrived: the highest rank wins, so an
# ``accepted`` delivered after ``done`` (acks can overtake each other in the agent's outbox)
# never hides the result, and ``duplicate`` only shows when nothing better is known. A real ack
# outranks ``expired``: a command the agent executed just before its expiry did run.
_RANK: dict[str, int] = {
    PENDING: 0,
    AckStatus.DUPLICATE.value: 1,
    AckStatus.EXPIRED.value: 1,
    AckStatus.ACCEPTED.value: 2,
    AckStatus.DONE.value: 3,
    AckStatus.FAILED.value: 3,
    AckStatus.REJECTED.value: 3,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    action TEXT NOT NULL,
    args TEXT NOT NULL,
    payload BLOB NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    expires_at REAL,
    attempts INTEGER NOT NULL,
    next_send REAL,
    rollout_id TEXT
);
CREATE INDEX IF NOT EXISTS commands_node ON commands (node, created);
CREATE INDEX IF NOT EXISTS commands_rollout ON commands (rollout_id) WHERE rollout_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_status ON commands (status, next_send);
CREATE TABLE IF NOT EXISTS command_acks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL REFERENCES commands (id),
    status TEXT NOT NULL,
    detail TEXT,
    ts REAL NOT NULL,
    agent_ts REAL
);
CREATE INDEX IF NOT EXISTS command_acks_command ON command_acks (command_id, seq);
"""

Publish = Callable[[str, bytes, int], object]
"""``(topic, payload, qos)``; ``FleetMqtt.publish`` fits."""


class CommandTracker:
    """Sends commands and follows each one to its final ack. Thread-safe."""

    def __init__(
        self,
        db: Database,
        publish: Publish,
        *,
        clock: Callable[[], float] = time.time,
        resend_after: float = 15.0,
        max_resend_after: float = 300.0,
        jitter: float = 0.1,
        signing_key: Ed25519PrivateKey | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``signing_key``: the control key (None only in tests: commands go out bound but unsigned)."""
        if not 0 < resend_after <= max_resend_after:
            raise ValueError("need 0 < resend_after <= max_resend_after")
        self.db = db
        self.publish = publish
        self.clock = clock
        self.resend_after = resend_after
        self.max_resend_after = max_resend_after
        # Jitter spreads the resends of commands sent together (a rollback to a whole wave).
        self.jitter = jitter
        self.signing_key = signing_key
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejects = Rejects()  # device values out of bounds, by field (see fleet/controller/bounds.py)
        self._rng = rng or random.Random()  # noqa: S311 -- spreading load, not secrecy
        self._lock = threading.Lock()  # guards counters and the rng; the DB has its own lock
        db.migrate(SCHEMA)

    # ---- sending ---------------------------------------------------------------------------

    def send(
        self,
        node: str,
        action: str,
        args: dict[str, Any] | None = None,
        expires_in: float = 3600.0,
        rollout_id: str | None = None,
    ) -> CommandView:
        """Persist, then publish a command (QoS 1); ``BadRequest`` for an invalid node, action or args."""
        if not expires_in > 0:
            raise BadRequest(f"expires_in must be positive, not {expires_in}")
        now = self.clock()
        command, topic, payload = self._build(node, action, args or {}, now, now + expires_in)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO commands (id, node, action, args, payload, status, created, expires_at, attempts,"
                " next_send, rollout_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                (
                    command.id,
                    node,
                    action,
                    json.dumps(command.args, sort_keys=True),
                    payload,
                    PENDING,
                    now,
                    command.expires_at,
                    now + self._delay(1),
                    rollout_id,
                ),
            )
        self._count("sent")
        log.info("command %s (%s) to %s", command.id, action, node)
        self._publish(topic, payload, command.id)
        return self.get(command.id)

    def _build(
        self, node: str, action: str, args: dict[str, Any], now: float, expires_at: float
    ) -> tuple[Command, str, bytes]:
        """The validated command, bound to ``node`` and signed, its topic and its wire bytes (stored,
        so a resend is byte-identical)."""
        try:
            topic = node_topic(node, Channel.CMD)
            command = Command(id=uuid.uuid4().hex, action=action, args=args, expires_at=expires_at)
            if self.signing_key is not None:
                command = sign_control(command, node, self.signing_key, issued_at=now)
            else:
                command = bind(command, node, now)
            payload = encode(command, max_size=MAX_PAYLOAD)
            json.dumps(command.args)  # stored and served as JSON: refuse what JSON cannot hold
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"])
            raise BadRequest(f"invalid command: {field}: {error['msg']}") from exc
        except InvalidMessage as exc:
            raise BadRequest(f"invalid command: {exc.reason}") from exc
        except (TypeError, ValueError) as exc:  # after ValidationError, which is a ValueError
            raise BadRequest(f"invalid command: args must be JSON values: {exc}") from exc
        return command, topic, payload

    def _publish(self, topic: str, payload: bytes, command_id: str) -> bool:
        """Publish once; a transport failure is left to ``resend_due`` (the command is on record)."""
        try:
            self.publish(topic, payload, 1)
        except FleetError as exc:
            self._count("publish_errors")
            log.warning("command %s: publish failed, will resend: %s", command_id, exc)
            return False
        return True

    def _delay(self, attempts: int) -> float:
        """Seconds until the next resend after ``attempts`` publishes: doubling, capped, jittered."""
        base = min(self.resend_after * 2 ** min(attempts - 1, 32), self.max_resend_after)
        with self._lock:
            spread = self._rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return float(base * (1.0 + spread))

    def cancel(self, command_id: str) -> CommandView:
        """Stop resending a command that has no ack yet; ``Conflict`` once it has one, or expired.

        Nothing is sent to the node (the protocol has no cancel): a copy the broker queued for an
        offline node may still arrive, and the agent refuses it after ``expires_at``."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                raise NotFound(f"unknown command {command_id!r}")
            if row[0] != PENDING:
                raise Conflict(f"command {command_id} is {row[0]}: only a pending command can be cancelled")
            conn.execute("UPDATE commands SET status = ?, next_send = NULL WHERE id = ?", (CANCELLED, command_id))
        self._count("cancelled")
        log.info("command %s cancelled", command_id)
        return self.get(command_id)

    # ---- acks (paho's thread) --------------------------------------------------------------

    def on_ack(self, topic: str, payload: bytes) -> None:
        """Record an ack from ``fleet/v1/nodes/+/ack``; bad input is logged and counted, never raised."""
        try:
            node, channel, message = decode_for_channel(topic, payload)
        except InvalidMessage as exc:
            self._count("invalid_acks")
            log.warning("ignored ack: %s", exc)
            return
        if channel is not Channel.ACK or not isinstance(message, Ack):
            self._count("invalid_acks")
            log.warning("ignored message on %s: not an ack topic", topic)
            return
        self._record_ack(node, screen(node, Channel.ACK.value, message, self.clock(), self.rejects))

    def _record_ack(self, node: str, ack: Ack) -> None:
        now = self.clock()
        problem, redelivered, full = None, False, False
        with self.db.transaction() as conn:
            row = conn.execute("SELECT node, status FROM commands WHERE id = ?", (ack.id,)).fetchone()
            if row is None or row[0] != node:
                # Another node's command id on this node's topic is as unknown as a made-up one.
                problem = "unknown command" if row is None else f"command belongs to {row[0]}"
            elif _already_recorded(conn, ack):
                redelivered = True
            elif _ack_count(conn, ack.id) >= MAX_ACKS:
                full = True
            else:
                conn.execute(
                    "INSERT INTO command_acks (command_id, status, detail, ts, agent_ts) VALUES (?, ?, ?, ?, ?)",
                    (ack.id, ack.status.value, ack.detail, now, ack.ts),
                )
                if _RANK[ack.status.value] > _RANK.get(row[1], 0):
                    conn.execute("UPDATE commands SET status = ? WHERE id = ?", (ack.status.value, ack.id))
        if problem is not None:
            self._count("unknown_acks")
            log.warning("ack %s from %s for command %s ignored: %s", ack.status.value, node, ack.id, problem)
            return
        if full:
            self.rejects.reject(node, "ack.count", f"command {ack.id} has {MAX_ACKS} acks already", action="ignored")
            return
        if redelivered:
            # QoS 1 is at-least-once: a PUBACK lost with the link makes the device send the same
            # ack again. The trail records what the device said, not how often it arrived.
            self._count("redelivered_acks")
            log.debug("command %s on %s: %s again (redelivered ack ignored)", ack.id, node, ack.status.value)
            return
        self._count("acks")
        log.info("command %s on %s: %s%s", ack.id, node, ack.status.value, f" ({ack.detail})" if ack.detail else "")

    # ---- resending (tick thread) -----------------------------------------------------------

    def resend_due(self) -> int:
        """Expire overdue pending commands, publish the rest whose backoff has elapsed; returns how many were resent."""
        now = self.clock()
        self._expire(now)
        due = self.db.query(
            "SELECT id, node, payload, attempts FROM commands WHERE status = ? AND next_send <= ?",
            (PENDING, now),
        )
        resent = 0
        for command_id, node, payload, attempts in due:
            # Claim the resend in the DB first; an ack that arrived meanwhile makes this a no-op.
            claimed = self.db.execute(
                "UPDATE commands SET attempts = ?, next_send = ? WHERE id = ? AND status = ? AND attempts = ?",
                (attempts + 1, now + self._delay(attempts + 1), command_id, PENDING, attempts),
            )
            if claimed.rowcount != 1:
                continue
            log.info("command %s to %s unacknowledged: resending (attempt %d)", command_id, node, attempts + 1)
            if self._publish(node_topic(node, Channel.CMD), payload, command_id):
                resent += 1
        self._count_n("resent", resent)
        return resent

    def _expire(self, now: float) -> None:
        with self.db.transaction() as conn:
            expired = conn.execute(
                "UPDATE commands SET status = ? WHERE status = ? AND expires_at IS NOT NULL AND expires_at <= ?",
                (EXPIRED, PENDING, now),
            ).rowcount
        if expired:
            self._count_n("expired", expired)
            log.warning("%d command(s) expired without any ack", expired)

    # ---- reads -----------------------------------------------------------------------------

    def get(self, command_id: str) -> CommandView:
        rows = self.db.query(
            "SELECT id, node, action, args, status, created, expires_at, attempts FROM commands WHERE id = ?",
            (command_id,),
        )
        if not rows:
            raise NotFound(f"unknown command {command_id!r}")
        return self._views(rows)[0]

    def for_node(self, node: str, limit: int = 20) -> list[CommandView]:
        """The node's most recent commands, newest first."""
        rows = self.db.query(
            "SELECT id, node, action, args, status, created, expires_at, attempts FROM commands"
            " WHERE node = ? ORDER BY created DESC, rowid DESC LIMIT ?",
            (node, limit),
        )
        return self._views(rows)

    def for_rollout(self, rollout_id: str) -> list[CommandView]:
        rows = self.db.query(
            "SELECT id, node, action, args, status, created, expires_at, attempts FROM commands"
            " WHERE rollout_id = ? ORDER BY created, rowid",
            (rollout_id,),
        )
        return self._views(rows)

    def pending_count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM commands WHERE status = ?", (PENDING,))[0][0])

    def _views(self, rows: list[tuple[Any, ...]]) -> list[CommandView]:
        ids = [row[0] for row in rows]
        acks: dict[str, list[AckRecord]] = {command_id: [] for command_id in ids}
        if ids:
            # json_each binds the id list as one parameter: no SQL assembled from strings.
            for command_id, status, detail, ts in self.db.query(
                "SELECT command_id, status, detail, ts FROM command_acks"
                " WHERE command_id IN (SELECT value FROM json_each(?)) ORDER BY seq",
                (json.dumps(ids),),
            ):
                acks[command_id].append(AckRecord(status=status, detail=detail, ts=ts))
        return [
            CommandView(
                id=command_id,
                node=node,
                action=action,
                args=json.loads(args),
                status=status,
                created=created,
                expires_at=expires_at,
                attempts=attempts,
                acks=acks[command_id],
            )
            for command_id, node, action, args, status, created, expires_at, attempts in rows
        ]

    def _count(self, name: str) -> None:
        self._count_n(name, 1)

    def _count_n(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.counters[name] += n


def _ack_count(conn: sqlite3.Connection, command_id: str) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM command_acks WHERE command_id = ?", (command_id,)).fetchone()[0])


def _already_recorded(conn: sqlite3.Connection, ack: Ack) -> bool:
    """Whether this very ack (same status and device timestamp) is in the trail already."""
    row = conn.execute(
        "SELECT 1 FROM command_acks WHERE command_id = ? AND status = ? AND agent_ts = ? LIMIT 1",
        (ack.id, ack.status.value, ack.ts),
    ).fetchone()
    return row is not None
