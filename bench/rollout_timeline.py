"""Rollout progress over time: the real system, small, sampled while one 3-wave rollout runs.

    python bench/rollout_timeline.py [--out bench/results] [--agents 5] [--interval 0.25]

Reuses ``fleet.tools.demo``: a fresh PKI, the embedded broker, the controller and N real ``fleet-agent``
processes; then the demo's first rollout (app@1.0.0 in waves 1, 2, 100%). While it runs,
``GET /v1/rollouts/{id}`` (HTTPS, as the demo's operator) is sampled every ``--interval`` seconds
and each sample's per-wave succeeded / failed / pending counts are recorded. Writes OUT/rollout_timeline.json and
OUT/rollout_progress.png (Pillow) and prints a summary JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFont
from rich.console import Console

from fleet.controller.facade import NodeOutcome, RolloutState, RolloutView
from fleet.tools.demo import STEPS, WAVES, Demo, DemoFailed, DemoOptions, Step, StepResult, Timings, sweep

FAILED_OUTCOMES = (NodeOutcome.FAILED, NodeOutcome.UNREACHABLE, NodeOutcome.ROLLED_BACK)
FINAL_STATES = (RolloutState.SUCCEEDED, RolloutState.ABORTED)


# ---- sampling ----------------------------------------------------------------------------------


def wave_counts(view: RolloutView) -> list[dict[str, Any]]:
    """Per wave: its size, whether it started, and how many of its nodes succeeded, failed, are pending."""
    waves = []
    for wave in view.waves:
        succeeded = wave.counts.get(NodeOutcome.SUCCEEDED, 0)
        failed = sum(wave.counts.get(outcome, 0) for outcome in FAILED_OUTCOMES)
        waves.append(
            {
                "index": wave.index,
                "nodes": wave.nodes,
                "started": wave.started_at is not None,
                "finished": wave.finished_at is not None,
                "succeeded": succeeded,
                "failed": failed,
                "pending": max(0, wave.nodes - succeeded - failed),
            }
        )
    return waves


def sample(view: RolloutView, t: float) -> dict[str, Any]:
    waves = wave_counts(view)
    return {
        "t": round(t, 3),
        "state": str(view.state),
        "current_wave": view.current_wave,
        "succeeded": sum(w["succeeded"] for w in waves),
        "failed": sum(w["failed"] for w in waves),
        "pending": sum(w["pending"] for w in waves),
        "waves": waves,
    }


@dataclass
class Timeline:
    interval: float
    rollout_id: str = ""
    release: str = ""
    created: float = 0.0  # controller wall clock, time.time()
    samples: list[dict[str, Any]] = field(default_factory=list)
    final: RolloutView | None = None

    def document(self, agents: int) -> dict[str, Any]:
        view = self.final
        waves = []
        if view is not None:
            for wave in view.waves:
                waves.append(
                    {
                        "index": wave.index,
                        "nodes": wave.nodes,
                        "started_s": _rel(wave.started_at, self.created),
                        "finished_s": _rel(wave.finished_at, self.created),
                    }
                )
        return {
            "bench": "rollout_timeline",
            "rollout_id": self.rollout_id,
            "release": self.release,
            "agents": agents,
            "wave_spec": list(WAVES),
            "interval_s": self.interval,
            "state": str(view.state) if view is not None else None,
            "duration_s": round(view.updated - self.created, 3) if view is not None else None,
            "waves": waves,
            "samples": self.samples,
            "note": "t and *_s are seconds since the rollout was created (controller clock); failed counts "
            "failed + unreachable + rolled_back; pending = wave nodes not yet finished, waves not started included",
        }


def _rel(at: float | None, origin: float) -> float | None:
    return round(at - origin, 3) if at is not None else None


class TimelineDemo(Demo):
    """The demo, with ``watch`` replaced by one that records every sample of the rollout."""

    def __init__(self, options: DemoOptions, console: Console, workdir: Path, interval: float) -> None:
        super().__init__(options, console, workdir)
        self.timeline = Timeline(interval)

    def watch(self, step: Step, rollout_id: str) -> RolloutView:
        self.progress.new_rollout()
        self.timeline.rollout_id, self.timeline.release = rollout_id, step.release
        deadline = time.monotonic() + self.timings.wave_timeout * len(WAVES) + 30
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            view = self.controller.rollout(rollout_id)
            now = time.time()
            if not self.timeline.samples:
                self.timeline.created = view.created
            self.timeline.samples.append(sample(view, now - self.timeline.created))
            self.progress.show_rollout(view)
            if view.state in FINAL_STATES:
                self.timeline.final = view
                return view
            next_at += self.timeline.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        raise DemoFailed(step.name, f"rollout {rollout_id} did not finish in time")


def run_rollout(agents: int, interval: float, keep: Path | None) -> Timeline:
    console = Console(stderr=True)
    workdir = keep.resolve() if keep is not None else Path(tempfile.mkdtemp(prefix="bench-timeline-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options = DemoOptions(agents=agents, workdir=workdir, keep=keep is not None, timings=Timings(poll=interval))
    demo = TimelineDemo(options, console, workdir, interval)
    failed = True
    try:
        demo.setup()
        step = STEPS[0]  # app@1.0.0, three waves, every node must succeed
        demo.run_step(step, StepResult(step))
        failed = False
    finally:
        if demo.api is not None:
            demo.api.close()
        demo.children.stop_all()
        sweep(workdir)
        if keep is None and not failed:
            shutil.rmtree(workdir, ignore_errors=True)
        elif failed:
            console.print(f"work dir kept for a look: {workdir}")
    return demo.timeline


# ---- the plot ----------------------------------------------------------------------------------

WIDTH, HEIGHT = 1000, 600
LEFT, RIGHT, TOP, BOTTOM = 80, 240, 60, 70
SERIES = (("succeeded", "succeeded (cumulative)", (34, 139, 34)), ("pending", "pending", (230, 140, 0)),
          ("failed", "failed", (200, 30, 30)))  # fmt: skip
GRID = (225, 225, 225)
INK = (30, 30, 30)
MARKER = (90, 90, 200)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _nice_step(span: float, ticks: int) -> float:
    raw = max(span / ticks, 1e-9)
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


def _dashed_vline(draw: ImageDraw.ImageDraw, x: float, top: float, bottom: float, fill: tuple[int, int, int]) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + 6, bottom))], fill=fill, width=2)
        y += 11


def plot(document: dict[str, Any], path: Path) -> None:
    samples: list[dict[str, Any]] = document["samples"]
    total = int(max((s["succeeded"] + s["failed"] + s["pending"] for s in samples), default=1))
    t_end = float(max([s["t"] for s in samples] + [document.get("duration_s") or 0.0, 1.0])) * 1.03
    y_max = max(total, 1)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    title, label, small = _font(20), _font(15), _font(13)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP

    def px(t: float) -> float:
        return x0 + (x1 - x0) * t / t_end

    def py(n: float) -> float:
        return y0 - (y0 - y1) * n / (y_max * 1.05)

    # grid, ticks, axes
    step = _nice_step(t_end, 10)
    t = 0.0
    while t <= t_end + 1e-9:
        draw.line([(px(t), y0), (px(t), y1)], fill=GRID)
        draw.line([(px(t), y0), (px(t), y0 + 5)], fill=INK)
        draw.text((px(t), y0 + 8), f"{t:g}", fill=INK, font=small, anchor="mt")
        t += step
    n_step = max(1, int(_nice_step(y_max, 6)))
    for n in range(0, y_max + 1, n_step):
        draw.line([(x0, py(n)), (x1, py(n))], fill=GRID)
        draw.line([(x0 - 5, py(n)), (x0, py(n))], fill=INK)
        draw.text((x0 - 8, py(n)), str(n), fill=INK, font=small, anchor="rm")
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=INK, width=2)

    # wave start markers
    for wave in document["waves"]:
        if wave["started_s"] is None:
            continue
        x = px(wave["started_s"])
        _dashed_vline(draw, x, y1, y0, MARKER)
        draw.text((x + 4, y1 + 4), f"wave {wave['index'] + 1} ({wave['nodes']})", fill=MARKER, font=small)

    # the series, as steps: a count holds until the next sample
    for key, _name, colour in SERIES:
        points: list[tuple[float, float]] = []
        for s in samples:
            if points:
                points.append((px(s["t"]), points[-1][1]))
            points.append((px(s["t"]), py(s[key])))
        if len(points) > 1:
            draw.line(points, fill=colour, width=3, joint="curve")
        for s in samples:
            x, y = px(s["t"]), py(s[key])
            draw.ellipse([(x - 1.5, y - 1.5), (x + 1.5, y + 1.5)], fill=colour)

    # title, axis labels, legend
    heading = f"Rollout of {document['release']}: {document['agents']} nodes, waves {', '.join(document['wave_spec'])}"
    if document.get("state"):
        heading += f" - {document['state']} in {document['duration_s']:.1f} s"
    draw.text((WIDTH / 2, 22), heading, fill=INK, font=title, anchor="mm")
    draw.text(((x0 + x1) / 2, HEIGHT - 22), "seconds since rollout start", fill=INK, font=label, anchor="mm")
    ylabel = Image.new("RGBA", (200, 24), (255, 255, 255, 0))
    ImageDraw.Draw(ylabel).text((100, 12), "nodes", fill=INK, font=label, anchor="mm")
    rotated = ylabel.rotate(90, expand=True)
    image.paste(rotated, (18, int((y0 + y1) / 2 - rotated.height / 2)), rotated)
    lx, ly = x1 + 20, y1 + 10
    draw.rectangle([(lx - 8, ly - 8), (WIDTH - 10, ly + 22 * (len(SERIES) + 1) + 4)], outline=GRID)
    for index, (_key, name, colour) in enumerate(SERIES):
        y = ly + 22 * index + 8
        draw.line([(lx, y), (lx + 28, y)], fill=colour, width=3)
        draw.text((lx + 36, y), name, fill=INK, font=small, anchor="lm")
    y = ly + 22 * len(SERIES) + 8
    _dashed_vline(draw, lx + 14, y - 8, y + 8, MARKER)
    draw.text((lx + 36, y), "wave start", fill=INK, font=small, anchor="lm")
    note = f"sampled every {document['interval_s']:g} s (GET /v1/rollouts/{{id}})"
    draw.text((WIDTH - 10, HEIGHT - 10), note, fill=(110, 110, 110), font=_font(12), anchor="rd")
    image.save(path)


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    parser.add_argument("--agents", type=int, default=5, help="agent processes (default 5)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples (default 0.25)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs, PKI, store)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from OUT/rollout_timeline.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "rollout_timeline.json", args.out / "rollout_progress.png"
    if args.replot:
        plot(json.loads(json_path.read_text()), png_path)
        return 0
    try:
        timeline = run_rollout(args.agents, args.interval, args.keep)
    except DemoFailed as exc:
        print(f"rollout timeline failed: {exc}", file=sys.stderr)
        return 1
    document = timeline.document(args.agents)
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    plot(document, png_path)
    summary = {key: value for key, value in document.items() if key != "samples"}
    summary |= {"sample_count": len(document["samples"]), "json": str(json_path), "png": str(png_path)}
    print(json.dumps(summary, indent=2))
    return 0 if document["state"] == RolloutState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
