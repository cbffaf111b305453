"""Seeing what runs: a run's history (``Client.history``, ``natrio events``), the
deployment's queues and rates (``Client.overview``, ``natrio stats``, ``natrio top``) and a
worker's statistics per task type.

The commands run in-process with click's CliRunner in a worker thread (each invocation
calls ``trio.run`` itself, which a thread may do while the test's own run goes on), so
they see the workers the test runs; ``natrio top`` in a terminal runs as a subprocess on
a pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result
from rich.console import Console

import natrio
from natrio import _wire as wire
from natrio._cli import cli
from natrio._cli._observe import Frames
from natrio._dispatch.tally import WINDOW, Tally, TaskTypeStatistics, percentiles
from natrio._history import decode_event, stream_time
from natrio._jetstream import JetStream
from natrio._overview import dead_letter_counts, parse_consumer, queue_statistics
from natrio._transport import Message
from natrio.testing import WorkerFactory

ROOT = Path(__file__).resolve().parent.parent
QUICK_RETRY = natrio.RetryPolicy(initial_interval=0.01, maximum_attempts=3)


async def invoke(*args: str) -> Result:
    """``natrio ARGS``, in-process in a thread; NATRIO_URL is unset."""
    runner = CliRunner(env={"NATRIO_URL": None})
    call = functools.partial(runner.invoke, cli, list(args), catch_exceptions=True)
    return await trio.to_thread.run_sync(call)


def ok(result: Result) -> Result:
    """``result``, after checking the command succeeded (showing its output if not)."""
    assert result.exit_code == 0, (result.exception, result.stdout, result.stderr)
    return result


def text_of(renderable: object) -> str:
    """What rich prints for ``renderable``, as plain text."""
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(renderable)
    return out.getvalue()


# -- decoding events (pure) ---------------------------------------------------------------


def stored(
    subject: str, data: bytes = b"", headers: Mapping[str, str] | None = None, seq: int = 7
) -> Message:
    """A message as a direct get returns it: its headers, then the stream's."""
    return Message(
        "_INBOX.x",
        data,
        "",
        dict(headers or {})
        | {
            "Nats-Stream": wire.EVENT_STREAM,
            "Nats-Subject": subject,
            "Nats-Sequence": str(seq),
            "Nats-Time-Stamp": "2030-01-02T03:04:05.123456789Z",
        },
    )


NATRIO_HEADERS = {
    wire.H_TASK_SEQ: "41",
    wire.H_ATTEMPT: "2",
    wire.H_WORKER: "obs/default.abc@host",
    wire.H_STARTED: "1893553445.5",
}
FAILED = json.dumps(
    {"type": "ValueError", "message": "no\nmore", "traceback": "", "kind": "error"}
    | {"attempts": 2, "retry_in": 1.5}
).encode()


def test_a_failed_event_is_decoded() -> None:
    msg = stored("natrio.event.obs.run-1.s.failed", FAILED, headers=NATRIO_HEADERS)
    event = decode_event(msg, "run-1")
    assert event is not None
    assert (event.seq, event.task_type, event.run_id, event.step_id, event.kind) == (
        7,
        "obs",
        "run-1",
        "s",
        "failed",
    )
    assert (event.task_seq, event.attempt, event.iteration) == (41, 2, 1)
    assert event.worker == "obs/default.abc@host"
    assert event.time == datetime(2030, 1, 2, 3, 4, 5, 123456, UTC)
    assert event.started_at == datetime.fromtimestamp(1893553445.5, UTC)
    assert event.error == natrio.TaskError("ValueError", "no\nmore", "", "error", 2)
    assert event.retry_in == 1.5
    assert event.reason == "ValueError: no; retry in 1.5 s"
    assert json.loads(json.dumps(event.to_dict()))["error"]["type"] == "ValueError"
    # The step filter is checked too.
    assert decode_event(msg, "run-1", "s") == event
    assert decode_event(msg, "run-1", "other") is None


