"""An agent loop: a step that runs again and again on its own output until it is done.

Each execution gets the current ``Thought``, does one step of work, and either calls
``ctx.continue_with(next_thought)`` (the step runs again with that as its input and
``ctx.iteration`` one higher) or returns the final answer, which is the step's result.
``max_iterations`` bounds the loop: past it the step is dead-lettered.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/agent_loop.py
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

import natrio

GOAL = 5


@attrs.frozen
class Thought:
    step: int
    notes: list[str]


@asynccontextmanager
async def connection() -> AsyncIterator[natrio.Connection]:
    """A connection to the configured NATS, or to an embedded server if none answers."""
    try:
        async with natrio.connect(connect_timeout=1.0):
            reachable = True
    except natrio.ConnectError as exc:
        print(f"{exc}; starting an embedded nats-server")
        reachable = False
    if reachable:
        async with natrio.connect() as nc:
            print(f"using NATS at {nc.url}")
            yield nc
    else:
        async with natrio.embedded_server() as server, natrio.connect(server.url) as nc:
            print(f"embedded nats-server at {server.url}")
            yield nc


async def main() -> None:
    async with connection() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(nc)

        @worker.handle_typed("agent", max_iterations=10)
        async def agent(ctx: natrio.TaskContext, thought: Thought) -> str | None:
            note = f"observation {thought.step + 1}"
            print(f"iteration {ctx.iteration}: step {thought.step}, adding {note!r}")
            notes = [*thought.notes, note]
            if len(notes) < GOAL:
                await ctx.continue_with(Thought(step=thought.step + 1, notes=notes))
                return None  # ignored: continue_with already ended this execution
            return f"answer after {ctx.iteration} iterations: " + "; ".join(notes)

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)
            handle = await client.submit("agent", Thought(step=0, notes=[]))
            with trio.fail_after(10):
                print("final:", await handle.result(str))
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
