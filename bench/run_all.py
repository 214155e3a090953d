"""Run every benchmark and write OUT/results.json and OUT/report.md (plus the rollout timeline PNG).

    python bench/run_all.py [--quick] [--out bench/results] [--only NAME ...] [--no-timeline]

Each benchmark runs as its own subprocess with a timeout and prints one JSON document on stdout; its
stderr goes to OUT/logs/NAME.stderr. results.json holds one key per benchmark (null when it failed)
and ``meta`` (date, python, cpu count, arguments, and the failed ones with the tail of their stderr).
report.md is a Markdown table of the headline figures in FIGURES below, each next to its same-run
baseline and its target. A failed benchmark shows as failed in the table; everything else is still
written and the exit code is 1. ``--quick`` uses smoke-test sizes: fast, not numbers to quote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
STDERR_TAIL = 3000  # characters of a failed benchmark's stderr kept in results.json
TIMELINE = "rollout_timeline"


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    timeout: float  # seconds, full size
    quick_timeout: float

    @property
    def script(self) -> Path:
        return REPO / "bench" / f"{self.name}.py"


# The settings of tests/bench/test_bench_smoke.py: about 20 s; --quick alone keeps the 60 s idle window.
AGENT_IDLE_QUICK = "--quick --duration 3 --heartbeat-interval 1 --settle 0.5 --rounds 1 --outage 1.2"
BENCHES: tuple[Bench, ...] = (
    Bench("broker_startup", ("--devices", "200"), ("--devices", "20"), 600, 120),
    Bench("agent_idle", (), tuple(AGENT_IDLE_QUICK.split()), 600, 90),
    Bench("delta_sizes", (), (), 600, 300),  # the first run downloads two Debian packages into its cache
    Bench("update_transfer", ("--size-mib", "4"), ("--quick",), 900, 240),
    Bench("controller_scale", (), ("--quick",), 1200, 240),
    Bench(TIMELINE, (), (), 300, 300),  # writes OUT/rollout_timeline.json and OUT/rollout_progress.png
    Bench("sim_scale", (), ("--quick",), 2400, 240),  # 10,000 simulated devices; amqtt vs Mosquitto
)
NAMES = tuple(bench.name for bench in BENCHES)


@dataclass(frozen=True)
class Ref:
    """A number in a benchmark's JSON: ``path`` is dotted; ``scale`` converts it to the figure's unit."""

    label: str
    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class Figure:
    """One row of the report. ``what`` may name values of the document in braces: "{desired_fanout.nodes}"."""

    bench: str
    what: str
    value: str  # dotted key path of the measured figure
    unit: str
    baselines: tuple[Ref, ...] = ()
    target: str | float | None = None  # a key path into the same document, or a literal
    better: Literal["lower", "higher"] = "lower"
    digits: int = 1


# The headline figures of the report: where each number, its baselines and its target are in the JSON.
FIGURES: tuple[Figure, ...] = (
    Figure("broker_startup", "broker: {devices} mTLS devices connect, sequential (embedded amqtt)",
           "embedded_amqtt.fleet_connect_seconds", "s",
           (Ref("Mosquitto", "baseline_mosquitto.fleet_connect_seconds"),), digits=2),
    Figure("broker_startup", "broker RSS with {devices} devices (embedded amqtt)", "embedded_amqtt.rss_after_fleet_mib",
           "MiB", (Ref("Mosquitto", "baseline_mosquitto.rss_after_fleet_mib"),)),
    Figure("broker_startup", "broker start (embedded amqtt)", "embedded_amqtt.start_seconds", "s",
           (Ref("Mosquitto", "baseline_mosquitto.start_seconds"),), digits=2),
    Figure("agent_idle", "agent idle RSS", "idle_memory.idle_rss_mib", "MiB",
           (Ref("bare Python", "import_breakdown.rss_mib.bare_interpreter"),), target="idle_memory.target_mib"),
    Figure("agent_idle", "agent idle CPU", "idle_cpu.cpu_percent_of_one_core", "% of a core",
           target="idle_cpu.target_percent", digits=3),
    Figure("agent_idle", "agent idle bytes on the wire", "wire.kib_per_hour", "KiB/h"),
    Figure("agent_idle", "agent reconnect -> desired state applied (median)",
           "reconnect.reconnect_to_applied.median_ms", "ms", target="reconnect.target_ms", digits=0),
    Figure("delta_sizes", "delta: {input} (zstd patch-from)", "zstd_patch_from_size", "B",
           (Ref("zstd -19 full", "zstd19_full_size"), Ref("bsdiff4", "bsdiff4_size"),
            Ref("xdelta3", "xdelta3_size")), digits=0),
    Figure("update_transfer", "release transfer goodput ({size_mib} MiB)",
           "goodput_loopback.agent.goodput_transfer_mb_per_s", "MB/s",
           (Ref("raw paho QoS 1 sliding window", "goodput_loopback.raw_paho_baseline.sliding_window.mb_per_s"),
            Ref("raw paho stop-and-wait windows", "goodput_loopback.raw_paho_baseline.stop_and_wait_windows.mb_per_s")),
           better="higher"),
    Figure("update_transfer", "release publish -> healthy ({size_mib} MiB)",
           "goodput_loopback.agent.publish_to_healthy_s", "s", digits=2),
    Figure("update_transfer", "rate-limited link goodput", "rate_limited.goodput_kib_per_s", "KiB/s",
           (Ref("link rate", "rate_limited.bandwidth_bytes_per_s", 1 / 1024),), better="higher", digits=0),
    Figure("update_transfer", "delta update v1 -> v2, bytes sent", "delta_update.bytes_sent", "B",
           (Ref("full artifact", "delta_update.full_artifact_bytes"),), digits=0),
    Figure("update_transfer", "agent peak RSS over idle while applying ({agent_peak_rss.artifact_mib} MiB)",
           "agent_peak_rss.peak_minus_idle_mib", "MiB", target="agent_peak_rss.target_peak_minus_idle_mib"),
    Figure("controller_scale", "heartbeat ingest, paced ({ingest_paced_at_target.offered_rate_per_s}/s offered)",
           "ingest_paced_at_target.controller_ingested_per_s", "/s",
           (Ref("published", "ingest_paced_at_target.published_per_s"),),
           target="ingest_paced_at_target.target_per_s", better="higher", digits=0),
    Figure("controller_scale", "heartbeat ingest with a raw subscriber, "
           "offered {ingest_with_raw_baseline.offered_rate_per_s}/s (0: flat out)",
           "ingest_with_raw_baseline.controller_ingested_per_s", "/s",
           (Ref("raw paho subscriber", "ingest_with_raw_baseline.raw_received_per_s"),
            Ref("published", "ingest_with_raw_baseline.published_per_s")), better="higher", digits=0),
    Figure("controller_scale", "desired state to {desired_fanout.nodes} nodes, all received",
           "desired_fanout.all_received_s", "s", target="desired_fanout.target_s", digits=2),
    Figure("controller_scale", "controller memory per known node", "controller_rss.kib_per_node", "KiB", digits=2),
    Figure(TIMELINE, "rollout {release}, {agents} nodes, waves 1/2/100%: start -> {state}", "duration_s", "s"),
    Figure("sim_scale", "same {broker_comparison.devices} simulated devices, heartbeat+health 1/s: delivered (amqtt)",
           "broker_comparison.amqtt.delivered_per_s", "/s",
           (Ref("Mosquitto", "broker_comparison.mosquitto.delivered_per_s"),
            Ref("nominal offered", "broker_comparison.mosquitto.nominal_offered_per_s")), better="higher", digits=0),
    Figure("sim_scale", "same {broker_comparison.devices} simulated devices: all connected (amqtt)",
           "broker_comparison.amqtt.connect_all_s", "s",
           (Ref("Mosquitto", "broker_comparison.mosquitto.connect_all_s"),), digits=2),
    Figure("sim_scale", "same {broker_comparison.devices} simulated devices: broker CPU (amqtt)",
           "broker_comparison.amqtt.broker_cpu_percent_of_one_core", "% of a core",
           (Ref("Mosquitto", "broker_comparison.mosquitto.broker_cpu_percent_of_one_core"),)),
    Figure("sim_scale", "{fleet.devices} simulated devices over mTLS: controller sees all online",
           "fleet.controller_sees_all_online_s", "s",
           (Ref("sim: all connected", "fleet.sim.connect_time_s.all_connected_after"),)),
    Figure("sim_scale", "{fleet.devices} simulated devices: one-wave rollout -> {fleet.rollout_state}",
           "fleet.rollout_to_finished_s", "s"),
    Figure("sim_scale", "failure report -> rollback command on the wire (median, {rollback.devices} devices)",
           "rollback.failure_report_to_rollback_command_ms.median", "ms",
           (Ref("MQTT round trip", "rollback.baseline_mqtt_round_trip_ms"),), digits=1),
    Figure("sim_scale", "failure report -> device back on the good version (median)",
           "rollback.failure_report_to_back_on_good_version_ms.median", "ms", digits=1),
    Figure("sim_scale", "Mosquitto RSS with {fleet.devices} devices connected", "fleet.rss_mib_connected.mosquitto",
           "MiB", (Ref("controller", "fleet.rss_mib_connected.controller"),
                   Ref("sim process", "fleet.rss_mib_connected.sim"))),
)  # fmt: skip


@dataclass
class Outcome:
    name: str
    command: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    document: dict[str, Any] | None = None
    error: str | None = None  # why it counts as failed
    stderr_tail: str = ""

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class Run:
    out: Path
    quick: bool
    outcomes: dict[str, Outcome] = field(default_factory=dict)


# ---- running -----------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the benchmark's process group (the benchmarks clean up on it), SIGKILL after 20 s."""
    for signum, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        return


