"""Packet loss without ``tc netem``: a network namespace of our own whose loopback drops a fraction
of TCP segments with an nftables ``numgen random`` rule.

The test process itself moves into the namespace (``setns`` on the calling thread; threads and
processes started afterwards inherit it), so brokers, controller, agents, simulators, proxies and
the test's own HTTP and TLS clients all talk over the lossy loopback. It moves back afterwards.
Needs root, ``ip`` and ``nft``; ``available()`` says why not when they are missing.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_CLONE_NEWNET = 0x40000000
_COMMAND_TIMEOUT = 15
_RULES = """
table inet fleet_loss {{
    chain output {{
        type filter hook output priority 0; policy accept;
        meta l4proto tcp numgen random mod 1000 < {permille} counter drop
    }}
}}
"""


def available() -> str | None:
    """None when a lossy namespace can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    name = f"fleet-probe-{uuid.uuid4().hex[:8]}"
    try:
        _run("ip", "netns", "add", name)
    except AssertionError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run("ip", "netns", "exec", name, "nft", "-f", "-", stdin=_RULES.format(permille=0))
    except AssertionError as exc:
        return f"nftables does not work in a network namespace: {exc}"
    finally:
        _run("ip", "netns", "del", name)
    return None


@dataclass
class LossyNamespace:
    name: str
    permille: int

    def dropped_packets(self) -> int:
        listing = _run("ip", "netns", "exec", self.name, "nft", "list", "table", "inet", "fleet_loss")
        match = re.search(r"counter packets (\d+)", listing)
        assert match is not None, listing
        return int(match.group(1))


@contextmanager
def lossy_namespace(loss: float) -> Iterator[LossyNamespace]:
    """Run the body inside a fresh namespace whose loopback drops ``loss`` of TCP segments."""
    namespace = LossyNamespace(f"fleet-loss-{uuid.uuid4().hex[:8]}", round(loss * 1000))
    _run("ip", "netns", "add", namespace.name)
    try:
        _run("ip", "netns", "exec", namespace.name, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", namespace.name, "nft", "-f", "-", stdin=_RULES.format(permille=namespace.permille))
        with _entered(Path("/var/run/netns") / namespace.name):
            yield namespace
    finally:
        _run("ip", "netns", "del", namespace.name)


@contextmanager
def _entered(netns: Path) -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns, os.O_RDONLY)
        try:
            _setns(libc, target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(libc, original)
    finally:
        os.close(original)


def _setns(libc: ctypes.CDLL, fd: int) -> None:
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _run(*command: str, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    return result.stdout
