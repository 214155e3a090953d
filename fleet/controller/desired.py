"""Desired state per node: one full document with a monotonic generation, persisted, then published retained.

The agent converges to the newest generation it has seen and ignores lower ones (replay
protection), so the generation must only grow: the next one is one past the highest we published
or the agent reported (after a lost controller database the agent's reported generation is the
only memory left). The document is committed before it is published, and publishing happens under
this publisher's lock so two documents for one node can never reach the broker out of order (a
lower generation would otherwise end up as the retained message).

Every document is bound to its node and channel and signed with the control key (``control.key``
of the PKI; fleet.protocol.signing), which agents require. ``republish`` (every controller start)
re-signs a stored document that does not verify with the current key for its node (stored unsigned
by a controller before signatures, or signed with a replaced key), keeping its generation: agents
that applied it see a replay, the others get it signed.

A reported generation is the device's word, so it is bounded before anything builds on it (see
fleet/controller/bounds.py): at most ``MAX_GENERATION``, and at most ``GENERATION_AHEAD`` past the
generation we last published to that node. A device reporting 2^63-1 would otherwise make every
later document for it invalid (one past the largest integer the wire format holds) and every
operation that publishes to it fail. A refused generation is counted, logged, and changes nothing.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.controller.bounds import GENERATION_AHEAD, MAX_GENERATION, Rejects
from fleet.controller.facade import NotFound
from fleet.controller.storage import Database
from fleet.protocol.codec import decode_raw, encode, validate
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import DesiredState, ProbeSpec, ReleaseRef
from fleet.protocol.signing import DESIRED_KIND, bind, sign_control, verify_control
from fleet.protocol.topics import Channel, node_topic

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS desired_state (
    node TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    document BLOB NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS desired_observed (
    node TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
);
"""

Publish = Callable[[str, bytes, int, bool], object]
"""``(topic, payload, qos, retain)``; ``FleetMqtt.publish`` fits."""

_KEEP: Any = object()
"""Marks a part of the document the caller did not mention: it is copied from the previous one."""


