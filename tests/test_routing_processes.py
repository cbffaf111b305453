"""Claims and targets across worker processes: claims moved mid-run, colocated steps whose
worker is killed and restarted under its name, targets waiting for a holder, and a holder
stopped with tasks queued for its claim.

Each worker is a real process (``python -m tests.routing_proc_worker``) against a real
nats-server; kills are SIGKILL, stops SIGTERM. The directory's TTL is 2 s (the
``natrio_connection`` fixture provisions ``worker_ttl=2.0``), so a killed worker's entry
is gone within a few seconds.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

import natrio
from natrio import _wire as wire
from natrio._jetstream import JetStream

from .chaos import harness
from .procs import WorkerPool, WorkerProcess

pytestmark = pytest.mark.slow

TASK_TYPE = "job"
# Seconds a process that dropped a claim may still run tasks of it: what the server
# delivered to it before it stopped pulling (at most its prefetch) still runs there.
HANDOVER = 2.0


# -- worker processes --------------------------------------------------------------------


def worker_pool(url: str) -> AbstractAsyncContextManager[WorkerPool]:
    """``tests.routing_proc_worker`` processes (``pool.start(name, *options)``), all killed
    and reaped on the way out."""
    return WorkerPool(url, "tests.routing_proc_worker", ready_within=15, named=True).running()


def ran_on(worker: WorkerProcess) -> list[str]:
    """The run ids of the tasks ``worker`` started, in order."""
    return [line.split()[1] for line in worker.lines if line.startswith("RAN ")]


async def ran_count(worker: WorkerProcess, count: int, *, after: int = 0) -> None:
    """Wait until ``count`` tasks started on ``worker`` after line ``after``."""
    for _ in range(count):
        after = await worker.line("RAN ", after=after) + 1


# -- helpers -----------------------------------------------------------------------------


async def set_claims(path: Path, *claims: str) -> None:
    """Rewrite a worker's claims file at once (a rename: never read half-written)."""
    part = trio.Path(f"{path}.part")
    await part.write_text(",".join(claims), encoding="utf-8")
    await part.replace(path)


def claims_line(*claims: str) -> Callable[[str], bool]:
    """Matches the ``CLAIMS`` line a worker prints when its claims file reads ``claims``."""
    wanted = ",".join(sorted(claims)) or "-"
    return lambda line: line.startswith("CLAIMS ") and line.split()[2] == wanted


def waiting_line(waiting: dict[str, int]) -> Callable[[str], bool]:
    """Matches the ``WAITING`` line of a worker whose statistics show ``waiting``."""
    return lambda line: line.startswith("WAITING ") and json.loads(line[8:]) == waiting


async def step_events(nc: natrio.Connection, run_id: str) -> dict[str, int]:
    """The events stored for run ``run_id``, by subject."""
    return await JetStream(nc).subjects(wire.EVENT_STREAM, f"natrio.event.{TASK_TYPE}.{run_id}.>")


async def claim_consumer(nc: natrio.Connection, placement: str) -> dict[str, Any]:
    """The consumer of ``job`` tasks under ``placement`` (``t<claim>`` or ``s<claim>``)."""
    name = wire.consumer_name(TASK_TYPE, wire.DEFAULT_GROUP, placement)
    return await JetStream(nc).consumer_info(wire.TASK_STREAM, name)


async def record_expiry(nc: natrio.Connection, worker_id: str, gone: list[float]) -> None:
    """Append the Unix time at which ``worker_id``'s directory entry was first seen gone."""
    while any(w.worker_id == worker_id for w in await natrio.list_workers(nc)):  # noqa: ASYNC110 - the server expires the entry: no event says so
        await trio.sleep(0.05)
    gone.append(time.time())


async def output(handle: natrio.TaskHandle) -> dict[str, Any]:
    """The JSON a ``job`` returned: worker, held, time, attempt, delivered."""
    result: dict[str, Any] = json.loads(await handle.result())
    return result


def delivery(result: dict[str, Any]) -> tuple[Any, ...]:
    """A ``job``'s output as ``(worker, held, attempt, delivered)``."""
    return result["worker"], result["held"], result["attempt"], result["delivered"]


# -- 1. a claim moving between processes mid-run ------------------------------------------


