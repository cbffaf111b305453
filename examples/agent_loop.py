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

import attrs
import trio

import natrio

GOAL = 5


@attrs.frozen
class Thought:
    step: int
    notes: list[str]


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
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
