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
import re
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


#: Drain targets: (target id, contestant key, the least natrio/contestant rate, shown as).
_DRAIN_TARGETS = (
    ("drain_vs_a", "A", 3.0, "≥ 3x A"),
    ("drain_vs_b", "B", 1.0, "≥ 1x B"),
    ("drain_vs_b_same", "B-same", 1.5, "≥ 1.5x B-same"),
    ("drain_vs_faststream", "faststream*", 4.0, "≥ 4x FastStream"),
    ("drain_vs_taskiq", "taskiq", 4.0, "≥ 4x taskiq"),
)


def _per_task(run: dict[str, Any], key: str, scale: float = 1.0) -> float:
    value = run.get(key)
    return value / run["tasks"] * scale if value is not None and run.get("tasks") else math.nan


def _median(values: Sequence[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return statistics.median(kept) if kept else math.nan


_PROCESSES_KEY = re.compile(r"natrio-(\d+)p")


def _process_scaling(
    rates: dict[str, list[float]], names: dict[str, str]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """natrio's worker in N processes against 1 (``natrio-1p``, else the in-process
    ``natrio``): the median of each round's ratio, a figure without a target."""
    base = "natrio-1p" if "natrio-1p" in rates else "natrio" if "natrio" in rates else None
    ratios: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    if base is None:
        return ratios, rows
    for key, theirs in rates.items():
        match = _PROCESSES_KEY.fullmatch(key)
        if match is None or key == base:
            continue
        ratio = _paired_ratio(theirs, rates[base])
        ratios[f"drain_natrio_{match[1]}p_vs_{base.replace('natrio-', '')}"] = ratio
        shown = f"{ratio:.2f}x {names.get(base, base)}"
        rows.append(_row("drain", names.get(key, key), "tasks/s", f"{_median(theirs):,.0f}", shown))
    return ratios, rows


def _drain_summary(
    drain: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float], list[_Target], list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {k: v for k, v in drain["runs"].items() if v}
    names: dict[str, str] = drain.get("names") or {key: key for key in runs}
    rates = {key: [run["rate"] for run in runs[key]] for key in runs}
    per_key: dict[str, dict[str, float]] = {}
    for key, key_runs in runs.items():
        per_key[key] = {
            "rate": statistics.median(rates[key]),
            "cpu_us_per_task": _median([_per_task(r, "cpu_seconds", 1e6) for r in key_runs]),
            "server_cpu_us_per_task": _median(
                [_per_task(r, "server_cpu_seconds", 1e6) for r in key_runs]
            ),
            "server_msgs_per_task": _median(
                [_per_task(r, "server_msgs_in") + _per_task(r, "server_msgs_out") for r in key_runs]
            ),
            "rss_peak_bytes": max(float(r.get("rss_peak", math.nan)) for r in key_runs),
        }
    figures = {
        "tasks": drain["tasks"],
        "median_rate": {key: value["rate"] for key, value in per_key.items()},
        "rates": rates,
        "contestants": per_key,
        "skipped": drain.get("skipped", []),
    }
    ratios: dict[str, float] = {}
    targets: list[_Target] = []
    rows: list[dict[str, Any]] = []
    scaling, scaling_rows = _process_scaling(rates, names)
    ratios.update(scaling)
    if "natrio" not in runs:
        for key, value in per_key.items():
            rows.append(_row("drain", names.get(key, key), "tasks/s", f"{value['rate']:,.0f}"))
        return figures, ratios, targets, rows + scaling_rows
    ours = rates["natrio"]
    found: dict[str, tuple[_Target, str]] = {}
    for target_id, key, limit, shown in _DRAIN_TARGETS:
        if key.endswith("*"):
            # The best of a peer's variants, round by round.
            variants = [k for k in runs if k.startswith(key[:-1])]
            if not variants:
                continue
            theirs = [max(rates[k][i] for k in variants) for i in range(len(ours))]
            label = "FastStream (best variant)"
        elif key in runs:
            theirs = rates[key]
            label = names.get(key, key)
        else:
            continue
        ratio = _paired_ratio(ours, theirs)
        ratios[f"drain_natrio_vs_{key.rstrip('*').replace('-', '_').lower()}"] = ratio
        target = _Target(target_id, "drain", f"tasks/s ÷ {label}", ratio, ">=", limit, shown)
        targets.append(target)
        found[target_id] = (target, label)
    if "B" in per_key:
        cpu_ratio = _ratio(per_key["natrio"]["cpu_us_per_task"], per_key["B"]["cpu_us_per_task"])
        ratios["drain_cpu_natrio_vs_b"] = cpu_ratio
        cpu = _Target("drain_cpu_vs_b", "drain", "CPU per task ÷ B", cpu_ratio, "<=", 1.0, "≤ B's")
        targets.append(cpu)
        found["drain_cpu_vs_b"] = (cpu, "B")
    for key, value in per_key.items():
        name = names.get(key, key)
        rows.append(
            _row(
                "drain",
                name,
                "tasks/s · CPU µs/task · server CPU µs/task · msgs/task · peak RSS",
                f"{value['rate']:,.0f} · {value['cpu_us_per_task']:.0f} · "
                f"{value['server_cpu_us_per_task']:.0f} · {value['server_msgs_per_task']:.1f} · "
                f"{value['rss_peak_bytes'] / _MB:.0f} MB",
            )
        )
    natrio_rate = f"{per_key['natrio']['rate']:,.0f}"
    for target, label in found.values():
        if target.id == "drain_cpu_vs_b":
            shown = f"{per_key['natrio']['cpu_us_per_task']:.0f} µs"
            rows.append(
                _row("drain", "natrio", "CPU per task", shown, f"{target.value:.2f}x B", target)
            )
        else:
            rows.append(
                _row(
                    "drain",
                    "natrio",
                    "tasks/s",
                    natrio_rate,
                    f"{target.value:.2f}x {label}",
                    target,
                )
            )
    return figures, ratios, targets, rows + scaling_rows


#: Round-trip targets: (id, contestant, percentile, the most natrio's may be of theirs).
_ROUNDTRIP_TARGETS = (
    ("roundtrip_p50_vs_faststream", "faststream", "p50", 0.6, "≤ 0.6x FastStream"),
    ("roundtrip_p50_vs_taskiq", "taskiq", "p50", 0.5, "≤ 0.5x taskiq"),
    ("roundtrip_p99_vs_faststream", "faststream", "p99", 1.0, "≤ FastStream's"),
)


def _roundtrip_summary(
    roundtrip: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float], list[_Target], list[dict[str, Any]]]:
    runs = {key: value for key, value in roundtrip["runs"].items() if value}
    names: dict[str, str] = roundtrip.get("names") or {}
    latency: dict[str, dict[str, float]] = {}
    for key, key_runs in runs.items():
        per_round = [run["latencies"] for run in key_runs]
        summary = {
            _label(q): statistics.median(percentile(values, q) for values in per_round)
            for q in PERCENTILES
        }
        summary["mean"] = statistics.median(statistics.fmean(v) for v in per_round if v)
        summary["max"] = statistics.median(max(v) for v in per_round if v)
        latency[key] = summary
    figures = {
        "count": roundtrip["count"],
        "latency_seconds": latency,
        "skipped": roundtrip.get("skipped", []),
    }
    ratios: dict[str, float] = {}
    targets: list[_Target] = []
    rows: list[dict[str, Any]] = []
    floor, ours = latency["floor"], latency["natrio"]
    for q in ("p50", "p99", "p99.9"):
        ratios[f"roundtrip_{q}_natrio_vs_floor"] = _ratio(ours[q], floor[q])
    for key in runs:
        if key in ("floor", "natrio"):
            continue
        for q in ("p50", "p99", "p99.9"):
            ratios[f"roundtrip_{q}_natrio_vs_{key}"] = _ratio(ours[q], latency[key][q])
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
    for key, summary in latency.items():
        if key == "natrio":
            continue
        shown = " · ".join(f"{summary[q] * 1000:.3f}" for q in ("p50", "p99", "p99.9"))
        name = "floor (request/reply)" if key == "floor" else names.get(key, key)
        rows.append(_row("roundtrip", name, "p50 · p99 · p99.9", f"{shown} ms"))
    for q, target in (("p50", p50), ("p50", p50_ratio), ("p99", p99), ("p99.9", None)):
        ratio = f"{ratios[f'roundtrip_{q}_natrio_vs_floor']:.1f}x floor"
        rows.append(_row("roundtrip", "natrio", q, f"{ours[q] * 1000:.3f} ms", ratio, target))
    for target_id, key, q, limit, shown in _ROUNDTRIP_TARGETS:
        if key not in latency:
            continue
        value = ratios[f"roundtrip_{q}_natrio_vs_{key}"]
        target = _Target(
            target_id, "roundtrip", f"{q} ÷ {names.get(key, key)}'s", value, "<=", limit, shown
        )
        targets.append(target)
        rows.append(
            _row(
                "roundtrip",
                "natrio",
                q,
                f"{ours[q] * 1000:.3f} ms",
                f"{value:.2f}x {names.get(key, key)}",
                target,
            )
        )
    return figures, ratios, targets, rows


def summarize(raw: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Medians, ratios, targets and table rows from ``run_bench``'s raw figures."""
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    targets: list[_Target] = []
    rows: list[dict[str, Any]] = []

    if "drain" in raw:
        drain_figures, drain_ratios, drain_targets, drain_rows = _drain_summary(raw["drain"])
        figures["drain"] = drain_figures
        ratios.update(drain_ratios)
        targets += drain_targets
        rows += drain_rows

    if "roundtrip" in raw:
        rt_figures, rt_ratios, rt_targets, rt_rows = _roundtrip_summary(raw["roundtrip"])
        figures["roundtrip"] = rt_figures
        ratios.update(rt_ratios)
        targets += rt_targets
        rows += rt_rows

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

    if "loss" in raw:
        loss = raw["loss"]
        names = loss.get("names") or {}
        figures["loss"] = {
            "tasks": loss["tasks"],
            "seconds": loss["seconds"],
            "lost": {key: run["lost"] for key, run in loss["runs"].items()},
            "kept": {key: run["kept"] for key, run in loss["runs"].items()},
        }
        for key, run in loss["runs"].items():
            target = None
            if key == "natrio":
                target = _Target(
                    "loss_natrio", "loss", "tasks lost", run["lost"], "<=", 0, "none lost"
                )
                targets.append(target)
            rows.append(
                _row(
                    "loss",
                    names.get(key, key),
                    f"lost · kept of {run['published']:,}, events stream deleted",
                    f"{run['lost']:,} · {run['kept']:,}",
                    run["ended"],
                    target,
                )
            )

    skipped = {peer for scenario in raw.values() for peer in scenario.get("skipped", [])}
    return {
        "figures": figures,
        "ratios": ratios,
        "targets": [target.as_dict() for target in targets],
        "rows": rows,
        "skipped": sorted(skipped),
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
    keys = list(drain["median_rate"])
    medians = [drain["median_rate"][key] for key in keys]
    colors = ["#1e88e5" if key.startswith("natrio") else "#9e9e9e" for key in keys]
    bars = ax.bar(keys, medians, color=colors, zorder=2)
    for x, key in enumerate(keys):
        ax.scatter(
            [x] * len(drain["rates"][key]), drain["rates"][key], color="black", s=8, zorder=3
        )
    ax.bar_label(bars, labels=[f"{value:,.0f}" for value in medians], padding=2, fontsize=7)
    shown = ", ".join(
        f"{value:.2f}x {name[len('drain_natrio_vs_') :]}"
        for name, value in ratios.items()
        if name.startswith("drain_natrio_vs_")
    )
    ax.set_title(f"Drain {drain['tasks']:,} tasks: natrio {shown}", fontsize=8)
    ax.set_ylabel("tasks/s (median over rounds)")
    ax.set_ylim(0, max(rate for key in keys for rate in drain["rates"][key]) * 1.15)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _plot_roundtrip(ax: Any, roundtrip: dict[str, Any]) -> None:
    latency = roundtrip["latency_seconds"]
    labels = [_label(q) for q in PERCENTILES]
    keys = list(latency)
    width = 0.8 / len(keys)
    palette = {"floor": "#9e9e9e", "natrio": "#1e88e5"}
    others = iter(["#fb8c00", "#8e24aa", "#43a047", "#6d4c41"])
    for index, key in enumerate(keys):
        offset = (index - (len(keys) - 1) / 2) * width
        values = [latency[key][label] * 1000 for label in labels]
        bars = ax.bar(
            [i + offset for i in range(len(labels))],
            values,
            width,
            label="floor (request/reply)" if key == "floor" else key,
            color=palette.get(key) or next(others),
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