async def test_a_claim_moves_between_processes_while_tasks_flow(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    tmp_path: Path,
) -> None:
    files = {name: tmp_path / f"{name}.claims" for name in ("a", "b")}
    await set_claims(files["a"], "leader")
    await set_claims(files["b"])
    handles: list[natrio.TaskHandle] = []
    async with worker_pool(natrio_server.url) as pool:
        # Tasks of 40 ms, four at a time: a worker dropping the claim still holds a few.
        options = ("--task-ms", "40", "--concurrency", "4")
        a, b, c = await pool.start_all(
            ("a", "--claims-file", str(files["a"]), *options),
            ("b", "--claims-file", str(files["b"]), *options),
            ("c", *options),  # serves the type, holds no claim: must run none of them
        )
        done = trio.Event()
        async with trio.open_nursery() as nursery:

            async def submit_steadily() -> None:
                # Stopped between submits, never inside one: a submit cancelled after its
                # publish would leave a task that has no handle.
                while not done.is_set():
                    handles.append(await natrio_client.submit(TASK_TYPE, target="leader"))
                    with trio.move_on_after(0.02):  # the pace of the flow, about 50 a second
                        await done.wait()

            nursery.start_soon(submit_steadily)
            await ran_count(a, 20)
            # a -> b, both files at once: whichever worker looks first, there is either
            # a gap (the tasks wait) or an overlap (both hold the claim).
            mark_a, mark_b = len(a.lines), len(b.lines)
            await set_claims(files["a"])
            await set_claims(files["b"], "leader")
            with trio.fail_after(10):
                await a.line(claims_line(), after=mark_a)
                moved = await b.line(claims_line("leader"), after=mark_b)
                await ran_count(b, 20, after=moved)
            # And back, b -> a.
            mark_a, mark_b = len(a.lines), len(b.lines)
            await set_claims(files["b"])
            await set_claims(files["a"], "leader")
            with trio.fail_after(10):
                await b.line(claims_line(), after=mark_b)
                back = await a.line(claims_line("leader"), after=mark_a)
                await ran_count(a, 20, after=back)
            done.set()
        with trio.fail_after(15):
            results = [await output(handle) for handle in handles]

    # Every task ran once, on a holder: held when it started, or just handed over by a
    # process that had dropped the claim an instant before.
    assert len(results) == len(handles) >= 60
    assert ran_on(c) == []
    drops = {
        worker.name: [float(line.split()[1]) for line in worker.lines if claims_line()(line)]
        for worker in (a, b)
    }
    ran = Counter(ran_on(a) + ran_on(b))
    assert [run for run, times in ran.items() if times > 1] == []
    assert set(ran) == {handle.run_id for handle in handles}
    handed_over = []
    for result in results:
        assert result["worker"] in ("a", "b")
        assert result["attempt"] == 1
        if not result["held"]:
            handed_over.append(result)
            assert any(0 <= result["time"] - drop < HANDOVER for drop in drops[result["worker"]]), (
                result,
                drops,
            )
    by_worker = [result["worker"] for result in results]
    assert by_worker.count("a") >= 40
    assert by_worker.count("b") >= 20
    outcomes = await harness.outcomes(natrio_connection, TASK_TYPE)
    assert outcomes == harness.Outcomes(completed=len(handles), duplicates=0, dead=0)
    print(
        f"{len(handles)} tasks: {by_worker.count('a')} on a, {by_worker.count('b')} on b, "
        f"{len(handed_over)} handed over after a drop"
    )


# -- 2. colocated steps and a worker restarted under its name ------------------------------


async def test_a_colocated_step_waits_for_its_worker_to_restart(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
) -> None:
    placement = wire.claim_placement(natrio.worker_target("alpha"))
    consumer = wire.consumer_name(TASK_TYPE, wire.DEFAULT_GROUP, placement)
    async with worker_pool(natrio_server.url) as pool:
        alpha, beta = await pool.start_all(("alpha",), ("beta",))
        first = await natrio_client.submit(
            TASK_TYPE, run_id="colocated", step_id="one", target=natrio.worker_target("alpha")
        )
        with trio.fail_after(10):
            assert (await output(first))["worker"] == "alpha"
        assert await first.worker() == alpha.worker_id
        await pool.kill(alpha)

        second = await natrio_client.submit(
            TASK_TYPE, run_id="colocated", step_id="two", colocate_with=first
        )
        # Once the killed alpha's entry expired, beta's sweep finds the step waiting for
        # a claim nobody holds, and leaves it.
        with trio.fail_after(10):
            await beta.line(waiting_line({consumer: 1}))
        info = await claim_consumer(natrio_connection, placement)
        assert (info["num_pending"], info["num_ack_pending"]) == (1, 0)
        [entry] = await natrio.list_workers(natrio_connection)
        assert entry.worker_id == beta.worker_id
        assert natrio.worker_target("alpha") not in entry.claims
        assert [s for s in await step_events(natrio_connection, "colocated") if ".two." in s] == []
        assert ran_on(beta) == []

        again = await pool.start("alpha")
        with trio.fail_after(10):
            result = await output(second)
        # Never delivered before: nobody took it while alpha was away.
        assert delivery(result) == ("alpha", True, 1, 1)
        assert await second.worker() == again.worker_id != alpha.worker_id
        assert ran_on(beta) == []
    outcomes = await harness.outcomes(natrio_connection, TASK_TYPE)
    assert outcomes == harness.Outcomes(completed=2, duplicates=0, dead=0)


