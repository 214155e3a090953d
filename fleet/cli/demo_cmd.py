"""``fleet demo``: PKI, embedded broker, controller and real agents; three rollouts; a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli import fail


def demo(
    agents: Annotated[int, typer.Option("--agents", min=3, max=50, help="real fleet-agent processes (>= 3)")] = 5,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="empty or new directory for PKI, releases, databases and logs (kept)"),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the temporary work dir and its logs (a failed run always keeps them)")
    ] = False,
) -> None:
    """Run the whole system on this machine: three staged rollouts, the last one a bad release."""
    from rich.console import Console

    from fleet.tools.demo import DemoOptions, run_demo

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))
    try:
        code = run_demo(DemoOptions(agents=agents, workdir=workdir, keep=keep), console)
    except ValueError as exc:
        fail(str(exc))
    raise typer.Exit(code=code)


def main() -> None:
    """``fleet demo`` as a one-command app, usable before (and independently of) its mount in ``fleet``."""
    app = typer.Typer(add_completion=False)
    app.command()(demo)
    app()
