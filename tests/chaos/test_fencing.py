"""A partition member cut off from the server (not crashed, not stopped) must stop running
its partition's task before the server hands the task to the next member.

A worker process reaches the server through a TCP proxy process; SIGSTOP of the proxy
is a silent network partition (the connection stays open, nothing gets through). The
member's directory entry expires, the other member takes the partition, and the server
redelivers the task once its ack wait runs out: by then the cut-off member must have
fenced its execution (docs/routing.md, "Fencing").
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import trio

import natrio
from natrio.testing import WorkerFactory

from ..helpers import event_counts
from ..test_shutdown import read_line


@contextlib.asynccontextmanager
async def process(*argv: str) -> AsyncIterator[trio.Process]:
    """A ``python -m`` process with its stdout piped, killed (and SIGCONT'd) at the end."""
    proc = await trio.lowlevel.open_process([sys.executable, "-m", *argv], stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


@pytest.mark.parametrize("task_type", ["held", "solo"])
async def test_a_cut_off_member_fences_its_exclusive_task_before_another_runs_it(
    task_type: str,
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    started_here: list[float] = []
    done_here = trio.Event()
    worker = natrio_worker_factory(name="b-direct", ack_wait=10.0)

    options = {"partitions": 1} if task_type == "held" else {"singleton": True}

    @worker.handle(task_type, **options)
    async def held(ctx: natrio.TaskContext) -> bytes:
        started_here.append(time.time())
        done_here.set()
        return b"ran on the member that took over"

    port = natrio_server.url.rpartition(":")[2]
    async with process("tests.chaos.tcp_proxy", port) as proxy:
        buffer = bytearray()
        proxy_port = (await read_line(proxy, "READY", buffer)).split()[1]
        async with process(
            "tests.chaos.fenced_worker", f"nats://127.0.0.1:{proxy_port}", "a-proxied"
        ) as cut_off:
            lines = bytearray()
            await read_line(cut_off, "READY", lines)
            # Sorted first, the proxied member holds the only partition of the two; the
            # singleton's task goes to it, the only member when it is submitted.
            if task_type == "held":
                await natrio_worker_factory.start(worker)
            handle = await natrio_client.submit(task_type, b"", run_id="victim")
            start = float((await read_line(cut_off, "START victim", lines)).split()[2])
            if task_type == "solo":
                await natrio_worker_factory.start(worker)
            proxy.send_signal(signal.SIGSTOP)
            cut = time.time()
            with trio.fail_after(20):
                await done_here.wait()
            fenced = float((await read_line(cut_off, "FENCED victim", lines)).split()[2])
            proxy.send_signal(signal.SIGCONT)
            assert await handle.result() == b"ran on the member that took over"
            # Never both at once: the cut-off member gave the task up first.
            assert start < cut < fenced < started_here[0], (start, cut, fenced, started_here)
            assert len(started_here) == 1
            assert worker.statistics().dispatcher.fenced == 0
            assert await event_counts(natrio_connection, "completed") == {
                f"natrio.event.{task_type}.victim.{task_type}.completed": 1
            }