def run_bench(bench: Bench, quick: bool, out: Path) -> Outcome:
    args = list(bench.quick_args if quick else bench.args)
    if bench.name == TIMELINE:
        args += ["--out", str(out)]
    timeout = bench.quick_timeout if quick else bench.timeout
    command = [sys.executable, str(bench.script), *args]
    outcome = Outcome(bench.name, command)
    log = out / "logs" / f"{bench.name}.stderr"
    say(f"{bench.name}: {' '.join(['bench/' + bench.script.name, *args])} (timeout {timeout:.0f}s)")
    started = time.monotonic()
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            stdout = b""
            outcome.error = f"timed out after {timeout:.0f}s"
        except BaseException:
            _stop_group(process)
            raise
    outcome.seconds = round(time.monotonic() - started, 1)
    outcome.returncode = process.returncode
    outcome.stderr_tail = log.read_text(errors="replace")[-STDERR_TAIL:]
    if outcome.error is None:
        try:
            document = json.loads(stdout)
        except ValueError:
            document = None
        if isinstance(document, dict):
            outcome.document = document
        if process.returncode != 0:
            outcome.error = f"exit code {process.returncode}"
        elif outcome.document is None:
            outcome.error = "no JSON document on stdout"
    status = f"FAILED ({outcome.error})" if outcome.failed else "ok"
    say(f"{bench.name}: {status} in {outcome.seconds:.0f}s")
    return outcome


