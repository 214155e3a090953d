"""Leadership among controllers that share one database (shared ingest): a lease row, renewed every tick.

Every controller of the group ingests its share of the telemetry, records acks, serves artifacts and
answers the API. Only the lease holder drives rollouts, resends commands and republishes desired
state, so nothing is decided twice. A holder that stops renewing (``kill -9``, a stall, a lost
disk) loses the lease ``ttl`` seconds after its last renewal and another controller takes over;
one that stops cleanly gives it up at once. Rollout steps are committed before their effects and
publishing is idempotent, so a takeover resumes where the old leader was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fleet.controller.storage import Database

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS controller_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
"""

_TAKE_OR_RENEW = (
    "INSERT INTO controller_lease (id, holder, expires) VALUES (1, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires = excluded.expires"
    " WHERE controller_lease.holder = excluded.holder OR controller_lease.expires < ?"
)


class Lease:
    def __init__(self, db: Database, holder: str, *, ttl: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.db = db
        self.holder = holder
        self.ttl = ttl
        self.clock = clock
        self.held = False
        db.migrate(SCHEMA)

    def renew(self) -> bool:
        """Take the lease if it is free or expired, extend it if ours; True while we hold it."""
        now = self.clock()
        with self.db.transaction() as tx:
            tx.execute(_TAKE_OR_RENEW, (self.holder, now + self.ttl, now))
            row = tx.execute("SELECT holder FROM controller_lease WHERE id = 1").fetchone()
        held = row is not None and row[0] == self.holder
        if held != self.held:
            log.warning("%s %s the controller lease", self.holder, "took" if held else "lost")
        self.held = held
        return held

    def current_holder(self) -> str | None:
        rows = self.db.query("SELECT holder FROM controller_lease WHERE id = 1 AND expires >= ?", (self.clock(),))
        return str(rows[0][0]) if rows else None

    def release(self) -> None:
        """Give the lease up (clean stop), so another controller takes over without waiting for ``ttl``."""
        self.db.execute("DELETE FROM controller_lease WHERE id = 1 AND holder = ?", (self.holder,))
        self.held = False
