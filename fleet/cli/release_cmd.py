"""``fleet release``: build signed releases into a store, list them, make deltas, verify them."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from certs import PkiPaths
from fleet.cli import fail
from fleet.protocol.errors import FleetError
from fleet.protocol.messages import MAX_CHUNK_SIZE, ProbeSpec
from fleet.protocol.signing import load_private_key, load_public_key
from fleet.releases import DELTA_WORTH_RATIO, ReleaseManifest, ReleaseStore, build_release

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Releases: build, list, delta, verify.")

T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_ENTRY = "./run"

Store = Annotated[Path, typer.Option("--store", help="The release store directory.", metavar="DIR")]
Certs = Annotated[
    Path, typer.Option("--certs", envvar="FLEET_CERTS", help="The PKI directory (release.key / release.pub).")
]


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


Output = Annotated[OutputFormat, typer.Option("--output", "-o", help="table or json.")]


@app.command()
def build(
    source: Annotated[Path, typer.Argument(help="The directory to release.", metavar="SOURCE")],
    name: Annotated[str, typer.Option("--name", help="Release name (the workload).")],
    version: Annotated[str, typer.Option("--version", help="Release version.")],
    certs: Certs,
    store: Store,
    entry: Annotated[
        str | None,
        typer.Option("--entry", help=f"Command to run, relative to the release (default: {DEFAULT_ENTRY})."),
    ] = None,
    health_http: Annotated[str | None, typer.Option("--health-http", metavar="URL", help="HTTP probe URL.")] = None,
    health_tcp: Annotated[str | None, typer.Option("--health-tcp", metavar="HOST:PORT", help="TCP probe.")] = None,
    health_exec: Annotated[
        str | None, typer.Option("--health-exec", metavar="CMD", help="Command probe (exit 0 = healthy).")
    ] = None,
    health_delay: Annotated[float, typer.Option("--health-delay", min=0, help="Seconds before the first probe.")] = 0.0,
    health_period: Annotated[float, typer.Option("--health-period", min=0.001, help="Seconds between probes.")] = 10.0,
    health_failures: Annotated[
        int, typer.Option("--health-failures", min=1, help="Consecutive failures that mean unhealthy.")
    ] = 3,
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", help=f"Transfer chunk size, e.g. 64KiB (max {MAX_CHUNK_SIZE // 1024}KiB).")
    ] = "64KiB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing version.")] = False,
) -> None:
    """Pack SOURCE deterministically, sign the manifest and add the release to the store."""
    command = _entry(source, entry)
    probe = _probe(health_http, health_tcp, health_exec, health_delay, health_period, health_failures)
    size = _chunk_size(chunk_size)
    key = _run(lambda: load_private_key(_read_key(PkiPaths(certs).release_key)))
    manifest = _run(
        lambda: build_release(
            source,
            name=name,
            version=version,
            store=store,
            release_key=key,
            entry=command,
            health=probe,
            chunk_size=size,
            force=force,
        )
    )
    typer.echo(
        f"built {manifest.label} {manifest.digest} ({manifest.size} bytes, {len(manifest.chunk_digests)} chunks) "
        f"in {ReleaseStore(store).artifact_path(manifest).parent}"
    )


@app.command("ls")
def ls_cmd(store: Store, output: Output = OutputFormat.TABLE) -> None:
    """List the releases in a store."""
    releases = ReleaseStore(store)
    manifests = _run(releases.list)
    if output is OutputFormat.JSON:
        typer.echo(json.dumps([_as_json(releases, manifest) for manifest in manifests], indent=2))
    else:
        Console().print(_as_table(releases, manifests))


@app.command()
def delta(
    store: Store,
    base: Annotated[str, typer.Argument(metavar="BASE", help="name@version the device runs.")],
    target: Annotated[str, typer.Argument(metavar="TARGET", help="name@version to update to.")],
    output: Output = OutputFormat.TABLE,
) -> None:
    """Make (or show the cached) delta from BASE to TARGET."""
    releases = ReleaseStore(store)
    base_manifest = _run(lambda: releases.get(*_parse_ref(base)))
    target_manifest = _run(lambda: releases.get(*_parse_ref(target)))
    path = _run(lambda: releases.delta(base_manifest, target_manifest))
    full_size = releases.artifact_path(target_manifest).stat().st_size
    delta_size = path.stat().st_size if path is not None else None
    if output is OutputFormat.JSON:
        report = {
            "base": base_manifest.label,
            "target": target_manifest.label,
            "delta": str(path) if path is not None else None,
            "delta_size": delta_size,
            "full": str(releases.artifact_path(target_manifest)),
            "full_size": full_size,
        }
        typer.echo(json.dumps(report, indent=2))
    elif path is None or delta_size is None:
        typer.echo(
            f"no delta {base_manifest.label} -> {target_manifest.label}: not smaller than "
            f"{DELTA_WORTH_RATIO:.0%} of the full artifact ({full_size} bytes), the full artifact will be used"
        )
    else:
        full_share, payload_share = delta_size / full_size, delta_size / target_manifest.size
        typer.echo(
            f"delta {base_manifest.label} -> {target_manifest.label}: {path} ({delta_size} bytes, "
            f"{full_share:.1%} of the full artifact, {payload_share:.1%} of the payload)"
        )


@app.command()
def verify(
    store: Store,
    release: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="The release to check.")],
    certs: Certs,
) -> None:
    """Re-check a release's signature, artifact digest and chunk digests."""
    public_key = _run(lambda: load_public_key(_read_key(PkiPaths(certs).release_pub)))
    manifest = _run(lambda: ReleaseStore(store).verify(*_parse_ref(release), public_key))
    typer.echo(f"ok {manifest.label} {manifest.digest}: signature, artifact and {len(manifest.chunk_digests)} chunks")


