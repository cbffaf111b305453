"""Shared helpers for natrio's tests (fixtures come from natrio's own pytest plugin)."""

from __future__ import annotations

import json
from collections.abc import Callable

import trio

import natrio
from natrio._jetstream import JetStream


async def event_counts(nc: natrio.Connection, kind: str) -> dict[str, int]:
    """How many events of ``kind`` the events stream holds, by subject."""
    info = await JetStream(nc).stream_info(
        "NATRIO_EVENTS", subjects_filter=f"natrio.event.*.*.*.{kind}"
    )
    return dict((info.get("state") or {}).get("subjects") or {})


async def consumer_state(
    nc: natrio.Connection, task_type: str, group: str = "default"
) -> dict[str, int]:
    """Ack-pending and pending (undelivered) counts of one task type's consumer."""
    info = await JetStream(nc).consumer_info("NATRIO_TASKS", f"{task_type}~{group}")
    return {"ack_pending": info["num_ack_pending"], "pending": info["num_pending"]}


def loads(data: bytes) -> object:
    """JSON-decode a payload."""
    return json.loads(data)


async def eventually(condition: Callable[[], object], *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until ``condition()`` is true, looking every 50 ms; fail after ``timeout``.

    For state that changes on its own schedule elsewhere (the server, another worker's
    periodic loop), where there is no event to await.
    """
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - nothing to await: see above
            await trio.sleep(0.05)