async def test_a_soft_colocated_step_runs_elsewhere_once_its_worker_is_gone(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
) -> None:
    async with worker_pool(natrio_server.url) as pool:
        alpha, beta = await pool.start_all(("alpha",), ("beta",))
        first = await natrio_client.submit(
            TASK_TYPE, run_id="soft", step_id="one", target=natrio.worker_target("alpha")
        )
        with trio.fail_after(10):
            assert (await output(first))["worker"] == "alpha"
        await pool.kill(alpha)
        killed = trio.current_time()
        second = await natrio_client.submit(
            TASK_TYPE, run_id="soft", step_id="two", colocate_with=first, soft=True
        )
        gone: list[float] = []
        # The entry expires (TTL 2 s), beta's next look (every 2 s) takes the consumer.
        with trio.fail_after(8):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record_expiry, natrio_connection, alpha.worker_id, gone)
                result = await output(second)
        took = trio.current_time() - killed
        # Not while the killed alpha still seemed alive: only once its entry was gone
        # (as this test saw it, up to a poll and a request late).
        assert gone
        assert result["time"] >= gone[0] - 0.25, (result, gone)
        assert result["worker"] == "beta"
        assert not result["held"]  # beta took it as a guest, without the claim
        assert result["attempt"] == 1
        assert ran_on(beta) == ["soft"]
    outcomes = await harness.outcomes(natrio_connection, TASK_TYPE)
    assert outcomes == harness.Outcomes(completed=2, duplicates=0, dead=0)
    print(f"soft step ran on beta {took:.2f} s after alpha was killed")


# -- 3. an unclaimed target waits for a holder --------------------------------------------


async def test_a_target_nobody_holds_waits_for_a_holder_process(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
) -> None:
    placement = wire.claim_placement("gpu")
    consumer = wire.consumer_name(TASK_TYPE, wire.DEFAULT_GROUP, placement)
    async with worker_pool(natrio_server.url) as pool:
        plain = await pool.start("plain")
        handle = await natrio_client.submit(TASK_TYPE, run_id="gpu-run", target="gpu")
        with trio.fail_after(10):
            await plain.line(waiting_line({consumer: 1}))
        info = await claim_consumer(natrio_connection, placement)
        assert (info["num_pending"], info["num_ack_pending"]) == (1, 0)
        assert info["delivered"]["consumer_seq"] == 0  # never delivered: no attempt used
        assert await step_events(natrio_connection, "gpu-run") == {}

        gpu = await pool.start("gpu", "--claims", "gpu")
        with trio.fail_after(10):
            result = await output(handle)
        assert delivery(result) == ("gpu", True, 1, 1)
        assert await handle.worker() == gpu.worker_id
        assert ran_on(plain) == []
    outcomes = await harness.outcomes(natrio_connection, TASK_TYPE)
    assert outcomes == harness.Outcomes(completed=1, duplicates=0, dead=0)


# -- 4. a holder stopped with tasks queued for its claim -----------------------------------


async def test_a_stopped_holder_hands_its_queued_tasks_to_another_holder(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
) -> None:
    count = 30
    # One task at a time, eight held: what the stopping worker holds queued is handed
    # back at once, well inside the 30 s ack wait that would otherwise return it.
    options = ("--claims", "gpu", "--concurrency", "1", "--prefetch", "8", "--task-ms", "50")
    async with worker_pool(natrio_server.url) as pool:
        first, second = await pool.start_all(("h1", *options), ("h2", *options))
        handles = [await natrio_client.submit(TASK_TYPE, target="gpu") for _ in range(count)]
        with trio.fail_after(10):
            await first.line("RAN ")
        stopped = trio.current_time()
        first.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            results = [await output(handle) for handle in handles]
        took = trio.current_time() - stopped
        with trio.fail_after(5):
            assert await first.process.wait() == 0
        await first.line("STOPPED ")

    assert took < 10  # not the ack wait (30 s)
    ran = ran_on(first) + ran_on(second)
    assert sorted(ran) == sorted(handle.run_id for handle in handles)
    assert all(result["attempt"] == 1 and result["held"] for result in results)
    handed_back = [r for r in results if r["worker"] == "h2" and r["delivered"] > 1]
    assert handed_back, "the stopped holder had no tasks queued: nothing was handed over"
    outcomes = await harness.outcomes(natrio_connection, TASK_TYPE)
    assert outcomes == harness.Outcomes(completed=count, duplicates=0, dead=0)
    print(
        f"{len(ran_on(first))} ran on h1, {len(ran_on(second))} on h2 "
        f"({len(handed_back)} handed back); all done {took:.2f} s after SIGTERM"
    )