class DesiredPublisher:
    """Builds, stores and publishes each node's desired-state document. Thread-safe."""

    def __init__(
        self,
        db: Database,
        publish: Publish,
        *,
        clock: Callable[[], float] = time.time,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        """``signing_key``: the control key (None only in tests: documents go out bound but unsigned)."""
        self.db = db
        self.publish = publish
        self.clock = clock
        self.signing_key = signing_key
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejects = Rejects()
        # Held across persist + publish (see the module docstring); never taken while holding db.lock.
        self._lock = threading.Lock()
        db.migrate(SCHEMA)
        self._forget_impossible_generations()
        self._observed: dict[str, int] = dict(db.query("SELECT node, generation FROM desired_observed"))

    def _forget_impossible_generations(self) -> None:
        """Drop generations above ``MAX_GENERATION`` that a controller before the bounds stored."""
        for node, generation in self.db.query(
            "SELECT node, generation FROM desired_observed WHERE generation > ?", (MAX_GENERATION,)
        ):
            why = f"{generation} (stored) is above {MAX_GENERATION}"
            self.rejects.reject(node, "desired.observed_generation", why, action="forgotten")
        self.db.execute("DELETE FROM desired_observed WHERE generation > ?", (MAX_GENERATION,))

    # ---- writing ---------------------------------------------------------------------------

    def publish_release(
        self,
        node: str,
        release: ReleaseRef | None,
        config: dict[str, Any] | None = None,
        health: ProbeSpec | None = None,
    ) -> int:
        """Set the node's release (``None``: no release); config and health stay as before unless given.

        Returns the new generation.
        """
        return self._publish_new(
            node,
            release=release,
            config=_KEEP if config is None else config,
            health=_KEEP if health is None else health,
        )

    def publish_config(self, node: str, config: dict[str, Any]) -> int:
        """Replace the node's config, keeping its release and health probe; returns the new generation."""
        return self._publish_new(node, release=_KEEP, config=config, health=_KEEP)

    def observe_reported(self, node: str, generation: int) -> bool:
        """Note a generation the agent reported, so the next one we publish is higher still.

        Cheap when nothing is new (called for every reported message): only a higher generation
        than any seen for the node is checked and written. False (counted and logged) when the
        generation is out of bounds: above ``MAX_GENERATION``, or more than ``GENERATION_AHEAD``
        past what we last published to the node.
        """
        with self._lock:
            if generation <= self._observed.get(node, 0):
                return True
            published = self.generation(node)
            limit = MAX_GENERATION if published is None else min(MAX_GENERATION, published + GENERATION_AHEAD)
            if generation > limit:
                mine = "none published" if published is None else f"{published} published"
                why = f"{generation} is above {limit} ({mine})"
                self.rejects.reject(node, "desired.observed_generation", why, action="ignored")
                return False
            self._observed[node] = generation
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO desired_observed (node, generation) VALUES (?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET generation = excluded.generation "
                    "WHERE excluded.generation > desired_observed.generation",
                    (node, generation),
                )
            return True

    def republish(self, node: str) -> int:
        """Publish the stored document again (after a controller restart), re-signed first if it does
        not verify with the current key for this node; returns its generation."""
        with self._lock:
            rows = self.db.query("SELECT generation, document FROM desired_state WHERE node = ?", (node,))
            if not rows:
                raise NotFound(f"no desired state for node {node!r}")
            generation, document = rows[0]
            payload = self._signed_again(node, int(generation), bytes(document))
            self._send(node, payload, int(generation))
            return int(generation)

    def _signed_again(self, node: str, generation: int, stored: bytes) -> bytes:
        """``stored``, or (when it does not verify for ``node`` with the current key) the same
        document bound and signed again, written back to the database."""
        key = self.signing_key
        if key is None:
            return stored
        where = f"desired_state[{node}]"
        raw = decode_raw(where, stored)
        try:
            verify_control(raw, key.public_key(), node=node, kind=DESIRED_KIND)
        except InvalidMessage as exc:
            reason = exc.reason
        else:
            return stored
        document = validate(where, raw, DesiredState)
        issued_at = document.issued_at if document.issued_at is not None else self.clock()
        payload = encode(sign_control(document, node, key, issued_at=issued_at))
        self.db.execute(
            "UPDATE desired_state SET document = ? WHERE node = ? AND generation = ?", (payload, node, generation)
        )
        self.counters["resigned"] += 1
        log.info("desired state of %s (generation %d) signed again: %s", node, generation, reason)
        return payload

    def republish_all(self) -> int:
        """Publish every stored document again; returns how many. One node's failure is logged and
        counted (``republish_errors``) and does not hold back the others."""
        nodes = [row[0] for row in self.db.query("SELECT node FROM desired_state ORDER BY node")]
        done = 0
        for node in nodes:
            try:
                self.republish(node)
            except Exception:
                self.counters["republish_errors"] += 1
                log.exception("republishing the desired state of %s failed", node)
                continue
            done += 1
        return done

    def _publish_new(self, node: str, *, release: Any, config: Any, health: Any) -> int:
        topic = node_topic(node, Channel.DESIRED)  # refuses an invalid node id before anything is stored
        with self._lock:
            with self.db.transaction() as conn:
                previous = self._stored(conn.execute, node)
                generation = self._next_generation(conn.execute, node)
                now = self.clock()
                document = _merge(previous, generation, release, config, health, now)
                if self.signing_key is not None:
                    document = sign_control(document, node, self.signing_key, issued_at=now)
                else:
                    document = bind(document, node, now)
                payload = encode(document)
                conn.execute(
                    "INSERT OR REPLACE INTO desired_state (node, generation, document, updated) VALUES (?, ?, ?, ?)",
                    (node, generation, payload, self.clock()),
                )
            log.info("desired state of %s: generation %d", node, generation)
            self._send_to(topic, payload, node, generation)
            return generation

    def _next_generation(self, execute: Callable[..., Any], node: str) -> int:
        published = execute("SELECT generation FROM desired_state WHERE node = ?", (node,)).fetchone()
        observed = execute(
            "SELECT generation FROM desired_observed WHERE node = ? AND generation <= ?", (node, MAX_GENERATION)
        ).fetchone()
        return max(published[0] if published else 0, observed[0] if observed else 0) + 1

    def _send(self, node: str, payload: bytes, generation: int) -> None:
        self._send_to(node_topic(node, Channel.DESIRED), payload, node, generation)

    def _send_to(self, topic: str, payload: bytes, node: str, generation: int) -> None:
        # A transport error propagates: unlike a command nothing resends it by itself, so the
        # caller must know (the document is stored; ``republish`` sends it once the link is back).
        self.publish(topic, payload, 1, True)
        self.counters["published"] += 1
        log.debug("published desired generation %d to %s", generation, node)

    # ---- reading ---------------------------------------------------------------------------

    def current(self, node: str) -> DesiredState | None:
        """The last document stored for the node (published, or about to be), or None."""
        with self.db.lock:
            return self._stored(self.db.execute, node)

    def generation(self, node: str) -> int | None:
        rows = self.db.query("SELECT generation FROM desired_state WHERE node = ?", (node,))
        return int(rows[0][0]) if rows else None

    def _stored(self, execute: Callable[..., Any], node: str) -> DesiredState | None:
        row = execute("SELECT document FROM desired_state WHERE node = ?", (node,)).fetchone()
        if row is None:
            return None
        where = f"desired_state[{node}]"
        try:
            return validate(where, decode_raw(where, bytes(row[0])), DesiredState)
        except InvalidMessage as exc:
            # Only a hand-edited or corrupted row gets here; the next publish replaces it.
            log.error("stored desired state of %s unreadable: %s", node, exc)
            return None


def _merge(
    previous: DesiredState | None, generation: int, release: Any, config: Any, health: Any, now: float
) -> DesiredState:
    """The new document: what the caller gave, and for each ``_KEEP`` part the previous document's."""
    if release is _KEEP:
        release = previous.release if previous is not None else None
    if config is _KEEP:
        config = previous.config if previous is not None else {}
    if health is _KEEP:
        health = previous.health if previous is not None else None
    return DesiredState(generation=generation, release=release, config=config, health=health, issued_at=now)
