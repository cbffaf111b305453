"""The public surface is exactly what natrio/__init__ exports, and all of it is documented."""

from __future__ import annotations

import natrio


def test_all_names_exist_and_have_docstrings() -> None:
    for name in natrio.__all__:
        obj = getattr(natrio, name)
        if name in ("__version__", "converter"):
            continue
        assert obj.__doc__, f"natrio.{name} has no docstring"


def test_no_private_module_leaks_into_all() -> None:
    public = {n for n in dir(natrio) if n.isidentifier() and not n.startswith("_")}
    modules = {name for name in public if type(getattr(natrio, name)).__name__ == "module"}
    # Submodules imported as a side effect are not part of the surface, except the plugin.
    assert set(natrio.__all__) - {"__version__"} == public - modules
    assert modules <= {"testing", "middleware", "otel"}


def test_observing_names_are_exported() -> None:
    # What `natrio events`, `natrio stats` and worker.statistics() hand out (docs/operating.md).
    for name in (
        "EventRates",
        "Overview",
        "QueueStatistics",
        "RunEvent",
        "RunHistory",
        "TaskTypeStatistics",
    ):
        assert name in natrio.__all__


def test_dead_letter_names_are_exported() -> None:
    # What Client.dead_letters hands out, and the client's dead-letter calls (docs/concepts.md).
    assert {"DeadLetter", "DeadLetterReader"} <= set(natrio.__all__)
    for method in (
        "dead_letters",
        "dead_letter",
        "dead_letter_input",
        "replay",
        "purge_dead_letters",
    ):
        assert getattr(natrio.Client, method).__doc__, method


def test_scheduling_names_are_exported() -> None:
    # What client.schedule() and client.schedules() hand out (docs/schedules.md).
    assert "Schedule" in natrio.__all__
    assert natrio.Schedule.__module__ == "natrio._schedules"
