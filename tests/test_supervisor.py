"""``natrio worker --processes N``: the restart policy alone, then real supervisors.

The supervisor tests run ``python -m natrio worker tests.supervisor_app:... --processes
N`` against a real nats-server, read its output (stdout and stderr merged) as it comes,
and act on its processes with real signals.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

import natrio
from natrio._cli import cli
from natrio._errors import SupervisorError
from natrio._supervisor import (
    RestartPolicy,
    SlotHistory,
    Supervisor,
    cpu_count,
    describe_exit,
)

from .helpers import event_counts, eventually
from .procs import REPO_ROOT, WorkerProcess

PROCESS_STARTED = re.compile(r"^worker process (\d+) started \(pid (\d+)\)$")
WORKER_STARTED = re.compile(r"^\[(\d+)\] worker (\S+) started: ")
APP = "tests.supervisor_app"


# -- the policy, without processes ---------------------------------------------------------


def test_delays_double_up_to_the_cap() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=5.0, factor=2.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(10_000) == 5.0  # no overflow however long the run of exits


def test_exits_after_ready_back_off_and_never_give_up() -> None:
    policy = RestartPolicy(first_delay=1.0, max_delay=8.0, max_start_failures=2)
    history = SlotHistory()
    delays = []
    for _ in range(6):
        history, delay = policy.after_exit(history, ready_for=1.0)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert history == SlotHistory(exits=6, start_failures=0)


def test_a_healthy_run_starts_the_backoff_over() -> None:
    policy = RestartPolicy(first_delay=1.0, max_delay=60.0, healthy_after=30.0)
    history = SlotHistory(exits=4, start_failures=0)
    history, delay = policy.after_exit(history, ready_for=29.0)
    assert delay == 16.0
    history, delay = policy.after_exit(history, ready_for=30.0)
    assert (history, delay) == (SlotHistory(exits=1, start_failures=0), 1.0)


def test_gives_up_after_start_failures_in_a_row() -> None:
    policy = RestartPolicy(first_delay=0.5, max_start_failures=3)
    history, delay = policy.after_exit(SlotHistory(), ready_for=None)
    assert delay == 0.5
    history, delay = policy.after_exit(history, ready_for=None)
    assert delay == 1.0
    history, delay = policy.after_exit(history, ready_for=None)
    assert delay is None
    assert history.start_failures == 3


def test_a_ready_process_resets_the_start_failures() -> None:
    policy = RestartPolicy(max_start_failures=2)
    history, _ = policy.after_exit(SlotHistory(), ready_for=None)
    history, delay = policy.after_exit(history, ready_for=0.1)
    assert delay is not None
    assert history.start_failures == 0
    history, delay = policy.after_exit(history, ready_for=None)
    assert delay is not None  # one failure in a row, not two
    _, delay = policy.after_exit(history, ready_for=None)
    assert delay is None


def test_one_start_failure_allowed_gives_up_at_once() -> None:
    _, delay = RestartPolicy(max_start_failures=1).after_exit(SlotHistory(), ready_for=None)
    assert delay is None


@pytest.mark.parametrize(
    "options",
    [
        {"first_delay": 0},
        {"first_delay": -1.0},
        {"max_delay": float("inf")},
        {"first_delay": 2.0, "max_delay": 1.0},
        {"factor": 0.5},
        {"max_start_failures": 0},
        {"max_start_failures": True},
        {"healthy_after": float("nan")},
    ],
)
def test_invalid_policies_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(natrio.ConfigurationError):
        RestartPolicy(**options)  # type: ignore[arg-type]


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


def test_auto_is_the_usable_cpu_count() -> None:
    assert 1 <= cpu_count() <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "must be at least 1"), ("-2", "must be at least 1"), ("many", "neither a number")],
)
def test_invalid_process_counts_exit_2(value: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["worker", f"{APP}:make_worker", "--processes", value])
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert message in result.stderr


def test_auto_is_accepted_and_the_spec_is_checked_before_any_process_starts() -> None:
    # "auto" parses; the spec is refused here, before a process is started or a server tried.
    result = CliRunner().invoke(
        cli, ["worker", f"{APP}:no_such_factory", "--processes", "auto", "--url", "nats://x:1"]
    )
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert "has no attribute 'no_such_factory'" in result.stderr


# -- the supervisor with stand-in processes -----------------------------------------------

# Ignores SIGTERM; its ready line comes after output left without a newline.
STUBBORN = """
import json, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdout.write("no newline before the ready line")
print("NATRIO-SUPERVISED-READY " + json.dumps({"worker_id": "stubborn", "grace": 0.5}))
print("serving", flush=True)
time.sleep(60)
"""


async def test_a_process_still_running_after_its_grace_and_the_margin_is_killed() -> None:
    lines: list[tuple[int, str, bool]] = []
    told: list[str] = []
    serving = trio.Event()

    def output(index: int, line: str, stderr: bool) -> None:
        lines.append((index, line, stderr))
        if line == "serving":
            serving.set()

    supervisor = Supervisor(
        lambda index: [sys.executable, "-c", STUBBORN],
        1,
        kill_margin=0.5,
        output=output,
        tell=told.append,
    )

    stop_at: list[float] = []

    async def stop_once_serving() -> None:
        await serving.wait()
        stop_at.append(trio.current_time())
        supervisor.stop()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_once_serving)
            with pytest.raises(SupervisorError, match=r"did not stop within 1 s and was killed"):
                await supervisor.run()
            stopped_at = trio.current_time()
    # The partial line was passed on; the ready line was not, but was understood.
    assert lines == [(0, "no newline before the ready line", False), (0, "serving", False)]
    (slot,) = supervisor.statistics()
    assert slot.worker_id == "stubborn"
    assert slot.pid is None  # killed and reaped
    assert any("still running 1 s after SIGTERM; killing it" in message for message in told)
    # Killed once its grace (0.5 s, from its ready line) and the margin (0.5 s) had passed.
    assert 1.0 <= stopped_at - stop_at[0] < 3.0


async def test_a_command_that_cannot_start_is_given_up_at_once() -> None:
    supervisor = Supervisor(lambda index: ["/nonexistent/natrio-worker"], 2, tell=lambda m: None)
    with (
        trio.fail_after(10),
        pytest.raises(SupervisorError, match="could not start worker process"),
    ):
        await supervisor.run()


# -- real supervisors ----------------------------------------------------------------------


class Supervised:
    """A ``natrio worker --processes N`` process and what it printed."""

    def __init__(self, out: WorkerProcess) -> None:
        self.out = out
        self.process = out.process

    def pids(self) -> dict[int, int]:
        """The pid each process index was last started with."""
        found: dict[int, int] = {}
        for line in self.out.lines:
            if match := PROCESS_STARTED.match(line):
                found[int(match[1])] = int(match[2])
        return found

    async def started(self, index: int, *, after: int = 0) -> tuple[int, str]:
        """(line number, worker id) of process ``index``'s next "started" line."""

        def accept(line: str) -> bool:
            match = WORKER_STARTED.match(line)
            return match is not None and int(match[1]) == index

        at = await self.out.line(accept, after=after)
        match = WORKER_STARTED.match(self.out.lines[at])
        assert match is not None
        return at, match[2]

    async def all_started(self, processes: int) -> dict[int, str]:
        """The worker id of each process, once every one has started."""
        return {index: (await self.started(index))[1] for index in range(processes)}

    async def exit_status(self, within: float) -> int:
        """The supervisor's exit status, which must come within ``within`` s."""
        with trio.fail_after(within):
            status = await self.process.wait()
            await self.out.ended.wait()
        return status