def test_other_kinds_are_decoded() -> None:
    paused = decode_event(
        stored("natrio.event.obs.r.s.paused", b'{"delay": 30}', headers=NATRIO_HEADERS), "r"
    )
    assert paused is not None
    assert paused.delay == 30.0
    assert paused.reason == "paused for 30 s"
    continued = decode_event(
        stored(
            "natrio.event.obs.r.s.continued",
            b"next",
            headers=NATRIO_HEADERS | {wire.H_ITERATION: "3"},
        ),
        "r",
    )
    assert continued is not None
    assert continued.iteration == 3
    assert continued.size == 4
    assert continued.reason == "iteration 4 queued"
    dead = json.dumps({"type": "Boom", "message": "", "kind": "exhausted", "attempts": 5})
    event = decode_event(
        stored("natrio.event.obs.r.s.dead", dead.encode(), headers=NATRIO_HEADERS), "r"
    )
    assert event is not None
    assert event.reason == "exhausted: Boom"


HOSTILE: list[tuple[str, Message]] = [
    ("no natrio headers", stored("natrio.event.obs.r.s.completed")),
    ("unknown kind", stored("natrio.event.obs.r.s.bogus", headers=NATRIO_HEADERS)),
    ("another run", stored("natrio.event.obs.r2.s.completed", headers=NATRIO_HEADERS)),
    ("a bad task type", stored("natrio.event.o~b.r.s.completed", headers=NATRIO_HEADERS)),
    ("too many tokens", stored("natrio.event.obs.r.s.x.completed", headers=NATRIO_HEADERS)),
    (
        "an attempt that is no number",
        stored("natrio.event.obs.r.s.completed", headers=NATRIO_HEADERS | {wire.H_ATTEMPT: "two"}),
    ),
    (
        "a worker with control characters",
        stored(
            "natrio.event.obs.r.s.completed", headers=NATRIO_HEADERS | {wire.H_WORKER: "w\x1b[2J"}
        ),
    ),
    (
        "a started time that is no number",
        stored("natrio.event.obs.r.s.completed", headers=NATRIO_HEADERS | {wire.H_STARTED: "nan"}),
    ),
    (
        "a failed event without JSON",
        stored("natrio.event.obs.r.s.failed", b"{", headers=NATRIO_HEADERS),
    ),
    (
        "a failed event without retry_in",
        stored(
            "natrio.event.obs.r.s.failed",
            json.dumps({"type": "E", "message": "m", "attempts": 1}).encode(),
            headers=NATRIO_HEADERS,
        ),
    ),
    (
        "an error whose attempts are text",
        stored(
            "natrio.event.obs.r.s.dead",
            json.dumps({"type": "E", "attempts": "1"}).encode(),
            headers=NATRIO_HEADERS,
        ),
    ),
    (
        "a pause without a delay",
        stored("natrio.event.obs.r.s.paused", b"[]", headers=NATRIO_HEADERS),
    ),
]


@pytest.mark.parametrize(("why", "msg"), HOSTILE, ids=[why for why, _ in HOSTILE])
def test_what_is_not_a_natrio_event_is_refused(why: str, msg: Message) -> None:
    assert decode_event(msg, "r") is None


def test_a_publisher_copy_of_the_stream_headers_is_refused() -> None:
    # The stream's own headers come after the publisher's, joined with ", ".
    for name in ("Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp"):
        msg = stored("natrio.event.obs.r.s.completed", headers=NATRIO_HEADERS)
        assert msg.headers is not None
        msg.headers = dict(msg.headers) | {name: f"forged, {msg.headers[name]}"}
        assert decode_event(msg, "r") is None, name


def test_stream_time() -> None:
    assert stream_time("2030-01-02T03:04:05Z") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert stream_time("2030-01-02T03:04:05.5Z") == datetime(2030, 1, 2, 3, 4, 5, 500000, UTC)
    for bad in (None, "", "2030-01-02", "2030-13-02T03:04:05Z", "2030-01-02T03:04:05+01:00"):
        assert stream_time(bad) is None


