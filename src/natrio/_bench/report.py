"""From raw figures to a verdict: medians, ratios and targets; a table, a JSON file, a plot.

:func:`summarize` turns what :func:`natrio._bench.scenarios.run_bench` measured into the
figures the issue asks for (medians over rounds, natrio as a ratio to the baselines of
the same run) and checks each target. :func:`document` adds what a reader needs to
compare runs (versions, CPU count, command line, time), :func:`table` renders it with
rich, :func:`write_plot` draws it with matplotlib when that is installed (the
``natrio[bench]`` extra). :class:`RichProgress` is the progress display while it runs.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as _Progress
from rich.table import Table
from rich.text import Text

import natrio

from .scenarios import Sizes

__all__ = [
    "PLOT_HINT",
    "RichProgress",
    "document",
    "environment",
    "percentile",
    "summarize",
    "table",
    "write_plot",
]

#: Printed instead of drawing the plot when matplotlib cannot be imported.
PLOT_HINT = "no plot: matplotlib is not installed (pip install 'natrio[bench]' gives the plot)"

#: The latency percentiles reported for round trips.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

# Memory and size units are decimal: 1 KB = 1,000 bytes, 1 MB = 1,000,000 bytes.
_KB = 1_000
_MB = 1_000_000


# -- progress --------------------------------------------------------------------------------


class RichProgress:
    """A rich progress display with one line per contestant run (``scenarios.Progress``).

    Use it as a context manager around :func:`~natrio._bench.scenarios.run_bench`.
    """

    def __init__(self, console: Console) -> None:
        self._progress = _Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def bar(self, description: str, total: int | None) -> _RichBar:
        """A new line for one contestant run."""
        task = self._progress.add_task(description, total=total, status="")
        return _RichBar(self._progress, task, total)


class _RichBar:
    def __init__(self, progress: _Progress, task: TaskID, total: int | None) -> None:
        self._progress = progress
        self._task = task
        self._total = total

    def update(self, done: int | None = None, status: str | None = None) -> None:
        fields: dict[str, Any] = {}
        if status is not None:
            fields["status"] = status
        self._progress.update(self._task, completed=done, **fields)

    def finish(self, status: str) -> None:
        total = self._total or 1
        self._progress.update(self._task, total=total, completed=total, status=status)
        self._progress.stop_task(self._task)


# -- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating between neighbours."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _label(q: float) -> str:
    return f"p{q:g}"


@attrs.frozen
class _Target:
    id: str
    scenario: str
    figure: str
    value: float
    comparison: str
    limit: float
    target: str

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        if self.comparison == "<=":
            return self.value <= self.limit
        if self.comparison == "<":
            return self.value < self.limit
        return self.value >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"passed": self.passed}


def _row(
    scenario: str,
    contestant: str,
    figure: str,
    value: str,
    ratio: str = "",
    target: _Target | None = None,
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "contestant": contestant,
        "figure": figure,
        "value": value,
        "ratio": ratio,
        "target": target.target if target else "",
        "target_id": target.id if target else None,
        "passed": target.passed if target else None,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of natrio's figure over the baseline's in the same round."""
    return statistics.median(_ratio(a, b) for a, b in zip(ours, theirs, strict=True))