# ---- the report --------------------------------------------------------------------------------


_MISSING = object()


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted key path, or _MISSING."""
    value = document
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def number(document: dict[str, Any], dotted: str, scale: float = 1.0) -> float | None:
    value = lookup(document, dotted)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) * scale


def fmt(value: float | None, digits: int, unit: str) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text}{unit}" if unit.startswith("/") else f"{text} {unit}"


def title(figure: Figure, document: dict[str, Any] | None) -> str:
    def field_value(match: re.Match[str]) -> str:
        value = lookup(document, match.group(1)) if document is not None else _MISSING
        if value is _MISSING:
            return "?" if document is not None else "{" + match.group(1) + "}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return str(value)
        return f"{value:,g}"

    return re.sub(r"\{([\w.]+)\}", field_value, figure.what)


def target_cell(figure: Figure, document: dict[str, Any], value: float | None) -> tuple[str, str]:
    """The target column and the verdict column."""
    if figure.target is None:
        return "-", "-"
    goal = number(document, figure.target) if isinstance(figure.target, str) else float(figure.target)
    if goal is None:
        return "n/a", "-"
    sign = "<=" if figure.better == "lower" else ">="
    text = f"{sign} {fmt(goal, figure.digits, figure.unit)}"
    if value is None:
        return text, "-"
    met = value <= goal if figure.better == "lower" else value >= goal
    return text, "met" if met else "**not met**"


def figure_row(figure: Figure, outcome: Outcome | None) -> str:
    if outcome is None:
        return ""
    document = outcome.document
    what = title(figure, document if not outcome.failed else None)
    if outcome.failed or document is None:
        return f"| {what} | **failed** ({outcome.error}) | - | - | failed |"
    value = number(document, figure.value)
    baselines = []
    for ref in figure.baselines:
        base = number(document, ref.path, ref.scale)
        baselines.append(f"{ref.label} {fmt(base, figure.digits, figure.unit)}")
    target, verdict = target_cell(figure, document, value)
    measured = fmt(value, figure.digits, figure.unit)
    return f"| {what} | {measured} | {', '.join(baselines) or '-'} | {target} | {verdict} |"


def report(run: Run, meta: dict[str, Any]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"{meta['date']} - Python {meta['python']} - {meta['cpu_count']} CPUs - {meta['platform']}"
        + (f" - commit {meta['commit']}" if meta.get("commit") else ""),
        "",
    ]
    if run.quick:
        lines += ["**--quick**: smoke-test sizes, not numbers to quote.", ""]
    lines += [
        "| what | fleet | same-run baseline | target | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [row for figure in FIGURES if (row := figure_row(figure, run.outcomes.get(figure.bench)))]
    lines += ["", "## Benchmarks", "", "| benchmark | status | seconds | command |", "|---|---|---|---|"]
    for name, outcome in run.outcomes.items():
        status = f"**failed** ({outcome.error})" if outcome.failed else "ok"
        command = " ".join(["python", *(_relative(part) for part in outcome.command[1:])])
        lines.append(f"| {name} | {status} | {outcome.seconds:.0f} | `{command}` |")
    timeline = run.outcomes.get(TIMELINE)
    if timeline is not None and not timeline.failed:
        lines += ["", "## Rollout progress", "", "![rollout progress over time](rollout_progress.png)",
                  "", "Samples: `rollout_timeline.json`."]  # fmt: skip
    failed = [outcome for outcome in run.outcomes.values() if outcome.failed]
    if failed:
        lines += ["", "## Failures"]
        for outcome in failed:
            tail = "\n".join(outcome.stderr_tail.splitlines()[-15:])
            lines += ["", f"### {outcome.name}: {outcome.error}", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


DOC_START, DOC_END = "<!-- benchmark-report:start -->", "<!-- benchmark-report:end -->"


def update_doc(path: Path, report_text: str) -> None:
    """Replace what lies between the markers in ``path`` with the report's first line and summary table."""
    lines = report_text.splitlines()
    table_end = lines.index("## Benchmarks")
    summary = "\n".join(lines[2:table_end]).strip()
    text = path.read_text()
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {DOC_START} ... {DOC_END} markers")
    path.write_text(f"{text[: start + len(DOC_START)]}\n{summary}\n{text[end:]}")


