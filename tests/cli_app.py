"""Worker factories for the CLI tests: ``natrio worker tests.cli_app:make_worker``.

Task types are prefixed ``cli-`` so they do not meet other tests' workers.
"""

from __future__ import annotations

import sys

import attrs
import trio

import natrio

#: Not a factory: ``natrio worker tests.cli_app:NOT_CALLABLE`` must be refused.
NOT_CALLABLE = 42


@attrs.frozen
class Pair:
    """The input of ``cli-add``."""

    a: int
    b: int


def make_worker(nc: natrio.Connection) -> natrio.Worker:
    """The worker the CLI tests run in a subprocess."""
    worker = natrio.Worker(nc, concurrency=4, shutdown_grace=10, name="cli-test")

    @worker.handle("cli-echo")
    async def echo(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    @worker.handle_typed("cli-add")
    async def add(ctx: natrio.TaskContext, pair: Pair) -> dict[str, int]:
        return {"sum": pair.a + pair.b}

    @worker.handle("cli-binary")
    async def binary(ctx: natrio.TaskContext) -> bytes:
        return b"\xff\x00binary"

    @worker.handle("cli-fail")
    async def fail(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("refused on purpose")

    @worker.handle("cli-approve")
    async def approve(ctx: natrio.TaskContext) -> bytes:
        # The test waits for this line before it sends the signal, so the step is running
        # (about to wait, or waiting) when the signal comes.
        print(f"APPROVE WAITING {ctx.run_id}", file=sys.stderr, flush=True)
        return await ctx.wait_for_signal("approval", 30)

    @worker.handle("cli-count")
    async def count(ctx: natrio.TaskContext) -> bytes:
        # Waits for "go" so that the test can have `natrio stream` listening first.
        await ctx.wait_for_signal("go", 30)
        for i in range(3):
            await ctx.put_stream(f"chunk {i}".encode())
        return b"counted"

    return worker


async def make_slow_worker(nc: natrio.Connection) -> natrio.Worker:
    """An async factory (the CLI awaits it) for the shutdown test: one slow task type."""
    worker = natrio.Worker(nc, shutdown_grace=10, name="cli-slow")

    @worker.handle("cli-slow")
    async def slow(ctx: natrio.TaskContext) -> bytes:
        # The test waits for this line before it signals the worker, so the task is
        # running when shutdown begins.
        print(f"SLOW STARTED {ctx.run_id}", file=sys.stderr, flush=True)
        await trio.sleep(1.0)
        return b"slow done"

    return worker


def returns_string(nc: natrio.Connection) -> str:
    """A broken factory: returns something other than a Worker."""
    return "not a worker"


def make_routing_worker(nc: natrio.Connection) -> natrio.Worker:
    """A worker with a partitioned task type and a claim, for ``natrio workers``."""
    worker = natrio.Worker(nc, concurrency=2, name="cli-routing", claims=["cli-claim"])

    @worker.handle("cli-part", partitions=4)
    async def part(ctx: natrio.TaskContext) -> bytes:
        return str(ctx.task.partition).encode()

    @worker.handle("cli-targeted")
    async def targeted(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    return worker