def summarize(raw: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Medians, ratios, targets and table rows from ``run_bench``'s raw figures."""
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    targets: list[_Target] = []
    rows: list[dict[str, Any]] = []

    if "drain" in raw:
        runs = raw["drain"]["runs"]
        rates = {key: [run["rate"] for run in runs[key]] for key in runs}
        median = {key: statistics.median(values) for key, values in rates.items()}
        figures["drain"] = {"tasks": raw["drain"]["tasks"], "median_rate": median, "rates": rates}
        # Each round's contestants ran back to back, so a round's ratio shares its
        # machine's mood; the median of those ratios drifts far less than a ratio of
        # medians taken minutes apart (they are the same with one round).
        ratios["drain_natrio_vs_a"] = _paired_ratio(rates["natrio"], rates["A"])
        ratios["drain_natrio_vs_b"] = _paired_ratio(rates["natrio"], rates["B"])
        vs_a = _Target(
            "drain_vs_a", "drain", "tasks/s ÷ A", ratios["drain_natrio_vs_a"], ">=", 3.0, "≥ 3x A"
        )
        vs_b = _Target(
            "drain_vs_b", "drain", "tasks/s ÷ B", ratios["drain_natrio_vs_b"], ">=", 1.0, "≥ 1x B"
        )
        targets += [vs_a, vs_b]
        rows.append(_row("drain", "baseline A", "tasks/s", f"{median['A']:,.0f}"))
        rows.append(_row("drain", "baseline B", "tasks/s", f"{median['B']:,.0f}"))
        natrio_rate = f"{median['natrio']:,.0f}"
        rows.append(_row("drain", "natrio", "tasks/s", natrio_rate, f"{vs_a.value:.2f}x A", vs_a))
        rows.append(_row("drain", "natrio", "tasks/s", natrio_rate, f"{vs_b.value:.2f}x B", vs_b))

    if "roundtrip" in raw:
        runs = raw["roundtrip"]["runs"]
        latency: dict[str, dict[str, float]] = {}
        for key in ("floor", "natrio"):
            per_round = [run["latencies"] for run in runs[key]]
            summary = {
                _label(q): statistics.median(percentile(values, q) for values in per_round)
                for q in PERCENTILES
            }
            summary["mean"] = statistics.median(statistics.fmean(v) for v in per_round if v)
            summary["max"] = statistics.median(max(v) for v in per_round if v)
            latency[key] = summary
        figures["roundtrip"] = {"count": raw["roundtrip"]["count"], "latency_seconds": latency}
        floor, ours = latency["floor"], latency["natrio"]
        for q in ("p50", "p99", "p99.9"):
            ratios[f"roundtrip_{q}_natrio_vs_floor"] = _ratio(ours[q], floor[q])
        p50 = _Target("roundtrip_p50", "roundtrip", "p50", ours["p50"] * 1000, "<=", 1.0, "≤ 1 ms")
        p99 = _Target("roundtrip_p99", "roundtrip", "p99", ours["p99"] * 1000, "<=", 5.0, "≤ 5 ms")
        p50_ratio = _Target(
            "roundtrip_p50_vs_floor",
            "roundtrip",
            "p50 ÷ floor p50",
            ratios["roundtrip_p50_natrio_vs_floor"],
            "<=",
            5.0,
            "≤ 5x floor",
        )
        targets += [p50, p99, p50_ratio]
        floor_value = " · ".join(f"{floor[q] * 1000:.3f}" for q in ("p50", "p99", "p99.9"))
        rows.append(_row("roundtrip", "floor", "p50 · p99 · p99.9", f"{floor_value} ms"))
        for q, target in (("p50", p50), ("p50", p50_ratio), ("p99", p99), ("p99.9", None)):
            ratio = f"{ratios[f'roundtrip_{q}_natrio_vs_floor']:.1f}x floor"
            rows.append(_row("roundtrip", "natrio", q, f"{ours[q] * 1000:.3f} ms", ratio, target))

    if "concurrency" in raw:
        runs = raw["concurrency"]["runs"]
        count, sleep = raw["concurrency"]["tasks"], raw["concurrency"]["sleep"]
        seconds = statistics.median(run["seconds"] for run in runs)
        per_task = [run["bytes_per_task"] for run in runs if run["bytes_per_task"] is not None]
        bytes_per_task = statistics.median(per_task) if per_task else math.nan
        peak = min(run["peak_in_flight"] for run in runs)
        figures["concurrency"] = {
            "tasks": count,
            "sleep": sleep,
            "seconds": seconds,
            "bytes_per_task": bytes_per_task,
            "peak_in_flight": peak,
        }
        # The 1.5 s is for 1 s sleeps: the same 50 % over the ideal for others.
        wall = _Target(
            "concurrency_wall",
            "concurrency",
            "wall time",
            seconds,
            "<=",
            1.5 * sleep,
            f"≤ {1.5 * sleep:g} s",
        )
        memory = _Target(
            "concurrency_memory",
            "concurrency",
            "memory per in-flight task",
            bytes_per_task / _KB,
            "<=",
            10.0,
            "≤ 10 KB",
        )
        targets += [wall, memory]
        what = f"wall time ({count:,} x {sleep:g} s)"
        rows.append(
            _row(
                "concurrency",
                "natrio",
                what,
                f"{seconds:.2f} s",
                f"{seconds / sleep:.2f}x ideal",
                wall,
            )
        )
        rows.append(
            _row(
                "concurrency",
                "natrio",
                f"memory per in-flight task ({peak:,} at once)",
                f"{bytes_per_task / _KB:.1f} KB",
                "",
                memory,
            )
        )

    if "longrun" in raw:
        run = raw["longrun"]["runs"][0]
        samples = [tuple(sample) for sample in run["samples"]]
        growth_from = raw["longrun"]["growth_from"]
        start = samples[0][1]
        at_from = next((s for s in samples if s[0] >= growth_from), samples[-1])
        middle = min(samples, key=lambda s: abs(s[0] - run["tasks"] / 2))
        end = samples[-1]
        growth = end[1] - at_from[1]
        figures["longrun"] = {
            "tasks": run["tasks"],
            "rate": run["rate"],
            "rss_bytes": {
                "start": start,
                "growth_from": at_from[1],
                "middle": middle[1],
                "end": end[1],
            },
            "growth_from_task": at_from[0],
            "growth_bytes": growth,
        }
        grew = _Target(
            "longrun_growth",
            "longrun",
            f"RSS growth from task {at_from[0]:,} to {end[0]:,}",
            growth / _MB,
            "<",
            20.0,
            "< 20 MB",
        )
        targets.append(grew)
        rows.append(_row("longrun", "natrio", grew.figure, f"{growth / _MB:.1f} MB", "", grew))
        rss = " · ".join(f"{value / _MB:.1f}" for value in (start, middle[1], end[1]))
        rows.append(_row("longrun", "natrio", "RSS at start · middle · end", f"{rss} MB"))
        rows.append(_row("longrun", "natrio", "tasks/s", f"{run['rate']:,.0f}"))

    return {
        "figures": figures,
        "ratios": ratios,
        "targets": [target.as_dict() for target in targets],
        "rows": rows,
    }


# -- the document ----------------------------------------------------------------------------


async def environment() -> dict[str, Any]:
    """What the figures depend on: versions, CPU count, platform."""
    packages: dict[str, str | None] = {}
    for name in ("natrio", "trio", "trio-asyncio", "nats-py", "attrs", "cattrs", "matplotlib"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    binary = natrio.find_nats_server()
    shown = await trio.run_process([binary, "--version"], capture_stdout=True, check=False)
    # It prints "nats-server: v2.15.1".
    server = shown.stdout.decode(errors="replace").strip().rpartition(" ")[2].lstrip("v")
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "nats_server": server or None,
        "nats_server_binary": binary,
        "packages": packages,
    }


def document(
    *,
    raw: dict[str, Any],
    summary: dict[str, Any],
    sizes: Sizes,
    rounds: int,
    mode: str,
    command: str,
    env: dict[str, Any],
    started: float,
    seconds: float,
) -> dict[str, Any]:
    """Everything ``bench.json`` holds: the run's context, figures, ratios, targets, raw data."""
    return {
        "bench": "natrio",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "command": command,
        "mode": mode,
        "rounds": rounds,
        "scenarios": list(raw),
        "sizes": attrs.asdict(sizes),
        "duration_seconds": seconds,
        "environment": env,
        **summary,
        "raw": raw,
    }


def table(doc: dict[str, Any]) -> Table:
    """The results table: scenario, contestant, figure, value, ratio, target, pass/fail."""
    env = doc["environment"]
    out = Table(
        title=(
            f"natrio bench ({doc['mode']}, {doc['timestamp']}): nats-server {env['nats_server']}, "
            f"Python {env['python']}, {env['cpu_count']} CPUs"
        ),
        title_justify="left",
    )
    out.add_column("scenario")
    out.add_column("contestant")
    out.add_column("figure")
    out.add_column("value", justify="right")
    out.add_column("ratio", justify="right")
    out.add_column("target")
    out.add_column("result")
    previous = None
    for row in doc["rows"]:
        if previous is not None and row["scenario"] != previous:
            out.add_section()
        previous = row["scenario"]
        passed = row["passed"]
        result = (
            Text("")
            if passed is None
            else Text("pass", style="green")
            if passed
            else Text("FAIL", style="bold red")
        )
        out.add_row(
            row["scenario"],
            row["contestant"],
            row["figure"],
            row["value"],
            row["ratio"],
            row["target"],
            result,
        )
    return out


# -- the plot --------------------------------------------------------------------------------


def write_plot(doc: dict[str, Any], path: Path) -> bool:
    """Draw the figures to a PNG at ``path``; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    figures = doc["figures"]
    panels = [name for name in ("drain", "roundtrip", "concurrency", "longrun") if name in figures]
    if not panels:
        return False
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7.0 * columns, 4.6 * lines), squeeze=False)
    env = doc["environment"]
    fig.suptitle(
        f"natrio bench ({doc['mode']})\n{doc['timestamp']} · nats-server {env['nats_server']} · "
        f"Python {env['python']} · {env['cpu_count']} CPUs",
        fontsize=10,
    )
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for ax, name in zip(flat, panels, strict=False):
        if name == "drain":
            _plot_drain(ax, figures["drain"], doc["ratios"])
        elif name == "roundtrip":
            _plot_roundtrip(ax, figures["roundtrip"])
        elif name == "concurrency":
            _plot_concurrency(ax, figures["concurrency"])
        else:
            _plot_longrun(ax, figures["longrun"], doc["raw"]["longrun"]["runs"][0])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_drain(ax: Any, drain: dict[str, Any], ratios: dict[str, float]) -> None:
    names = {"A": "baseline A\n(fetch)", "B": "baseline B\n(hand-built pull)", "natrio": "natrio"}
    keys = list(names)
    medians = [drain["median_rate"][key] for key in keys]
    bars = ax.bar(
        [names[key] for key in keys], medians, color=["#9e9e9e", "#616161", "#1e88e5"], zorder=2
    )
    for x, key in enumerate(keys):
        ax.scatter(
            [x] * len(drain["rates"][key]), drain["rates"][key], color="black", s=8, zorder=3
        )
    ax.bar_label(bars, labels=[f"{value:,.0f}" for value in medians], padding=2)
    ax.set_title(
        f"Drain {drain['tasks']:,} tasks: natrio {ratios['drain_natrio_vs_a']:.2f}x A, "
        f"{ratios['drain_natrio_vs_b']:.2f}x B"
    )
    ax.set_ylabel("tasks/s (median over rounds)")
    ax.set_ylim(0, max(rate for key in keys for rate in drain["rates"][key]) * 1.15)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _plot_roundtrip(ax: Any, roundtrip: dict[str, Any]) -> None:
    latency = roundtrip["latency_seconds"]
    labels = [_label(q) for q in PERCENTILES]
    width = 0.38
    for offset, key, color in ((-width / 2, "floor", "#9e9e9e"), (width / 2, "natrio", "#1e88e5")):
        values = [latency[key][label] * 1000 for label in labels]
        bars = ax.bar(
            [i + offset for i in range(len(labels))],
            values,
            width,
            label="floor (request/reply)" if key == "floor" else key,
            color=color,
            zorder=2,
        )
        ax.bar_label(bars, labels=[f"{value:.2f}" for value in values], padding=2, fontsize=7)
    ax.axhline(1.0, color="#e53935", linestyle="--", linewidth=1, label="p50 target 1 ms")
    ax.axhline(5.0, color="#fb8c00", linestyle="--", linewidth=1, label="p99 target 5 ms")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(f"Round trip, {roundtrip['count']:,} sequential submit + result()")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _plot_concurrency(ax: Any, concurrency: dict[str, Any]) -> None:
    sleep = concurrency["sleep"]
    bars = ax.bar(["natrio"], [concurrency["seconds"]], color="#1e88e5", width=0.4, zorder=2)
    ax.bar_label(bars, labels=[f"{concurrency['seconds']:.2f} s"], padding=2)
    ax.axhline(sleep, color="#43a047", linestyle=":", label=f"ideal {sleep:g} s")
    ax.axhline(1.5 * sleep, color="#e53935", linestyle="--", label=f"target {1.5 * sleep:g} s")
    ax.set_xlim(-1, 1)
    ax.set_ylabel("wall time (s)")
    ax.set_title(
        f"Concurrency: {concurrency['tasks']:,} handlers x {sleep:g} s sleep, "
        f"{concurrency['bytes_per_task'] / _KB:.1f} KB per in-flight task"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _plot_longrun(ax: Any, longrun: dict[str, Any], run: dict[str, Any]) -> None:
    tasks = [sample[0] for sample in run["samples"]]
    rss = [sample[1] / _MB for sample in run["samples"]]
    ax.plot(tasks, rss, marker="o", markersize=3, color="#1e88e5")
    ax.axvline(
        longrun["growth_from_task"], color="#9e9e9e", linestyle=":", label="growth measured from"
    )
    ax.set_xlabel("tasks processed")
    ax.set_ylabel("worker RSS (MB)")
    ax.set_ylim(0, max(rss) * 1.15)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"Long run, {longrun['tasks']:,} tasks at {longrun['rate']:,.0f}/s: "
        f"RSS +{longrun['growth_bytes'] / _MB:.1f} MB"
    )
    ax.grid(alpha=0.3)