def _relative(part: str) -> str:
    try:
        return str(Path(part).relative_to(REPO))
    except ValueError:
        return part


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=False)  # fmt: skip
    except OSError:
        return None
    return done.stdout.strip() or None


def metadata(run: Run, args: argparse.Namespace, started: dt.datetime) -> dict[str, Any]:
    return {
        "date": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "commit": _commit(),
        "quick": args.quick,
        "benchmarks": {
            name: {
                "command": outcome.command[1:],
                "seconds": outcome.seconds,
                "returncode": outcome.returncode,
                "ok": not outcome.failed,
            }
            for name, outcome in run.outcomes.items()
        },
        "failed": {
            name: {"error": outcome.error, "returncode": outcome.returncode, "stderr_tail": outcome.stderr_tail}
            for name, outcome in run.outcomes.items()
            if outcome.failed
        },
    }


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes of every benchmark")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run only these: {', '.join(NAMES)}")
    parser.add_argument("--no-timeline", action="store_true", help="skip the rollout timeline (PNG plot)")
    parser.add_argument("--doc", type=Path, help="also put the summary table into this Markdown file, between"
                        f" {DOC_START} and {DOC_END}")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC).astimezone()
    run = Run(out, args.quick)
    selected = [b for b in BENCHES if (args.only is None or b.name in args.only)]
    if args.no_timeline:
        selected = [b for b in selected if b.name != TIMELINE]
    try:
        for bench in selected:
            run.outcomes[bench.name] = run_bench(bench, args.quick, out)
    except KeyboardInterrupt:
        say("interrupted; writing what was measured so far")
    meta = metadata(run, args, started)
    results: dict[str, Any] = {"meta": meta}
    results |= {name: outcome.document if not outcome.failed else None for name, outcome in run.outcomes.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(run, meta)
    (out / "report.md").write_text(text)
    if args.doc is not None:
        update_doc(args.doc, text)
        say(f"updated the table in {args.doc}")
    say(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    failed = sorted(meta["failed"])
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed or len(run.outcomes) < len(selected) else 0


if __name__ == "__main__":
    sys.exit(main())
