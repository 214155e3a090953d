"""The agent's own configuration file, applied without a restart where it can be.

It is re-read when its mtime changes (polled) or on SIGHUP, and by the ``reload`` command. A file
that does not load is reported and the running configuration kept; ``node_id`` and ``state_dir``
change only with a restart, and a change of broker, TLS or keepalive reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentSettings, load_settings
from fleet.protocol.errors import ConfigError

log = logging.getLogger(__name__)


class LocalConfig:
    def __init__(
        self,
        path: Path | None,
        settings: AgentSettings,
        *,
        apply: Callable[[AgentSettings], None],
        reconnect: Callable[[], None],
    ) -> None:
        self.path = path
        self.settings = settings
        self._apply = apply
        self._reconnect = reconnect
        self._reload_requested = asyncio.Event()
        self._mtime = self._file_mtime()

    def request_reload(self) -> None:
        """SIGHUP: reload now."""
        self._reload_requested.set()

    async def watch_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reload_requested.wait(), self.settings.config_poll_interval)
            except TimeoutError:
                if self._file_mtime() == self._mtime:
                    continue
            self._reload_requested.clear()
            try:
                self.reload()
            except ConfigError as exc:
                log.error("%s: configuration not reloaded, keeping the running one: %s", self.settings.node_id, exc)

    def reload(self) -> str:
        """Load the file and apply it; ConfigError (nothing changed) when it cannot be applied."""
        if self.path is None:
            raise ConfigError("the agent was started without a configuration file")
        self._mtime = self._file_mtime()
        settings = load_settings(self.path)
        old = self.settings
        if settings.node_id != old.node_id or settings.state_dir != old.state_dir:
            raise ConfigError(f"{self.path}: node_id and state_dir change only with a restart")
        reconnect = _needs_reconnect(old, settings)
        self.settings = settings
        self._apply(settings)
        if reconnect:
            self._reconnect()
        log.info("%s: configuration reloaded from %s", settings.node_id, self.path)
        return "configuration reloaded" + (", reconnecting" if reconnect else "")

    def _file_mtime(self) -> float | None:
        if self.path is None:
            return None
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None


def _needs_reconnect(old: AgentSettings, new: AgentSettings) -> bool:
    def link(settings: AgentSettings) -> tuple[object, ...]:
        return (settings.server_addr, settings.tls, settings.tls_enabled, settings.keepalive)

    return link(old) != link(new)
