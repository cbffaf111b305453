"""``natrio bench`` end to end, at tiny sizes, against the real nats-servers it starts.

Only the shape of what it writes is checked, never a timing: the bench measures, and a
shared CI machine's figures say nothing about correctness.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from natrio._bench import report, scenarios
from natrio._cli import cli

TINY = (
    "--quick",
    "--drain-tasks",
    "200",
    "--roundtrip-count",
    "50",
    "--roundtrip-warmup",
    "10",
    "--sleepers",
    "20",
    "--sleep",
    "0.5",
    "--longrun-tasks",
    "2000",
    "--loss-tasks",
    "100",
    "--loss-seconds",
    "1",
)

# The peers run when their libraries are installed (the bench extra), else are skipped.
FASTSTREAM = scenarios.peer_available("faststream")
TASKIQ = scenarios.peer_available("taskiq")

FIGURES = {
    "drain": {"tasks", "median_rate", "rates", "contestants"},
    "roundtrip": {"count", "latency_seconds"},
    "concurrency": {"tasks", "sleep", "seconds", "bytes_per_task", "peak_in_flight"},
    "longrun": {"tasks", "rate", "rss_bytes", "growth_from_task", "growth_bytes"},
    "loss": {"tasks", "seconds", "lost", "kept"},
}
DRAIN = (
    {"A", "B", "B-same", "natrio"}
    | ({"faststream", "faststream-workers"} if FASTSTREAM else set())
    | ({"taskiq"} if TASKIQ else set())
)
ROUNDTRIP = (
    {"floor", "natrio"}
    | ({"faststream"} if FASTSTREAM else set())
    | ({"taskiq"} if TASKIQ else set())
)
PEER_RATIOS = {
    f"{kind}_natrio_vs_{peer}"
    for peer, present in (("faststream", FASTSTREAM), ("taskiq", TASKIQ))
    if present
    for kind in ("drain", "roundtrip_p50", "roundtrip_p99", "roundtrip_p99.9")
}
RATIOS = {
    "drain_natrio_vs_a",
    "drain_natrio_vs_b",
    "drain_natrio_vs_b_same",
    "drain_cpu_natrio_vs_b",
    "roundtrip_p50_natrio_vs_floor",
    "roundtrip_p99_natrio_vs_floor",
    "roundtrip_p99.9_natrio_vs_floor",
} | PEER_RATIOS
TARGETS = (
    {
        "drain_vs_a",
        "drain_vs_b",
        "drain_vs_b_same",
        "drain_cpu_vs_b",
        "roundtrip_p50",
        "roundtrip_p99",
        "roundtrip_p50_vs_floor",
        "concurrency_wall",
        "concurrency_memory",
        "longrun_growth",
        "loss_natrio",
    }
    | (
        {"drain_vs_faststream", "roundtrip_p50_vs_faststream", "roundtrip_p99_vs_faststream"}
        if FASTSTREAM
        else set()
    )
    | ({"drain_vs_taskiq", "roundtrip_p50_vs_taskiq"} if TASKIQ else set())
)


def bench(*args: str) -> Result:
    """Run ``natrio bench ARGS`` in-process and check it exited 0."""
    result = CliRunner().invoke(cli, ["bench", *args], catch_exceptions=True)
    assert result.exit_code == 0, (result.exception, result.stdout, result.stderr)
    return result


def finite(value: object) -> bool:
    """Whether ``value`` is a real, finite number."""
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.slow
def test_every_scenario_writes_every_figure_ratio_and_target(tmp_path: Path) -> None:
    result = bench(*TINY, "--output", str(tmp_path))
    doc = json.loads((tmp_path / "bench.json").read_text())

    assert doc["scenarios"] == ["drain", "roundtrip", "concurrency", "longrun", "loss"]
    for scenario, keys in FIGURES.items():
        assert keys <= set(doc["figures"][scenario]), scenario
    assert set(doc["figures"]["drain"]["median_rate"]) == DRAIN
    for key, figures in doc["figures"]["drain"]["contestants"].items():
        assert finite(figures["cpu_us_per_task"]), key
        assert figures["rss_peak_bytes"] > 0, key
    assert set(doc["figures"]["roundtrip"]["latency_seconds"]) == ROUNDTRIP
    # No events stream: natrio keeps every task it could not record.
    assert doc["figures"]["loss"]["lost"]["natrio"] == 0
    assert set(doc["figures"]["loss"]["lost"]) == DRAIN
    assert set(doc["skipped"]) == {
        peer for peer, present in (("faststream", FASTSTREAM), ("taskiq", TASKIQ)) if not present
    }
    for contestant in ROUNDTRIP:
        latency = doc["figures"]["roundtrip"]["latency_seconds"][contestant]
        assert {"p50", "p90", "p99", "p99.9"} <= set(latency)
        assert all(finite(value) and value > 0 for value in latency.values())
        assert len(doc["raw"]["roundtrip"]["runs"][contestant][0]["latencies"]) == 50
    assert doc["figures"]["concurrency"]["peak_in_flight"] == 20
    assert finite(doc["figures"]["concurrency"]["bytes_per_task"])
    samples = doc["raw"]["longrun"]["runs"][0]["samples"]
    assert samples[0][0] == 0
    assert samples[-1][0] >= 2000
    assert set(doc["ratios"]) == RATIOS
    assert all(finite(value) and value > 0 for value in doc["ratios"].values())
    assert {target["id"] for target in doc["targets"]} == TARGETS
    assert all(isinstance(target["passed"], bool) for target in doc["targets"])

    environment = doc["environment"]
    assert environment["nats_server"]
    assert environment["cpu_count"]
    assert environment["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"natrio", "trio", "nats-py"} <= set(environment["packages"])
    assert doc["command"]
    assert doc["timestamp"]

    assert "ratios: drain natrio/a" in result.stdout
    assert "targets missed" in result.stdout or "targets met" in result.stdout
    if doc["environment"]["packages"]["matplotlib"]:
        assert (tmp_path / "bench.png").stat().st_size > 0
    else:
        assert "pip install 'natrio[bench]'" in result.stderr


@pytest.mark.slow
def test_rounds_interleave_the_drain_contestants(tmp_path: Path) -> None:
    bench(
        "--scenario",
        "drain",
        "--contestant",
        "A,B,natrio",
        "--rounds",
        "2",
        "--drain-tasks",
        "100",
        "--output",
        str(tmp_path),
    )
    doc = json.loads((tmp_path / "bench.json").read_text())

    assert doc["scenarios"] == ["drain"]
    assert doc["raw"]["drain"]["order"] == ["A", "B", "natrio", "A", "B", "natrio"]
    assert all(len(doc["figures"]["drain"]["rates"][key]) == 2 for key in ("A", "B", "natrio"))
    assert {target["id"] for target in doc["targets"]} == {
        "drain_vs_a",
        "drain_vs_b",
        "drain_cpu_vs_b",
    }


@pytest.mark.slow
def test_natrio_processes_add_a_drain_contestant_per_process_count(tmp_path: Path) -> None:
    bench(
        "--scenario",
        "drain",
        "--contestant",
        "natrio",
        "--natrio-processes",
        "2,1",
        "--drain-tasks",
        "200",
        "--output",
        str(tmp_path),
    )
    doc = json.loads((tmp_path / "bench.json").read_text())

    # Right after natrio's own contestant, in increasing order; each did all the tasks
    # exactly once (the bench checks acks and completion events after every contestant).
    assert doc["raw"]["drain"]["order"] == ["natrio", "natrio-1p", "natrio-2p"]
    (run,) = doc["raw"]["drain"]["runs"]["natrio-2p"]
    assert run["processes"] == 2
    assert len(run["children"]) == 2
    assert sum(child["processed"] for child in run["children"]) >= 200
    assert run["rss_peak"] == sum(child["rss_peak"] for child in run["children"])
    assert finite(doc["ratios"]["drain_natrio_2p_vs_1p"])
    assert finite(doc["figures"]["drain"]["contestants"]["natrio-2p"]["cpu_us_per_task"])


def test_a_process_count_below_one_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["bench", "--natrio-processes", "2,0"])
    assert result.exit_code == 2
    assert "'0' is not a process count" in result.stderr


def test_an_unknown_contestant_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["bench", "--contestant", "natrio,celery"])
    assert result.exit_code == 2
    assert "unknown contestant celery" in result.stderr


def test_unknown_scenario_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["bench", "--scenario", "drain,nope"])
    assert result.exit_code == 2
    assert "unknown scenario nope" in result.stderr


def test_without_matplotlib_there_is_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    doc = {"figures": {"drain": {}}, "environment": {}, "mode": "quick", "timestamp": ""}
    assert report.write_plot(doc, tmp_path / "bench.png") is False
    assert not (tmp_path / "bench.png").exists()


def test_percentile_interpolates() -> None:
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile([5.0], 99.9) == 5.0
    assert report.percentile(list(map(float, range(101))), 99) == 99.0
    assert math.isnan(report.percentile([], 50))
