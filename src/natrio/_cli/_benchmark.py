"""``natrio bench``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio
from rich.text import Text

from ._app import CommandError, F, cli, count_option, make_console, run, say, seconds_option

# -- natrio bench -------------------------------------------------------------------------


def _scenario_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    from .._bench.scenarios import SCENARIOS

    names = [part.strip() for item in value for part in item.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})"
        )
    # In the bench's own order whatever order they were given in, each once.
    return tuple(name for name in SCENARIOS if name in names) if names else SCENARIOS


def _contestant_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> frozenset[str] | None:
    from .._bench.scenarios import DRAIN_KEYS

    names = {part.strip() for item in value for part in item.split(",") if part.strip()}
    unknown = sorted(names - set(DRAIN_KEYS))
    if unknown:
        raise click.BadParameter(
            f"unknown contestant {', '.join(unknown)} (choose from {', '.join(DRAIN_KEYS)})"
        )
    return frozenset(names) or None


def _process_counts(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[int, ...]:
    counts: set[int] = set()
    for part in (part.strip() for item in value for part in item.split(",")):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise click.BadParameter(f"{part!r} is not a process count (an integer >= 1)")
        counts.add(int(part))
    return tuple(sorted(counts))


def _count_option(name: str, full: int, quick: int, what: str) -> Callable[[F], F]:
    return count_option(
        name, default=None, help=f"{what}. Default: {full:,} ({quick:,} with --quick)."
    )


@cli.command()
@click.option("--quick", is_flag=True, help="Small sizes: a run of well under a minute.")
@click.option(
    "--contestant",
    "contestants",
    multiple=True,
    callback=_contestant_names,
    metavar="KEY[,KEY...]",
    help="Only these drain contestants: A, B, B-same, natrio, faststream, faststream-workers, "
    "taskiq; repeat or comma-separate. Default: all that are installed.",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    callback=_scenario_names,
    metavar="NAME[,NAME...]",
    help="Scenario(s) to run: drain, roundtrip, concurrency, longrun, loss; repeat or "
    "comma-separate. "
    "Default: all.",
)
@count_option(
    "--rounds",
    default=1,
    help="Rounds of drain, roundtrip and concurrency (interleaved; medians are reported). "
    "The long run runs once.",
)
@_count_option("--drain-tasks", 50_000, 3_000, "Tasks each drain contestant works")
@_count_option("--roundtrip-count", 5_000, 300, "Measured round trips per contestant")
@click.option(
    "--roundtrip-warmup",
    type=click.IntRange(min=0),
    default=None,
    help="Round trips before measuring. Default: 200 (50 with --quick).",
)
@_count_option("--sleepers", 2_000, 200, "Sleeping handlers, all at once (the concurrency)")
@seconds_option("--sleep", default=1.0, help="Seconds each sleeping handler sleeps.")
@_count_option("--longrun-tasks", 1_000_000, 20_000, "Tasks through one worker in the long run")
@_count_option("--loss-tasks", 2_000, 500, "Tasks each loss contestant is given")
@seconds_option(
    "--loss-seconds",
    default=None,
    help="Seconds each loss contestant runs without an events stream. Default: 5 (3 with --quick).",
)
@click.option(
    "--natrio-processes",
    "natrio_processes",
    multiple=True,
    callback=_process_counts,
    metavar="N[,N...]",
    help="Also drain with natrio's worker in N processes, as `natrio worker --processes N` "
    "runs them: a contestant natrio-Np for each N (repeat or comma-separate), with its "
    "ratio to natrio-1p. Not in the loss scenario.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, writable=True),
    default="bench-results",
    show_default=True,
    help="Directory for bench.json and bench.png (created if missing).",
)
@click.option(
    "--store-dir",
    type=click.Path(exists=True, file_okay=False, writable=True),
    default=None,
    help="Directory the scenarios' JetStream file stores are made in. Default: the system's "
    "temporary directory (mind a tmpfs there: then the store is in memory).",
)
def bench(
    quick: bool,
    contestants: frozenset[str] | None,
    scenarios: tuple[str, ...],
    rounds: int,
    drain_tasks: int | None,
    roundtrip_count: int | None,
    roundtrip_warmup: int | None,
    sleepers: int | None,
    sleep: float,
    longrun_tasks: int | None,
    loss_tasks: int | None,
    loss_seconds: float | None,
    natrio_processes: tuple[int, ...],
    output: str,
    store_dir: str | None,
) -> None:
    """Measure natrio side by side with nats-py loops, FastStream and taskiq.

    Each scenario starts its own nats-server (file store) and runs its contestants, each
    in its own process, against it with the same tasks: drain (tasks/s, CPU per task,
    peak RSS and the server's CPU of a worker draining a queue; baselines A, a nats-py
    fetch() worker, B, the leanest hand-written nats-py loop, and B-same, that loop
    sending natrio's messages; FastStream and taskiq when installed), roundtrip (latency
    of a submit and its result; floor: nats-py request/reply), concurrency (handlers
    sleeping at once: wall time, memory per task), longrun (RSS of one worker over many
    tasks), loss (tasks each contestant loses when no completion event can be stored).
    Prints a table with natrio's ratios and the targets met or missed, and writes
    bench.json and bench.png to --output. Exits 0 even when a target is missed: it
    measures, it does not test.
    """
    import attrs as _attrs

    from .._bench import scenarios as bench_scenarios

    base = bench_scenarios.QUICK if quick else bench_scenarios.FULL
    overrides: dict[str, float | None] = {
        "drain_tasks": drain_tasks,
        "roundtrip_count": roundtrip_count,
        "roundtrip_warmup": roundtrip_warmup,
        "sleepers": sleepers,
        "longrun_tasks": longrun_tasks,
        "loss_tasks": loss_tasks,
        "loss_seconds": loss_seconds,
    }
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    sizes = _attrs.evolve(base, sleep=sleep, **given)
    customised = any(value is not None for value in overrides.values()) or sleep != base.sleep
    mode = ("quick" if quick else "full") + (", custom sizes" if customised else "")
    config = bench_scenarios.BenchConfig(
        scenarios=scenarios,
        sizes=sizes,
        rounds=rounds,
        store_dir=store_dir,
        contestants=contestants,
        natrio_processes=natrio_processes,
    )
    command = " ".join([os.path.basename(sys.argv[0]) or "natrio", *sys.argv[1:]])
    doc = run(_bench, config, mode, command)
    _report_bench(doc, Path(output))


async def _bench(config: Any, mode: str, command: str) -> dict[str, Any]:
    from .._bench import report
    from .._bench.scenarios import BenchError, run_bench

    started = time.time()
    clock = time.perf_counter()
    env = await report.environment()
    stopped_by: list[str] = []
    raw: dict[str, Any] = {}
    # A signal cancels the run, so its contestants and servers are stopped on the way out
    # rather than left running (SIGTERM would otherwise end this process on the spot).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped_by.append(signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            with report.RichProgress(make_console(stderr=True)) as progress:
                try:
                    raw = await run_bench(config, progress)
                except BenchError as exc:
                    raise CommandError(f"natrio bench: {exc}") from None
            nursery.cancel_scope.cancel()
    if stopped_by:
        raise CommandError(
            f"natrio bench: stopped by {stopped_by[0]}; nothing written",
            130 if stopped_by[0] == "SIGINT" else 143,
        )
    return report.document(
        raw=raw,
        summary=report.summarize(raw, config.sizes),
        sizes=config.sizes,
        rounds=config.rounds,
        mode=mode,
        command=command,
        env=env,
        started=started,
        seconds=time.perf_counter() - clock,
    )


def _report_bench(doc: dict[str, Any], directory: Path) -> None:
    from .._bench import report

    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    console = make_console()
    console.print(report.table(doc))
    ratios = doc["ratios"]
    shown = [
        f"{what} "
        + ", ".join(
            f"natrio/{name[len(prefix) :]} {value:.2f}x"
            for name, value in ratios.items()
            if name.startswith(prefix)
        )
        for what, prefix in (
            ("drain", "drain_natrio_vs_"),
            ("round-trip p50", "roundtrip_p50_natrio_vs_"),
        )
        if any(name.startswith(prefix) for name in ratios)
    ]
    skipped = doc.get("skipped") or []
    if skipped:
        console.print(
            Text(
                f"skipped (not installed): {', '.join(skipped)}; "
                "pip install 'natrio[bench]' adds them",
                style="yellow",
            )
        )
    if shown:
        console.print(Text("ratios: " + "; ".join(shown)))
    missed = [target for target in doc["targets"] if not target["passed"]]
    if missed:
        console.print(
            Text(
                f"targets missed ({len(missed)} of {len(doc['targets'])}): "
                + "; ".join(f"{t['scenario']} {t['figure']} {t['target']}" for t in missed),
                style="bold red",
            )
        )
    elif doc["targets"]:
        met = len(doc["targets"])
        console.print(Text(f"all {met} target{'s' if met > 1 else ''} met", style="green"))
    plot_path = directory / "bench.png"
    if report.write_plot(doc, plot_path):
        say(f"wrote {json_path} and {plot_path}")
    else:
        say(f"wrote {json_path}; {report.PLOT_HINT}")
