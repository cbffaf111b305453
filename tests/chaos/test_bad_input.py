"""Scenario 6, bad input: property-based garbage published straight to the task subjects.

Hypothesis draws the messages (random bytes, truncated and wrong-typed envelopes, wrong
and huge headers, invalid UTF-8, deeply nested JSON); they are published bypassing the
client. The worker must never die or stall: every message ends dead-lettered with a
reason, or completed when it happens to be valid, and nothing is left pending.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natrio
from natrio.testing import WorkerFactory

from . import harness

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-=", min_size=1, max_size=12)
HEADER_NAME = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij-", min_size=1, max_size=20)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)


@attrs.frozen
class Order:
    id: int
    sku: str
    lines: list[int]


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=max_leaves,
    )


payloads = st.one_of(
    st.binary(max_size=2048),  # random bytes, invalid UTF-8 included
    st.builds(lambda v: json.dumps(v).encode(), json_values()),  # valid JSON, wrong shape
    st.builds(
        lambda i, s, lines: json.dumps({"id": i, "sku": s, "lines": lines}).encode(),
        st.integers(),
        st.text(max_size=10),
        st.lists(st.integers(), max_size=5),
    ),  # valid orders
    st.builds(lambda d: b"[" * d, st.integers(1000, 50_000)),  # deeply nested, truncated
    st.builds(
        lambda v, cut: json.dumps({"id": v, "sku": "x", "lines": []}).encode()[:cut],
        st.integers(),
        st.integers(0, 20),
    ),  # truncated envelopes
    st.builds(lambda n: json.dumps({"id": "nope", "sku": n, "lines": "x"}).encode(), st.integers()),
)

natrio_headers = st.fixed_dictionaries(
    {},
    optional={
        "Natrio-Retry": st.one_of(HEADER_VALUE, st.builds(lambda v: json.dumps(v), json_values(5))),
        "Natrio-Deadline": st.one_of(
            HEADER_VALUE, st.just("nan"), st.just("inf"), st.just("1e400")
        ),
        "Natrio-Iteration": st.one_of(HEADER_VALUE, st.integers(-5, 5).map(str)),
        "Natrio-Reply": st.one_of(st.just("_INBOX.nowhere"), TOKEN),
    },
)

headers = st.one_of(
    natrio_headers,
    st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=5),
    st.builds(lambda v: {"X-Huge": "h" * v}, st.integers(10_000, 30_000)),  # huge header
)

subject_tails = st.one_of(
    st.builds(lambda r, s: f"{r}.{s}", TOKEN, TOKEN),  # well-formed
    TOKEN,  # a token missing
    st.builds(lambda r, s, x: f"{r}.{s}.{x}", TOKEN, TOKEN, TOKEN),  # one too many
)


@attrs.frozen
class Garbage:
    task_type: str
    tail: str
    payload: bytes
    headers: dict[str, str]


garbage = st.builds(Garbage, st.sampled_from(["raw", "typed"]), subject_tails, payloads, headers)


def draw_messages(count: int) -> list[Garbage]:
    """Hypothesis draws the messages; the property is then checked on all of them at once
    against one real server (a server per example would be far too slow)."""
    drawn: list[Garbage] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(garbage)
    def collect(message: Garbage) -> None:
        drawn.append(message)

    collect()
    return drawn


async def test_bad_input_never_kills_or_stalls_the_worker(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(
        concurrency=8, retry=natrio.RetryPolicy(initial_interval=0.01, maximum_attempts=2)
    )

    @worker.handle("raw")
    async def raw(ctx: natrio.TaskContext) -> bytes:
        return ctx.input[:16]

    @worker.handle_typed("typed")
    async def typed(ctx: natrio.TaskContext, order: Order) -> int:
        return len(order.lines)

    await natrio_worker_factory.start(worker)
    messages = draw_messages(harness.pick(300, 3000))
    dead = await natrio_connection.subscribe("natrio.dead.>")
    completed = await natrio_connection.subscribe("natrio.event.*.*.*.completed")
    published = 0
    with trio.fail_after(harness.pick(60, 300)):
        for i, message in enumerate(messages):
            # A unique run id per message, so each is one task (no dedupe between them).
            tail = f"m{i}x{message.tail}"
            try:
                await natrio_client.js.publish(
                    f"natrio.task.{message.task_type}.default.{tail}",
                    message.payload,
                    headers=message.headers,
                )
            except natrio.NatrioError:
                continue  # refused by the server (e.g. over max_payload): nothing to process
            published += 1
        outcomes = 0
        while outcomes < published:
            with trio.move_on_after(0.05):
                await dead.receive()
                outcomes += 1
                continue
            with trio.move_on_after(0.05):
                await completed.receive()
                outcomes += 1
        # Still serving: a valid task afterwards completes.
        assert await (await natrio_client.submit("raw", b"still alive")).result() == b"still alive"
    left = {t: await harness.pending(natrio_connection, t) for t in ("raw", "typed")}
    assert left == {t: {"ack_pending": 0, "pending": 0} for t in ("raw", "typed")}
    entries = [entry async for entry in natrio_client.dead_letters()]
    assert all(entry.error.message for entry in entries)
    harness.report(
        harness.ScenarioResult(
            scenario="Bad input",
            load=f"{published} hypothesis-drawn messages",
            faults="random bytes, wrong/truncated/deep JSON, bad and huge headers, bad subjects",
            submitted=published,
            completed=outcomes - len(entries),
            dead_lettered=len(entries),
            lost=published - outcomes,
            duplicate_completions=0,
            notes="worker alive and idle afterwards",
        )
    )
