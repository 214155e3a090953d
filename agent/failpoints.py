"""Crash points for tests: ``FLEET_FAILPOINTS=command.received`` makes the agent kill -9 itself there.

Crash safety is proven by crashing at exact lines, which a test cannot time from outside. Unset
(always, in production) a failpoint costs one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_ACTIVE = frozenset(name for name in os.environ.get("FLEET_FAILPOINTS", "").split(",") if name)


def hit(name: str) -> None:
    if name in _ACTIVE:
        log.critical("failpoint %s: killing the agent with SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)