# -- percentiles and queues (pure) --------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentiles(samples, (50, 90, 99, 100)) == (50.0, 90.0, 99.0, 100.0)
    assert percentiles([3.0], (50, 99)) == (3.0, 3.0)
    assert percentiles([2.0, 1.0], (50, 99)) == (1.0, 2.0)
    assert percentiles([], (50, 90)) == (None, None)


def test_handler_times_are_kept_over_a_bounded_window() -> None:
    tally = Tally()
    for n in range(3 * WINDOW):
        tally.durations.append(float(n))
    stats = TaskTypeStatistics.of("t", tally)
    assert stats.samples == WINDOW
    # Only the most recent WINDOW calls count.
    assert stats.handler_p50 == float(2 * WINDOW + WINDOW // 2 - 1)
    assert stats.handler_p99 is not None
    assert stats.handler_p99 >= 3 * WINDOW * 0.99
    assert TaskTypeStatistics.of("t", None) == TaskTypeStatistics("t")


def consumer(name: str, filter_subject: str, **state: object) -> dict[str, Any]:
    """A consumer's info as CONSUMER.LIST gives it."""
    return {"name": name, "config": {"filter_subject": filter_subject}} | state


def test_consumers_and_dead_letters_make_queue_rows() -> None:
    consumers: list[dict[str, Any]] = [
        consumer("a~default", "natrio.task.a.default.>", num_pending=3, num_ack_pending=2),
        consumer("a~default~p0", "natrio.task.a.default~p0.>", num_pending=1, num_redelivered=1),
        consumer("b~gpu", "natrio.task.b.gpu.>", num_pending=True, num_ack_pending=-4),
        # Not natrio's: a name natrio would not give, or a filter that does not go with it.
        consumer("audit", "natrio.task.>", num_pending=100),
        consumer("c~default", "natrio.task.>", num_pending=100),
        consumer("c~default~x1", "natrio.task.c.default~x1.>", num_pending=100),
        {"name": "d~default"},
    ]
    assert parse_consumer(consumers[1]) == ("a", "default")
    dead = dead_letter_counts(
        {
            "natrio.dead.a.default.r.s": 2,
            "natrio.dead.a.default.r.t": 1,
            "natrio.dead.e.default.r.s": 1,
            "natrio.dead.e.default.r": 5,
            "natrio.dead.e.d.e.f.a.u.l.t": 5,
        }
    )
    assert dead == {("a", "default"): 3, ("e", "default"): 1}
    rows = queue_statistics(consumers, dead)
    assert rows == [
        natrio.QueueStatistics("a", "default", 4, 2, 1, 3, consumers=2),
        natrio.QueueStatistics("b", "gpu", consumers=1),
        natrio.QueueStatistics("e", "default", dead_letters=1),
    ]


# -- a run's history against a server -----------------------------------------------------


async def publish_hostile_events(nc: natrio.Connection, run_id: str) -> int:
    """Publish messages under the run's event subjects that are not natrio events; returns
    how many (one more, for another run, must not be counted at all)."""
    js = JetStream(nc)
    good = {wire.H_TASK_SEQ: "1", wire.H_ATTEMPT: "1", wire.H_WORKER: "w"}
    hostile: list[tuple[str, bytes, dict[str, str]]] = [
        (f"natrio.event.obs-x.{run_id}.a.completed", b"", {}),
        (f"natrio.event.obs-x.{run_id}.a.completed", b"", good | {wire.H_ATTEMPT: "one"}),
        (f"natrio.event.obs-x.{run_id}.a.completed", b"", good | {wire.H_WORKER: "w\x1b[2J"}),
        (
            f"natrio.event.obs-x.{run_id}.a.completed",
            b"",
            good | {"Nats-Subject": f"natrio.event.obs-x.{run_id}.a.dead"},
        ),
        (f"natrio.event.obs-x.{run_id}.a.bogus", b"", good),
        (f"natrio.event.obs-x.{run_id}.a.failed", b"not json", good),
        # Dressed as the end of a batched get: the reading must go on past it.
        (f"natrio.event.obs-x.{run_id}.a.started", b"", {"Status": "204", "Nats-Num-Pending": "0"}),
    ]
    for subject, payload, headers in hostile:
        await js.publish(subject, payload, headers=headers)
    await js.publish("natrio.event.obs-x.another-run.a.completed", b"", headers=good)
    return len(hostile)


def attempts_then(
    outcome: Callable[[natrio.TaskContext], bytes],
) -> Callable[[natrio.TaskContext], Awaitable[bytes]]:
    """A handler that fails its first attempt, then ends as ``outcome`` says."""

    async def handler(ctx: natrio.TaskContext) -> bytes:
        if ctx.attempt == 1:
            raise ValueError("first try\nsecond line")
        return outcome(ctx)

    return handler


async def test_history_of_a_retried_step_and_a_dead_one(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    run_id = "obs-run-1"
    skipped = await publish_hostile_events(natrio_connection, run_id)
    worker = natrio_worker_factory(started_event_after=0)
    worker.handle("obs-flaky", attempts_then(lambda ctx: b"done"), retry=QUICK_RETRY)

    @worker.handle("obs-doomed")
    async def doomed(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("refused on purpose")

    await natrio_worker_factory.start(worker)
    flaky = await natrio_client.submit("obs-flaky", run_id=run_id, step_id="a")
    assert await flaky.result() == b"done"
    doomed_handle = await natrio_client.submit("obs-doomed", run_id=run_id, step_id="b")
    with pytest.raises(natrio.TaskFailed):
        await doomed_handle.result()

    history = await natrio_client.history(run_id)
    assert history.skipped == skipped
    assert not history.truncated
    rows = [(e.step_id, e.task_type, e.kind, e.attempt) for e in history.events]
    assert rows == [
        ("a", "obs-flaky", "started", 1),
        ("a", "obs-flaky", "failed", 1),
        ("a", "obs-flaky", "started", 2),
        ("a", "obs-flaky", "completed", 2),
        ("b", "obs-doomed", "started", 1),
        ("b", "obs-doomed", "dead", 1),
    ]
    assert [e.seq for e in history.events] == sorted(e.seq for e in history.events)
    assert {e.worker for e in history.events} == {worker.worker_id}
    assert {e.task_seq for e in history.events[:4]} == {flaky.seq}
    failed, completed, dead = history.events[1], history.events[3], history.events[5]
    assert failed.error is not None
    assert failed.error.message == "first try\nsecond line"
    assert failed.retry_in is not None
    assert failed.reason.startswith("ValueError: first try; retry")
    assert completed.size == len(b"done")
    assert completed.reason == ""
    assert dead.error is not None
    assert dead.error.kind == "fatal"
    assert "refused on purpose" in dead.reason
    for event in history.events:
        assert event.started_at is not None
        assert event.started_at <= event.time

    one_step = await natrio_client.history(run_id, "b")
    assert [e.kind for e in one_step.events] == ["started", "dead"]
    assert one_step.skipped == 0  # the hostile messages are all under step a
    first_two = await natrio_client.history(run_id, limit=skipped + 2)
    assert first_two.truncated
    assert len(first_two.events) == 2
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.history("not a run id")

    url = natrio_connection.url
    table = ok(await invoke("events", run_id, "--url", url))
    lines = table.stdout.splitlines()
    assert f"run {run_id} (6 events)" in lines[0]
    header = next(line for line in lines if "time (UTC)" in line)
    for column in ("step", "type", "kind", "attempt", "iteration", "worker", "reason"):
        assert column in header
    rows_shown = [line for line in lines if worker.worker_id in line]
    assert [next(k for k in wire_kinds if f" {k} " in row) for row in rows_shown] == [
        "started",
        "failed",
        "started",
        "completed",
        "started",
        "dead",
    ]
    assert "ValueError: first try; retry in" in rows_shown[1]
    assert "second line" not in table.stdout  # one line per event
    assert "refused on purpose" in rows_shown[5]
    assert f"skipped {skipped} message(s)" in table.stderr

    shown = json.loads(ok(await invoke("events", run_id, "b", "--json", "--url", url)).stdout)
    assert shown["run_id"] == run_id
    assert shown["step_id"] == "b"
    assert shown["skipped"] == 0
    assert [e["kind"] for e in shown["events"]] == ["started", "dead"]
    assert shown["events"][1] == one_step.events[1].to_dict()
    assert shown["events"][1]["error"]["message"] == "refused on purpose"

    nothing = await invoke("events", "obs-no-such-run", "--url", url)
    assert nothing.exit_code == 1
    assert "no events for run obs-no-such-run" in nothing.stderr
    assert (await invoke("events", "bad.run", "--url", url)).exit_code == 2


wire_kinds = ("started", "failed", "paused", "continued", "completed", "dead")


def test_the_commands_are_listed_in_the_help() -> None:
    listed = CliRunner().invoke(cli, ["--help"]).stdout
    for command in ("events", "stats", "top"):
        assert re.search(rf"^\s+{command}\s", listed, re.MULTILINE), listed
    assert "q or Ctrl-C" in CliRunner().invoke(cli, ["top", "--help"]).stdout


# -- the deployment's queues and rates ----------------------------------------------------


async def test_stats_count_a_known_state(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    release = trio.Event()
    blocked_running = trio.Event()
    retried_running = trio.Event()
    worker = natrio_worker_factory(concurrency=4, prefetch=1)

    @worker.handle("obs-block")
    async def block(ctx: natrio.TaskContext) -> bytes:
        blocked_running.set()
        await release.wait()
        return b""

    @worker.handle("obs-retry", retry=QUICK_RETRY)
    async def retry(ctx: natrio.TaskContext) -> bytes:
        if ctx.attempt == 1:
            raise ValueError("once")
        retried_running.set()
        await release.wait()
        return b""

    @worker.handle("obs-dead")
    async def dead(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("no")

    @worker.handle("obs-done")
    async def done(ctx: natrio.TaskContext) -> bytes:
        return b"ok"

    await natrio_worker_factory.start(worker)
    for n in range(3):
        await natrio_client.submit("obs-block", run_id=f"block-{n}")
    await natrio_client.submit("obs-retry")
    await natrio_client.submit("obs-nobody")  # no worker serves it: no consumer matches it
    for n in range(2):
        await (await natrio_client.submit("obs-done", run_id=f"done-{n}")).result()
    with pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("obs-dead")).result()
    with trio.fail_after(10):
        await blocked_running.wait()
        await retried_running.wait()

    expected_queues = (
        # One obs-block task running (prefetch 1), two waiting in the stream.
        natrio.QueueStatistics("obs-block", "default", 2, 1, 0, 0, 1),
        natrio.QueueStatistics("obs-dead", "default", 0, 0, 0, 1, 1),
        natrio.QueueStatistics("obs-done", "default", 0, 0, 0, 0, 1),
        # Its second delivery is running.
        natrio.QueueStatistics("obs-retry", "default", 0, 1, 1, 0, 1),
    )
    expected_rates = (
        natrio.EventRates("obs-block", 0, 0, 0),
        natrio.EventRates("obs-dead", 0, 0, 1),
        natrio.EventRates("obs-done", 2, 0, 0),
        natrio.EventRates("obs-retry", 0, 1, 0),
    )
    # The server settles acks and stores events on its own time: look until it has.
    with trio.fail_after(10):
        while True:
            overview = await natrio_client.overview()
            if (overview.queues, overview.rates) == (expected_queues, expected_rates):
                break
            await trio.sleep(0.05)
    assert overview.stored_tasks == 3 + 1 + 1
    assert overview.unserved == 1
    assert overview.window == 60.0
    assert overview.per_minute(2) == 2.0
    assert abs((datetime.now(UTC) - overview.time).total_seconds()) < 5

    # A window of a millisecond, after everything happened, counts nothing; the queues
    # are the same.
    short = await natrio_client.overview(window=0.001)
    assert short.queues == expected_queues
    assert all((r.completed, r.failed, r.dead) == (0, 0, 0) for r in short.rates)
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.overview(window=0)

    url = natrio_connection.url
    shown = json.loads(ok(await invoke("stats", "--json", "--url", url)).stdout)
    assert shown["queues"] == [
        {
            "task_type": q.task_type,
            "group": q.group,
            "pending": q.pending,
            "in_flight": q.in_flight,
            "redelivered": q.redelivered,
            "dead_letters": q.dead_letters,
            "consumers": q.consumers,
        }
        for q in expected_queues
    ]
    done_rates = next(r for r in shown["rates"] if r["task_type"] == "obs-done")
    assert done_rates == {
        "task_type": "obs-done",
        "completed": 2,
        "failed": 0,
        "dead": 0,
        "completed_per_minute": 2.0,
        "failed_per_minute": 0.0,
        "dead_per_minute": 0.0,
    }
    assert (shown["stored_tasks"], shown["unserved"]) == (5, 1)
    # Per minute: 2 completions in a 30 s window are 4 a minute.
    halved = json.loads(ok(await invoke("stats", "--json", "--window", "30", "--url", url)).stdout)
    assert next(r for r in halved["rates"] if r["task_type"] == "obs-done")[
        "completed_per_minute"
    ] == pytest.approx(4.0)

    table = ok(await invoke("stats", "--url", url)).stdout
    block_row = next(
        line for line in table.splitlines() if "obs-block" in line and "default" in line
    )
    assert re.search(r"obs-block\s*│\s*default\s*│\s*2\s*│\s*1\s*│\s*0\s*│\s*0\s*│\s*1", block_row)
    done_row = next(
        line
        for line in table[table.index("outcomes per minute") :].splitlines()
        if "obs-done" in line
    )
    assert re.search(r"obs-done\s*│\s*2\.0\s*│\s*0\.0\s*│\s*0\.0", done_row)
    assert "5 task(s) stored, 1 of them for a type or group no worker has served yet" in table

    # natrio top, once through the live view (not a terminal here: it prints the last frame).
    top = ok(await invoke("top", "-n", "2", "--interval", "0.1", "--url", url)).stdout
    assert "natrio top" in top
    assert "q to quit" in top
    assert re.search(r"obs-block\s*│\s*default\s*│\s*2\s*│\s*1", top)
    release.set()


async def test_top_frames_keep_the_last_figures_when_a_refresh_fails(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    await natrio.Client(natrio_connection).submit("obs-frame")  # nothing serves it
    async with natrio.connect(natrio_server.url) as nc:
        frames = Frames(natrio.Client(nc, timeout=0.5), window=60.0, interval=1.0)
        first = text_of(await frames.refresh())
        assert "natrio top" in first
        assert "1 task(s) stored, 1 of them" in first
        assert frames.error is None
    # The connection is closed now: the refresh fails, and the last figures stay.
    second = text_of(await frames.refresh())
    assert frames.error is not None
    assert "refresh failed" in second
    assert "1 task(s) stored, 1 of them" in second


def test_top_in_a_terminal_quits_on_q_and_on_ctrl_c(natrio_server: natrio.EmbeddedServer) -> None:
    runner = CliRunner(env={"NATRIO_URL": None})
    ok(runner.invoke(cli, ["provision", "--url", natrio_server.url]))
    for quit_by in ("q", "SIGINT"):
        controller, terminal = pty.openpty()
        # Wide enough for the header to fit on one line.
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = {k: v for k, v in os.environ.items() if k != "NATRIO_URL"} | {"TERM": "xterm"}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "natrio",
                "top",
                "--url",
                natrio_server.url,
                "--interval",
                "0.2",
            ],
            cwd=ROOT,
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        )
        try:
            seen = read_until(controller, b"q to quit", timeout=20)
            # The keys are read one by one, unechoed, while the view runs.
            assert not termios.tcgetattr(terminal)[3] & termios.ICANON, seen[-500:]
            if quit_by == "q":
                os.write(controller, b"q")
            else:
                process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                read_until(controller, b"", timeout=0.1)  # keep the terminal drained
            assert process.poll() == 0, (quit_by, seen[-2000:])
            # The terminal is put back as it was.
            mode = termios.tcgetattr(terminal)[3]
            assert mode & termios.ICANON
            assert mode & termios.ECHO
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            os.close(controller)
            os.close(terminal)


def read_until(fd: int, wanted: bytes, *, timeout: float) -> bytes:
    """Read from ``fd`` until ``wanted`` was seen (or, for ``b""``, what is there)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other side closed
                break
            if wanted and wanted in seen:
                return seen
    if wanted:
        raise AssertionError(f"{wanted!r} not seen in {timeout} s: {seen[-2000:]!r}")
    return seen


# -- a worker's statistics per task type --------------------------------------------------


async def test_worker_statistics_per_task_type(
    natrio_client: natrio.Client, natrio_worker_factory: WorkerFactory
) -> None:
    release = trio.Event()
    holding = trio.Event()
    worker = natrio_worker_factory(concurrency=16)

    @worker.handle("obs-timed")
    async def timed(ctx: natrio.TaskContext) -> bytes:
        # A handler that works for as many milliseconds as its input says.
        await trio.sleep(int(ctx.input) / 1000)
        return b""

    worker.handle("obs-mixed", attempts_then(lambda ctx: b""), retry=QUICK_RETRY)

    @worker.handle("obs-fatal")
    async def fatal(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("no")

    @worker.handle("obs-hold")
    async def hold(ctx: natrio.TaskContext) -> bytes:
        holding.set()
        await release.wait()
        return b""

    @worker.handle("obs-idle")
    async def idle(ctx: natrio.TaskContext) -> bytes:
        return b""

    before = worker.statistics().task_types
    assert before == {t: TaskTypeStatistics(t) for t in worker.task_types}
    await natrio_worker_factory.start(worker)

    handles = [
        await natrio_client.submit("obs-timed", str(ms).encode(), run_id=f"t{ms}")
        for ms in range(10, 101, 10)
    ]
    for handle in handles:
        await handle.result()
    await (await natrio_client.submit("obs-mixed")).result()
    with pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("obs-fatal")).result()
    await natrio_client.submit("obs-hold")
    with trio.fail_after(10):
        await holding.wait()

    stats = worker.statistics()
    by_type = stats.task_types
    assert set(by_type) == set(worker.task_types)
    timed_stats = by_type["obs-timed"]
    assert (timed_stats.started, timed_stats.succeeded, timed_stats.failed) == (10, 10, 0)
    assert (timed_stats.retried, timed_stats.dead, timed_stats.in_flight) == (0, 0, 0)
    assert timed_stats.samples == 10
    p50, p90, p99 = timed_stats.handler_p50, timed_stats.handler_p90, timed_stats.handler_p99
    assert p50 is not None
    assert p90 is not None
    assert p99 is not None
    # Nearest rank over 10 calls: the 5th, 9th and 10th shortest (50, 90 and 100 ms of work).
    assert 0.05 <= p50 < p99
    assert 0.09 <= p90 <= p99
    assert 0.1 <= p99 < 0.1 + 1.0
    mixed = by_type["obs-mixed"]
    assert (mixed.started, mixed.succeeded, mixed.failed, mixed.retried, mixed.dead) == (
        2,
        1,
        1,
        1,
        0,
    )
    assert mixed.samples == 2
    fatal_stats = by_type["obs-fatal"]
    assert (fatal_stats.started, fatal_stats.failed, fatal_stats.retried, fatal_stats.dead) == (
        1,
        1,
        0,
        1,
    )
    held = by_type["obs-hold"]
    assert (held.started, held.in_flight, held.samples, held.handler_p50) == (1, 1, 0, None)
    assert by_type["obs-idle"] == TaskTypeStatistics("obs-idle")
    # The per-type counters add up to the worker's.
    counters = stats.dispatcher
    assert sum(s.succeeded for s in by_type.values()) == counters.processed
    assert sum(s.failed for s in by_type.values()) == counters.failed
    assert sum(s.retried for s in by_type.values()) == counters.retried
    assert sum(s.dead for s in by_type.values()) == counters.dead
    assert sum(s.in_flight for s in by_type.values()) == counters.in_flight
    release.set()


# -- the permissions docs/permissions.md lists --------------------------------------------

OBSERVER_INBOX = "_INBOX_observer"
#: What Client.history and Client.overview need: docs/permissions.md, optional features.
OBSERVER_PUBLISH = (
    "$JS.API.DIRECT.GET.NATRIO_EVENTS",
    "$JS.API.STREAM.INFO.NATRIO_EVENTS",
    "$JS.API.STREAM.INFO.NATRIO_TASKS",
    "$JS.API.STREAM.INFO.NATRIO_DLQ",
    "$JS.API.CONSUMER.LIST.NATRIO_TASKS",
    "$JS.API.CONSUMER.CREATE.NATRIO_EVENTS.*.natrio.event.>",
    "$JS.API.CONSUMER.DELETE.NATRIO_EVENTS.*",
)


async def test_history_and_overview_need_only_the_documented_permissions(
    tmp_path: Path,
) -> None:
    observer = {
        "user": "observer",
        "password": "observer-secret",
        "permissions": {
            "publish": {"allow": list(OBSERVER_PUBLISH)},
            "subscribe": {"allow": [f"{OBSERVER_INBOX}.>"]},
        },
    }
    admin = {"user": "admin", "password": "admin-secret"}
    config = tmp_path / "nats-server.conf"
    # JSON is valid nats-server configuration.
    config.write_text("authorization " + json.dumps({"users": [admin, observer]}), encoding="utf-8")
    async with natrio.embedded_server(args=["-c", str(config)]) as server:
        admin_url = f"nats://admin:admin-secret@127.0.0.1:{server.port}"
        async with natrio.connect(admin_url) as nc, trio.open_nursery() as nursery:
            await natrio.provision(nc)
            worker = natrio.Worker(nc, freeze_gc=False)
            worker.handle("obs-perm", attempts_then(lambda ctx: b"ok"), retry=QUICK_RETRY)
            await nursery.start(worker.run)
            handle = await natrio.Client(nc).submit("obs-perm", run_id="perm-run")
            assert await handle.result() == b"ok"
            async with natrio.connect(
                f"nats://observer:observer-secret@127.0.0.1:{server.port}",
                inbox_prefix=OBSERVER_INBOX,
            ) as observing:
                client = natrio.Client(observing, timeout=2.0)
                history = await client.history("perm-run")
                assert [e.kind for e in history.events] == ["failed", "completed"]
                overview = await client.overview()
                assert overview.queues == (
                    natrio.QueueStatistics("obs-perm", "default", consumers=1),
                )
                assert overview.rates == (natrio.EventRates("obs-perm", 1, 1, 0),)
            worker.stop(0)
        violations = [line for line in server.log_tail.splitlines() if "Violation" in line]
        assert violations == []
