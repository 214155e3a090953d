"""systemd notification (``Type=notify`` + ``WatchdogSec``) with the stdlib only.

The watchdog is fed from the event loop, so a wedged loop stops the pings and systemd restarts the
agent: the point of a watchdog is to catch exactly the hangs the agent cannot see itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    # A leading "@" names a Linux abstract socket.
    return "\0" + address[1:] if address.startswith("@") else address


def notify(message: str) -> bool:
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("systemd notification %r failed: %s", message, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, as systemd recommends; None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def feed_watchdog_forever(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
