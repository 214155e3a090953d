"""The workload's own user (``workload.user``) and who may read what under ``state_dir``.

The agent's state is for the agent alone: files 0600, ``downloads/`` 0700, and ``state_dir`` 0700
when the workload runs as root (the default). With ``workload.user`` the workload is started as
that user with its primary group and no supplementary groups (``subprocess``'s ``user``, ``group``,
``extra_groups=[]``); what it must read is handed to it: ``state_dir`` becomes 0711 (it may pass
through, not list), ``releases/`` and each release directory are 0755 (its ``.fleet/`` stays 0700),
and ``config.json`` (0600) is owned by it. ``agent.db``, ``downloads/`` and ``workload.log`` stay
root's: the workload writes its log through the descriptor the agent opened.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentSettings


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int
    home: str

    def popen_kwargs(self) -> dict[str, Any]:
        """What ``subprocess``/``asyncio.create_subprocess_exec`` take to start a process as this user."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home}


def run_as(settings: AgentSettings) -> RunAs | None:
    """The workload's user (None: the agent's own); the config checked that it exists."""
    name = settings.workload.user if settings.workload is not None else None
    if name is None:
        return None
    entry = pwd.getpwnam(name)
    return RunAs(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def owner(settings: AgentSettings) -> tuple[int, int] | None:
    """The (uid, gid) files for the workload get; None: leave them the agent's."""
    user = run_as(settings)
    return None if user is None else (user.uid, user.gid)


def prepare_state_dir(settings: AgentSettings) -> None:
    """Directory modes for who may read what (see the module docstring); idempotent, at every start."""
    root = settings.state_dir
    root.mkdir(parents=True, exist_ok=True)
    shared = run_as(settings) is not None
    _chmod(root, 0o711 if shared else 0o700)
    for name, mode in (("downloads", 0o700), ("releases", 0o755)):
        if (root / name).is_dir():
            _chmod(root / name, mode)
    releases = root / "releases"
    for release in releases.iterdir() if releases.is_dir() else ():
        if release.is_dir() and not release.is_symlink() and not release.name.startswith("."):
            _chmod(release, 0o755)  # unpacked by an older agent under the unit's umask 0077


def _chmod(path: Path, mode: int) -> None:
    if path.stat().st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def needs_rewrite(path: Path, mode: int, wanted_owner: tuple[int, int] | None) -> bool:
    """Whether ``path`` is missing or has another mode or owner than it should (an older agent's file)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return True
    if info.st_mode & 0o7777 != mode:
        return True
    if wanted_owner is None:
        return info.st_uid != os.geteuid()  # a former workload user's: the agent's again
    return (info.st_uid, info.st_gid) != wanted_owner
