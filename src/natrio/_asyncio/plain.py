"""Running a plain asyncio program in a process that imported natrio.

Importing natrio imports trio_asyncio, which replaces asyncio's loop lookup functions with
ones that first ask Trio for a current task (raising and catching an error on every call
outside Trio) and makes ``asyncio.run`` build a trio-asyncio loop. The bench's baselines
and peer libraries are asyncio programs that live in natrio's package, so :func:`run`
gives them back asyncio as it is without trio_asyncio: measured otherwise, they would pay
for natrio's bridge.
"""

from __future__ import annotations

import _asyncio
import asyncio
import asyncio.events
import asyncio.tasks
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def restore_asyncio() -> None:
    """Undo trio_asyncio's replacements of asyncio's functions for this process.

    Only for processes that never run Trio again: trio-asyncio loops stop working.
    """
    import trio_asyncio._loop as patched

    for module in (asyncio, asyncio.events):
        module.get_running_loop = _asyncio.get_running_loop  # type: ignore[attr-defined]
        module._get_running_loop = _asyncio._get_running_loop  # type: ignore[attr-defined]
        module.get_event_loop = patched._orig_loop_get  # type: ignore[attr-defined]
        module.set_event_loop = patched._orig_loop_set  # type: ignore[attr-defined]
        module.new_event_loop = patched._orig_loop_new  # type: ignore[attr-defined]
        module.get_event_loop_policy = patched._orig_policy_get  # type: ignore[attr-defined]
        module.set_event_loop_policy = patched._orig_policy_set  # type: ignore[attr-defined]
    asyncio.current_task = asyncio.tasks.current_task = patched._orig_current_task
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on asyncio's own event loop, as if natrio were not imported."""
    restore_asyncio()
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main)


def set_at_end_of_stdin(event: asyncio.Event) -> None:
    """Set ``event`` once stdin reaches its end (how the bench stops a server contestant).

    A daemon thread, not the loop's executor: the runner joins its executor's threads, and
    one blocked on stdin after a SIGTERM would keep the process from exiting.
    """
    loop = asyncio.get_running_loop()

    def read() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(event.set)

    threading.Thread(target=read, name="stdin", daemon=True).start()
