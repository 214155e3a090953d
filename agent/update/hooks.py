"""What the update parts ask of the rest of the agent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.update.releases import Release
from fleet.protocol.messages import UpdateState


@dataclass
class Hooks:
    report: Callable[[UpdateState, str | None, float | None], None]
    event: Callable[[str, str | None, dict[str, Any]], None]
    run_release: Callable[[Release | None], Awaitable[None]]  # switch the workload (None: the configured one)
    workload_exits: Callable[[], int]  # monotonically growing count of workload exits