# --- option parsing -----------------------------------------------------------------------------


def _entry(source: Path, entry: str | None) -> list[str]:
    """The entry command; a relative program path is checked against SOURCE now, not on every device."""
    try:
        command = shlex.split(entry if entry is not None else DEFAULT_ENTRY)
    except ValueError as exc:
        fail(f"--entry {entry!r}: {exc}")
    if not command:
        fail("--entry: empty command")
    program = command[0]
    if "/" in program and not program.startswith("/"):
        path = source / program
        if not path.is_file():
            hint = "" if entry is not None else " (no --entry given)"
            fail(f"--entry: {path} does not exist{hint}")
        if not path.stat().st_mode & 0o111:
            fail(f"--entry: {path} is not executable")
    return command


def _probe(
    http: str | None, tcp: str | None, exec_: str | None, delay: float, period: float, failures: int
) -> ProbeSpec | None:
    given = [(kind, target) for kind, target in (("http", http), ("tcp", tcp), ("exec", exec_)) if target is not None]
    if not given:
        return None
    if len(given) > 1:
        fail("--health-http, --health-tcp and --health-exec are exclusive: give one")
    kind, target = given[0]
    if kind == "http" and not re.match(r"^https?://[^/\s]+", target):
        fail(f"--health-http {target!r}: not an http:// or https:// URL")
    if kind == "tcp" and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", target):
        fail(f"--health-tcp {target!r}: expected HOST:PORT")
    if kind == "exec" and not target.strip():
        fail("--health-exec: empty command")
    return ProbeSpec.model_validate(
        {"kind": kind, "target": target, "initial_delay": delay, "period": period, "failure_threshold": failures}
    )


_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024 * 1024, "mib": 1024 * 1024}


def _chunk_size(text: str) -> int:
    """``65536``, ``64KiB``, ``64k``, ``1MiB`` (binary units: chunk sizes are powers of two in practice)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        fail(f"--chunk-size {text!r}: expected a size like 65536 or 64KiB")
    size = int(match.group(1)) * _UNITS[unit]
    if not 0 < size <= MAX_CHUNK_SIZE:
        fail(f"--chunk-size {text!r}: must be between 1 byte and {MAX_CHUNK_SIZE // 1024}KiB")
    return size


def _parse_ref(text: str) -> tuple[str, str]:
    name, at, version = text.partition("@")
    if not (name and at and version):
        fail(f"{text!r}: expected NAME@VERSION")
    return name, version


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"{path}: cannot read release key: {exc.strerror}")


def _run(action: Callable[[], T]) -> T:
    try:
        return action()
    except FleetError as exc:
        fail(str(exc))


# --- output -------------------------------------------------------------------------------------


def _as_json(store: ReleaseStore, manifest: ReleaseManifest) -> dict[str, object]:
    artifact = store.artifact_path(manifest)
    return {
        **manifest.document(),
        "artifact": str(artifact),
        "artifact_size": artifact.stat().st_size if artifact.exists() else None,
    }


def _as_table(store: ReleaseStore, manifests: list[ReleaseManifest]) -> Table:
    table = Table()
    for column in ("name", "version", "digest", "size", "artifact", "chunks", "entry", "health", "created"):
        table.add_column(column, no_wrap=column in {"name", "version", "digest", "created"})
    for manifest in manifests:
        artifact = store.artifact_path(manifest)
        table.add_row(
            manifest.name,
            manifest.version,
            manifest.digest.removeprefix("sha256:")[:12],
            _human(manifest.size),
            _human(artifact.stat().st_size) if artifact.exists() else "[red]missing[/red]",
            f"{len(manifest.chunk_digests)} x {_human(manifest.chunk_size)}",
            shlex.join(manifest.entry),
            f"{manifest.health.kind} {manifest.health.target}" if manifest.health else "-",
            datetime.fromtimestamp(manifest.created_at, UTC).strftime("%Y-%m-%d %H:%M"),
        )
    return table


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