def is_our_child(pid: int) -> bool:
    """Whether ``pid`` is (still) a worker process of these tests, not a reused pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"--supervised" in cmdline and APP.encode() in cmdline


@asynccontextmanager
async def supervisor(url: str, factory: str, *args: str) -> AsyncIterator[Supervised]:
    """``python -m natrio worker tests.supervisor_app:FACTORY --url URL ARGS``; on the way
    out it is killed if still running, and so is any worker process it left."""
    env = {k: v for k, v in os.environ.items() if k != "NATRIO_URL"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "natrio", "worker", f"{APP}:{factory}", "--url", url, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
    )
    out = WorkerProcess(process, "supervisor")
    supervised = Supervised(out)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.read)
            try:
                yield supervised
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    # A test that failed half-way may leave its workers behind.
                    for pid in supervised.pids().values():
                        if is_our_child(pid):
                            with suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                nursery.cancel_scope.cancel()
    finally:
        assert process.stdout is not None
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()


async def completed_counts(nc: natrio.Connection, task_type: str) -> dict[str, int]:
    """How many completed events each run of ``task_type`` has (its subject's run id)."""
    counts = await event_counts(nc, "completed")
    prefix = f"natrio.event.{task_type}."
    return {s.split(".")[3]: n for s, n in counts.items() if s.startswith(prefix)}


async def test_two_processes_both_serve(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    async with supervisor(natrio_server.url, "make_worker", "--processes", "2") as sup:
        with trio.fail_after(30):
            ids = await sup.all_started(2)
        assert len(set(ids.values())) == 2
        assert set(sup.pids()) == {0, 1}
        client = natrio.Client(natrio_connection)
        handles = [await client.submit("sup-work", run_id=f"two-{i}") for i in range(100)]
        with trio.fail_after(30):
            completed_by = {await handle.worker() for handle in handles}
            indexes = {await handle.result() for handle in handles}
        # Tasks were completed by both processes, and each knows its own index.
        assert completed_by == set(ids.values())
        assert indexes == {b"0", b"1"}
        sup.process.send_signal(signal.SIGTERM)
        assert await sup.exit_status(within=10 + 5) == 0
    assert set((await completed_counts(natrio_connection, "sup-work")).values()) == {1}


async def test_a_killed_process_is_started_again_and_no_task_is_lost(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    client = natrio.Client(natrio_connection)
    async with supervisor(
        natrio_server.url, "make_worker", "--processes", "2", "--grace", "2"
    ) as sup:
        with trio.fail_after(30):
            ids = await sup.all_started(2)
        victim = sup.pids()[0]
        handles = [await client.submit("sup-work", run_id=f"kill-{i}") for i in range(200)]
        # Killed while tasks are queued and running in both processes: what it held comes
        # back to the other one after ack_wait (2 s).
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            died = await sup.out.line(
                f"worker process 0 (pid {victim}) was killed by SIGKILL; starting it again in"
            )
            _, restarted = await sup.started(0, after=died)
        assert restarted not in ids.values()
        assert sup.pids()[0] != victim
        assert not is_our_child(victim)
        # The new process serves: tasks submitted now are completed by it too.
        handles += [await client.submit("sup-work", run_id=f"after-{i}") for i in range(100)]
        with trio.fail_after(60):
            completed_by = [await handle.worker() for handle in handles]
        assert restarted in completed_by[200:]
        assert ids[1] in completed_by[200:]
        sup.process.send_signal(signal.SIGTERM)
        assert await sup.exit_status(within=2 + 10) == 0
    # Every task completed exactly once: no task lost, none completed twice.
    counts = await completed_counts(natrio_connection, "sup-work")
    assert len(counts) == 300
    assert set(counts.values()) == {1}


async def test_sigterm_stops_every_process_within_the_grace(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    grace = 3.0
    client = natrio.Client(natrio_connection)
    async with supervisor(
        natrio_server.url, "make_worker", "--processes", "2", "--grace", str(grace)
    ) as sup:
        with trio.fail_after(30):
            ids = await sup.all_started(2)
        pids = sup.pids()
        # Each process holds at most 4 (its prefetch), so 8 tasks keep both busy.
        handles = [await client.submit("sup-slow", run_id=f"slow-{i}") for i in range(8)]
        with trio.fail_after(10):
            await sup.out.line("[0] SLOW STARTED ")
            await sup.out.line("[1] SLOW STARTED ")
        began = trio.current_time()
        sup.process.send_signal(signal.SIGTERM)
        assert await sup.exit_status(within=grace + 5) == 0
        # The running tasks (1 s each) finished within the grace, and nothing waited on.
        assert trio.current_time() - began < grace + 1
        for index, worker_id in ids.items():
            assert f"[{index}] worker {worker_id} stopped" in sup.out.lines
        assert "2 worker processes stopped" in sup.out.lines
        assert not any("Traceback" in line for line in sup.out.lines)
        assert not any(is_our_child(pid) for pid in pids.values())
    with trio.fail_after(10):
        assert [await handle.result() for handle in handles] == [b"slow done"] * 8
    assert await natrio.list_workers(natrio_connection) == []


async def test_workers_stop_when_their_supervisor_is_killed(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    async with supervisor(
        natrio_server.url, "make_worker", "--processes", "2", "--grace", "2"
    ) as sup:
        with trio.fail_after(30):
            await sup.all_started(2)
        pids = sup.pids()
        sup.process.kill()
        await sup.process.wait()
        # Not our children: nothing to wait on but their disappearance.
        await eventually(lambda: not any(is_our_child(pid) for pid in pids.values()))
    # They stopped gracefully (end of stdin), deregistering, not just vanishing.
    assert await natrio.list_workers(natrio_connection) == []


async def test_a_factory_failing_at_start_up_makes_it_give_up(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with supervisor(natrio_server.url, "make_broken_worker", "--processes", "2") as sup:
        # Three tries each, 0.5 s and 1 s apart.
        status = await sup.exit_status(within=30)
        assert status == 1
        lines = sup.out.lines
        (error,) = (line for line in lines if line.startswith("Error: "))
        assert re.fullmatch(
            r"Error: worker process [01] exited with status 1 before it was ready, "
            r"3 times in a row; giving up \(its output above says why\)",
            error,
        ), error
        # The reason is passed through from the processes, prefixed.
        assert any(
            re.match(r"\[[01]\] .*RuntimeError: this factory fails on purpose", line)
            for line in lines
        )
        starts = [int(m[1]) for line in lines if (m := PROCESS_STARTED.match(line))]
        assert starts.count(0) <= 3
        assert starts.count(1) <= 3
        assert 3 in (starts.count(0), starts.count(1))
