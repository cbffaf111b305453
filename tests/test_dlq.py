"""Dead letters read back, replayed and purged, from the client and from ``natrio dlq``.

Against real nats-server processes: entries made by workers (a handler that fails until it
is replayed), and entries and garbage published straight to ``natrio.dead.>``, as anyone
allowed to publish there could.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from click.testing import CliRunner, Result

import natrio
from natrio._cli import cli
from natrio._dead_letters import replay_headers, replay_placement
from natrio._jetstream import JetStream
from natrio._objects import ObjectStore, dead_input_owner
from natrio._outcomes import bounded_headers
from natrio._routing.placement import partition_of
from natrio.testing import WorkerFactory

from .helpers import event_counts

FAST = natrio.RetryPolicy(initial_interval=0.05, maximum_attempts=2)
DOCS = Path(__file__).resolve().parent.parent / "docs"


async def entries(
    client: natrio.Client, task_type: str | None = None, group: str | None = None
) -> list[natrio.DeadLetter]:
    return [entry async for entry in client.dead_letters(task_type, group)]


def entry(
    task_type: str = "fake",
    run_id: str = "run",
    *,
    group: str = "default",
    step_id: str | None = None,
    data: bytes = b"input",
    headers: dict[str, str] | None = None,
    task_seq: int = 10_000,
    message: str = "it broke",
    input_ref: str | None = None,
) -> natrio.DeadLetter:
    """A dead-letter entry as a worker writes it (for a task that never was in the stream)."""
    step_id = step_id or task_type
    return natrio.DeadLetter(
        task_type=task_type,
        group=group,
        run_id=run_id,
        step_id=step_id,
        subject=f"natrio.task.{task_type}.{group}.{run_id}.{step_id}",
        input=data,
        headers=headers or {},
        error=natrio.TaskError("ValueError", message, "Traceback: ...", "fatal", 1),
        attempts=1,
        worker_id="w.0@host",
        time="2030-01-01T00:00:00+00:00",
        task_seq=task_seq,
        input_ref=input_ref,
    )


def dead_subject(e: natrio.DeadLetter) -> str:
    return f"natrio.dead.{e.task_type}.{e.group}.{e.run_id}.{e.step_id}"


async def publish(js: JetStream, e: natrio.DeadLetter) -> int:
    """Store ``e`` in the dead-letter stream as a worker would; its sequence there."""
    return int((await js.publish(dead_subject(e), e.to_json()))["seq"])


async def stored_tasks(nc: natrio.Connection, task_type: str) -> dict[str, int]:
    """The task stream's messages of ``task_type``, by subject."""
    info = await JetStream(nc).stream_info(
        "NATRIO_TASKS", subjects_filter=f"natrio.task.{task_type}.>"
    )
    return dict((info.get("state") or {}).get("subjects") or {})


async def dlq_messages(nc: natrio.Connection) -> int:
    return int((await JetStream(nc).stream_info("NATRIO_DLQ"))["state"]["messages"])


async def update_stream(nc: natrio.Connection, name: str, **changes: Any) -> None:
    js = JetStream(nc)
    config = (await js.stream_info(name))["config"] | changes
    await js.api(f"STREAM.UPDATE.{name}", config)


async def gone_task(js: JetStream) -> int:
    """The sequence of a task that was in the task stream and is gone (as a dead-lettered
    task is, once terminated): what a real entry's ``task_seq`` is."""
    seq = int((await js.publish("natrio.task.gone.default.run.gone", b""))["seq"])
    await js.api("STREAM.MSG.DELETE.NATRIO_TASKS", {"seq": seq})
    return seq


async def forge_event(
    js: JetStream, task_type: str, run_id: str, kind: str, task_seq: int, step_id: str = ""
) -> None:
    """Publish an event of a step as anyone allowed on ``natrio.event.>`` could, with the
    headers a worker gives its events."""
    headers = {
        "Natrio-Outcome": kind,
        "Natrio-Task-Seq": str(task_seq),
        "Natrio-Attempt": "1",
        "Natrio-Worker": "forger.0@host",
    }
    subject = f"natrio.event.{task_type}.{run_id}.{step_id or task_type}.{kind}"
    await js.publish(subject, b"forged", headers=headers)


# -- what a replay keeps (pure) -------------------------------------------------------------


def test_replay_headers_keep_the_submitters_and_renew_natrios() -> None:
    policy = natrio.RetryPolicy(maximum_attempts=7)
    kept, dropped = replay_headers(
        entry(
            headers={
                "Nats-Msg-Id": "task:fake:run:fake",
                "Nats-Expected-Last-Sequence": "3",
                "Natrio-Reply": "_INBOX.old",
                "Natrio-Submitted": "1.5",
                "Natrio-Deadline": "2.5",
                "Natrio-Retry": policy.to_json().replace(" ", "  "),
                "Natrio-Iteration": "4",
                "Natrio-Key": "customer-9",
                "Natrio-Headers-Cut": "3",
                "Trace": "abc",
                "natrio-reply": "_INBOX.sneaky",
                "bad name": "x",
                "Multi": "a\nb",
            }
        )
    )
    assert kept == {
        "Natrio-Retry": policy.to_json(),
        "Natrio-Iteration": "4",
        "Natrio-Key": "customer-9",
        "Trace": "abc",
    }
    assert sorted(dropped) == sorted(
        ["3 headers the entry could not keep", "natrio-reply", "bad name", "Multi"]
    )
    kept, dropped = replay_headers(
        entry(headers={"Natrio-Retry": "{not json", "Natrio-Iteration": "0"})
    )
    assert (kept, sorted(dropped)) == ({}, ["Natrio-Iteration", "Natrio-Retry"])


@pytest.mark.parametrize(
    ("group_token", "partitions", "expected"),
    [
        ("default", None, None),
        ("default~tgpu-1", None, "tgpu-1"),
        ("default~sgpu-1", None, "sgpu-1"),
        # Partitioned since: its tasks go by key, never to a target (as submit has it).
        ("default~tgpu-1", 4, f"p{partition_of('run', 4)}"),
        ("default~p3", 4, "p3"),
        ("default~p3", None, None),  # no longer partitioned
        ("default~p3", 2, f"p{partition_of('run', 2)}"),  # the count no longer has it
        ("default", 8, f"p{partition_of('run', 8)}"),  # partitioned since
        ("default~p03", 8, f"p{partition_of('run', 8)}"),  # not one natrio writes
        ("other~tgpu-1", None, None),  # not the entry's group
    ],
)
def test_replay_placement(group_token: str, partitions: int | None, expected: str | None) -> None:
    e = attrs.evolve(entry(), subject=f"natrio.task.fake.{group_token}.run.fake")
    assert replay_placement(e, partitions) == expected


def test_replay_placement_follows_the_key() -> None:
    assert replay_placement(entry(), 8, "customer-9") == f"p{partition_of('customer-9', 8)}"


@pytest.mark.parametrize(
    "change",
    [
        {"task_type": "a.b"},
        {"group": ""},
        {"run_id": ">"},
        {"step_id": 7},
        {"input": "@@@"},
        {"headers": {"K": 1}},
        {"headers": ["K"]},
        {"error": "boom"},
        {"error": {"type": "T", "message": "m", "traceback": "", "kind": None}},
        {"attempts": -1},
        {"attempts": True},
        {"task_seq": 1.5},
        {"input_ref": ""},
        {"input_ref": "dlq-10000"},  # beside an inline input
        # Another task's stored input (the entry's task_seq is 10000).
        {"input": "", "input_ref": "dlq-9999"},
        {"input": "", "input_ref": "../dlq-10000"},
        {"input": "", "task_seq": 0, "input_ref": "dlq-10000"},
        {"time": None},
        # Header names that are not RFC 7230 tokens, values of more than one line.
        {"headers": {"[/x]": "v"}},
        {"headers": {"[link=https://evil.example]x[/link]": "v"}},
        {"headers": {"K\x1b[2J": "v"}},
        {"headers": {"bad name": "v"}},
        {"headers": {"": "v"}},
        {"headers": {"K": "one\ntwo"}},
        {"headers": {"K": "one\rtwo"}},
    ],
)
def test_entries_that_are_not_valid_are_refused(change: dict[str, Any]) -> None:
    data = json.loads(entry().to_json()) | change
    with pytest.raises(ValueError, match=r"\S"):
        natrio.DeadLetter.from_json(json.dumps(data).encode())


def test_entries_read_back_with_their_seq() -> None:
    original = entry(headers={"K": "v"}, data=b"\x00\xff")
    assert natrio.DeadLetter.from_json(original.to_json(), seq=5) == attrs.evolve(original, seq=5)
    assert "seq" not in json.loads(attrs.evolve(original, seq=5).to_json())
    # The names a worker gives a stored input: its task's, or one by time without a seq.
    for task_seq, ref in ((10_000, "dlq-10000"), (0, "dlq-2030-01-01T00:00:00.5+00:00")):
        stored = entry(data=b"", task_seq=task_seq, input_ref=ref, headers={"K": "[/x] v"})
        assert natrio.DeadLetter.from_json(stored.to_json()) == stored


def test_a_worker_keeps_only_headers_an_entry_may_have() -> None:
    kept = bounded_headers(
        {
            "Natrio-Reply": "_INBOX." + "x" * 5000,
            "bad name": "x",
            "K": "one\ntwo",
            "Long" * 100: "x",
            "Fine": "yes",
        }
    )
    assert set(kept) == {"Natrio-Reply", "Fine", "Natrio-Headers-Cut"}
    assert kept["Natrio-Headers-Cut"] == "3"
    assert "characters cut" in kept["Natrio-Reply"]
    assert len(kept["Natrio-Reply"]) <= 2048
    # What a worker writes, the reader takes.
    written = entry(headers=kept)
    assert natrio.DeadLetter.from_json(written.to_json()) == written


# -- replay ---------------------------------------------------------------------------------


async def test_replay_with_a_fixed_input_runs_with_a_fresh_attempt_budget(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    runs: list[natrio.TaskContext] = []

    @worker.handle("picky")
    async def picky(ctx: natrio.TaskContext) -> bytes:
        runs.append(ctx)
        if ctx.input != b"fixed":
            raise ValueError(f"cannot use {ctx.input!r}")
        return b"ok " + ctx.input

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit(
        "picky", b"broken", run_id="r1", headers={"K": "v"}, retry=FAST, deadline=3600
    )
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
        await handle.result()
    [dead] = await entries(natrio_client, "picky")
    assert dead.seq > 0
    assert (dead.error.kind, dead.attempts, dead.input) == ("exhausted", 2, b"broken")

    replayed = await natrio_client.replay(dead, input=b"fixed")
    with trio.fail_after(10):
        assert await replayed.result() == b"ok fixed"
    assert (replayed.task_type, replayed.run_id, replayed.step_id, replayed.group) == (
        "picky",
        "r1",
        "picky",
        "default",
    )
    assert replayed.seq is not None
    assert replayed.seq > dead.task_seq
    assert not replayed.duplicate
    last = runs[-1]
    # A new task message: its first attempt, the submitter's header and policy kept, the
    # deadline dropped.
    assert [ctx.attempt for ctx in runs] == [1, 2, 1]
    assert last.headers["K"] == "v"
    assert last.policy == FAST
    assert last.deadline is None
    assert runs[0].deadline is not None
    assert await entries(natrio_client, "picky") == []
    # The step's outcome, for anyone asking by its ids, is now the replay's.
    assert await natrio_client.handle("picky", "r1", "picky").result() == b"ok fixed"


async def test_replay_reruns_the_original_input_and_a_deadline_can_be_given(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    seen: list[tuple[bytes, float | None]] = []

    @worker.handle("second-time")
    async def second_time(ctx: natrio.TaskContext) -> bytes:
        seen.append((ctx.input, ctx.deadline))
        if len(seen) == 1:
            raise natrio.Fatal("not yet")
        return ctx.input.upper()

    await natrio_worker_factory.start(worker)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("second-time", b"hello")).result()
    [dead] = await entries(natrio_client)
    asked = time.time()
    handle = await natrio_client.replay(dead.seq, deadline=600)
    with trio.fail_after(10):
        assert await handle.result() == b"HELLO"
    assert seen[1][0] == b"hello"
    deadline = seen[1][1]
    assert deadline is not None
    assert asked + 600 <= deadline <= time.time() + 600
    assert await natrio_client.dead_letter(dead.seq) is None
    # Gone: a second replay of the same entry has nothing to replay.
    with pytest.raises(natrio.NatrioError, match="not in NATRIO_DLQ"):
        await natrio_client.replay(dead.seq)
    assert len(seen) == 2


async def test_replay_of_an_input_kept_in_the_object_store(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory()
    sizes: list[int] = []

    @worker.handle("bulky")
    async def bulky(ctx: natrio.TaskContext) -> bytes:
        sizes.append(len(ctx.input))
        if len(sizes) == 1:
            raise natrio.Fatal("too early")
        return str(len(ctx.input)).encode()

    await natrio_worker_factory.start(worker)
    # Fits in a task message, not in an entry (base64 and the rest beside it).
    payload = bytes(range(256)) * (natrio_connection.max_payload * 9 // 10 // 256)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("bulky", payload)).result()
    [dead] = await entries(natrio_client, "bulky")
    assert dead.input == b""
    assert dead.input_ref is not None
    handle = await natrio_client.replay(dead)
    with trio.fail_after(10):
        assert await handle.result() == str(len(payload)).encode()
    assert sizes == [len(payload), len(payload)]
    assert await entries(natrio_client) == []
    # Its stored input went with it: no chunk of it is left.
    with pytest.raises(natrio.NatrioError, match="is gone"):
        await natrio_client.dead_letter_input(dead)
    info = await JetStream(natrio_connection).stream_info(
        "OBJ_natrio_dead_inputs", subjects_filter="$O.natrio_dead_inputs.C.>"
    )
    assert not (info.get("state") or {}).get("subjects")


async def test_the_entry_stays_when_the_replay_cannot_be_stored(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    original = entry("refused", data=b"x" * 1000)
    seq = await publish(natrio_client.js, original)
    # The task stream refuses the replay (a real refusal: a message over its size limit).
    await update_stream(natrio_connection, "NATRIO_TASKS", max_msg_size=256)
    with pytest.raises(natrio.JetStreamError):
        await natrio_client.replay(seq)
    assert await natrio_client.dead_letter(seq) == attrs.evolve(original, seq=seq)
    assert await stored_tasks(natrio_connection, "refused") == {}

    await update_stream(natrio_connection, "NATRIO_TASKS", max_msg_size=-1)
    handle = await natrio_client.replay(seq)
    # Stored first, then removed.
    assert await stored_tasks(natrio_connection, "refused") == {
        "natrio.task.refused.default.run.refused": 1
    }
    assert handle.seq is not None
    assert await natrio_client.dead_letter(seq) is None


async def test_replaying_twice_makes_one_task_even_when_the_entry_stays(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As if the process died between storing the replay and removing the entry, and the
    next replay came after the duplicate window: only the look for a newer task keeps it
    from storing a second one (the replay's message id no longer does)."""
    window = 0.2
    await natrio.provision(natrio_connection, duplicate_window=window)
    js = natrio_client.js
    seq = await publish(js, entry("twice", data=b"once", task_seq=await gone_task(js)))
    # Entries cannot be removed from now on (a stream cannot take that back).
    await update_stream(natrio_connection, "NATRIO_DLQ", deny_delete=True)
    with caplog.at_level(logging.WARNING, logger="natrio.dead_letters"):
        first = await natrio_client.replay(seq)
    assert not first.duplicate
    assert any("could not be removed" in r.getMessage() for r in caplog.records)
    assert await natrio_client.dead_letter(seq) is not None

    # Waiting in the task stream: a second replay finds it and queues nothing.
    await trio.sleep(2 * window)
    second = await natrio_client.replay(seq)
    assert (second.duplicate, second.seq) == (True, first.seq)
    assert await stored_tasks(natrio_connection, "twice") == {
        "natrio.task.twice.default.run.twice": 1
    }

    # Run and gone from the task stream: its events tell the next replay.
    worker = natrio_worker_factory()
    runs: list[bytes] = []

    @worker.handle("twice")
    async def twice(ctx: natrio.TaskContext) -> bytes:
        runs.append(ctx.input)
        return ctx.input

    await natrio_worker_factory.start(worker)
    with trio.fail_after(10):
        assert await first.result() == b"once"
    await trio.sleep(2 * window)
    third = await natrio_client.replay(seq)
    assert (third.duplicate, third.seq) == (True, first.seq)
    with trio.fail_after(10):
        assert await third.result() == b"once"
    assert runs == [b"once"]
    assert sum((await event_counts(natrio_connection, "completed")).values()) == 1
    assert await stored_tasks(natrio_connection, "twice") == {}


class Interleaved(JetStream):
    """The client's JetStream API, running ``meanwhile`` once, right after the first look
    a replay takes at the task stream or the events stream for a newer task."""

    def __init__(self, nc: natrio.Connection, meanwhile: Any) -> None:
        super().__init__(nc)
        self.meanwhile = meanwhile
        self.looks: list[str] = []

    async def _looked(self, what: str) -> None:
        self.looks.append(what)
        if len(self.looks) == 1:
            await self.meanwhile()

    async def api(self, subject: str, body: Any = None) -> dict[str, Any]:
        try:
            return await super().api(subject, body)
        finally:
            if subject.startswith(("STREAM.MSG.GET.NATRIO_TASKS", "STREAM.INFO.NATRIO_TASKS")):
                await self._looked("tasks")

    async def last_message(self, stream: str, subject: str) -> natrio.Message | None:
        try:
            return await super().last_message(stream, subject)
        finally:
            if stream == "NATRIO_EVENTS":
                await self._looked("events")

    async def messages(
        self, stream: str, subjects_filter: str, **options: Any
    ) -> tuple[list[natrio.Message], bool]:
        try:
            return await super().messages(stream, subjects_filter, **options)
        finally:
            if stream == "NATRIO_EVENTS":
                await self._looked("events")


async def test_a_replay_that_finishes_while_a_replay_looks_is_seen(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    """A replay task leaves the task stream only once its outcome's event is stored: one
    that finishes between the look at the task stream and the look at the events is in
    the second look, whichever comes first (events first would miss it)."""
    window = 0.2
    await natrio.provision(natrio_connection, duplicate_window=window)
    js = natrio_client.js
    seq = await publish(js, entry("between", data=b"in", task_seq=await gone_task(js)))
    await update_stream(natrio_connection, "NATRIO_DLQ", deny_delete=True)
    first = await natrio_client.replay(seq)  # stored; its entry stays
    await trio.sleep(2 * window)

    runs: list[bytes] = []

    async def run_the_replay() -> None:
        worker = natrio_worker_factory()

        @worker.handle("between")
        async def between(ctx: natrio.TaskContext) -> bytes:
            runs.append(ctx.input)
            return ctx.input

        await natrio_worker_factory.start(worker)
        with trio.fail_after(10):
            assert await first.result() == b"in"
            # Acked after its event is stored; the server's state has no event to await.
            while await stored_tasks(natrio_connection, "between"):  # noqa: ASYNC110
                await trio.sleep(0.02)

    looking = natrio.Client(natrio_connection)
    looking.js = interleaved = Interleaved(natrio_connection, run_the_replay)
    second = await looking.replay(seq)
    assert await stored_tasks(natrio_connection, "between") == {}
    assert (second.duplicate, second.seq) == (True, first.seq)
    assert runs == [b"in"]
    assert interleaved.looks[0] == "tasks"


async def test_forged_events_and_tasks_of_other_groups_are_no_replay(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    """Anyone allowed on natrio's subjects can store events and tasks: what is not
    evidence of a newer task of the step in its group does not stop a replay."""
    js = natrio_client.js
    task_seq = await gone_task(js)
    original = entry("forged", data=b"real", task_seq=task_seq)
    seq = await publish(js, original)
    # A task of the step in a group nobody serves, and events: one for a task the stream
    # never had, one for that other group's task (still there, so its subject shows
    # whose it is), and one that is not an event natrio writes.
    plausible = await gone_task(js)
    foreign = int((await js.publish("natrio.task.forged.nobody.run.forged", b"x"))["seq"])
    await forge_event(js, "forged", "run", "completed", 999_999_999)
    await forge_event(js, "forged", "run", "completed", foreign)
    await js.publish(
        "natrio.event.forged.run.forged.dead", b"{}", headers={"Natrio-Task-Seq": str(plausible)}
    )
    handle = await natrio_client.replay(seq)
    assert not handle.duplicate
    assert handle.seq is not None
    assert handle.seq > foreign
    assert await stored_tasks(natrio_connection, "forged") == {
        "natrio.task.forged.nobody.run.forged": 1,
        "natrio.task.forged.default.run.forged": 1,
    }
    assert await natrio_client.dead_letter(seq) is None


async def test_an_entry_found_replayed_already_stays_with_its_input(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    """Evidence of a newer task that cannot be told from a forgery leaves everything as it
    was: the entry and its stored input stay, and nothing is lost if it was forged."""
    js = natrio_client.js
    task_seq = await gone_task(js)
    original = entry("kept", data=b"", task_seq=task_seq, input_ref=f"dlq-{task_seq}")
    await ObjectStore(js, "natrio_dead_inputs").put(
        f"dlq-{task_seq}", b"stored input", owner=dead_input_owner(original)
    )
    seq = await publish(js, original)
    # An event of the step for a task that was in the stream and is gone: it could be a
    # replay that ran, or a forgery.
    newer = await gone_task(js)
    await forge_event(js, "kept", "run", "completed", newer)
    handle = await natrio_client.replay(seq)
    assert (handle.duplicate, handle.seq) == (True, newer)
    assert await natrio_client.dead_letter(seq) == attrs.evolve(original, seq=seq)
    assert await natrio_client.dead_letter_input(original) == b"stored input"
    assert await stored_tasks(natrio_connection, "kept") == {}


async def test_a_message_with_the_replays_id_elsewhere_is_no_replay(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    js = natrio_client.js
    seq = await publish(js, entry("squatted", task_seq=await gone_task(js)))
    # The task stream drops a message with an id it has seen, whatever its subject.
    await js.publish(
        "natrio.task.squatted.nobody.run.squatted",
        b"",
        headers={"Nats-Msg-Id": f"replay:squatted:run:squatted:{seq}"},
    )
    with pytest.raises(natrio.NatrioError, match="its replay's id"):
        await natrio_client.replay(seq)
    assert await natrio_client.dead_letter(seq) is not None


async def test_concurrent_replays_of_one_entry_make_one_task(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    seq = await publish(natrio_client.js, entry("racing"))
    handles: list[natrio.TaskHandle] = []
    errors: list[natrio.NatrioError] = []

    async def replay() -> None:
        try:
            handles.append(await natrio_client.replay(seq))
        except natrio.NatrioError as exc:  # the other one removed the entry first
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(replay)
    assert handles
    assert all("not in NATRIO_DLQ" in str(exc) for exc in errors)
    assert len({handle.seq for handle in handles}) == 1
    assert await stored_tasks(natrio_connection, "racing") == {
        "natrio.task.racing.default.run.racing": 1
    }
    assert await natrio_client.dead_letter(seq) is None


async def test_replay_keeps_the_partition_and_the_claim(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    placed = attrs.evolve(
        entry("claimed", "r-claim"), subject="natrio.task.claimed.default~tgpu-1.r-claim.claimed"
    )
    seq = await publish(natrio_client.js, placed)
    await natrio_client.replay(seq)
    assert await stored_tasks(natrio_connection, "claimed") == {
        "natrio.task.claimed.default~tgpu-1.r-claim.claimed": 1
    }
    # The claim's consumer is made, as a submit with target= makes it.
    info = await natrio_client.js.consumer_info("NATRIO_TASKS", "claimed~default~tgpu-1")
    assert info["config"]["filter_subject"] == "natrio.task.claimed.default~tgpu-1.>"

    await natrio.provision(natrio_connection, worker_ttl=2.0, partitions={"parted": 4})
    # Not the partition of its run id: a key chose it, and the replay keeps it.
    other = next(k for k in range(4) if k != partition_of("r-part", 4))
    placed = attrs.evolve(
        entry("parted", "r-part"), subject=f"natrio.task.parted.default~p{other}.r-part.parted"
    )
    await natrio_client.replay(await publish(natrio_client.js, placed))
    assert await stored_tasks(natrio_connection, "parted") == {
        f"natrio.task.parted.default~p{other}.r-part.parted": 1
    }


# -- filters and purge ----------------------------------------------------------------------


async def test_filters_by_type_and_group_and_purge(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(groups=("default", "gpu"))

    async def refuse(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("no")

    worker.handle("dlq-a", refuse)
    worker.handle("dlq-b", refuse)
    await natrio_worker_factory.start(worker)
    large = b"z" * (natrio_connection.max_payload * 9 // 10)
    for task_type, group in (("dlq-a", None), ("dlq-a", "gpu"), ("dlq-b", None)):
        with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
            await (await natrio_client.submit(task_type, b"in", group=group)).result()
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("dlq-b", large, group="gpu")).result()

    def kinds(found: list[natrio.DeadLetter]) -> list[tuple[str, str]]:
        return [(e.task_type, e.group) for e in found]

    everything = await entries(natrio_client)
    assert kinds(everything) == [
        ("dlq-a", "default"),
        ("dlq-a", "gpu"),
        ("dlq-b", "default"),
        ("dlq-b", "gpu"),
    ]
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    assert kinds(await entries(natrio_client, "dlq-a")) == [("dlq-a", "default"), ("dlq-a", "gpu")]
    assert kinds(await entries(natrio_client, group="gpu")) == [("dlq-a", "gpu"), ("dlq-b", "gpu")]
    assert kinds(await entries(natrio_client, "dlq-b", "default")) == [("dlq-b", "default")]
    stored = everything[3]
    assert stored.input_ref is not None

    assert await natrio_client.purge_dead_letters("dlq-a") == 2
    assert kinds(await entries(natrio_client)) == [("dlq-b", "default"), ("dlq-b", "gpu")]
    assert await natrio_client.purge_dead_letters(group="gpu") == 1
    with pytest.raises(natrio.NatrioError, match="is gone"):
        await natrio_client.dead_letter_input(stored)
    assert await natrio_client.purge_dead_letters("nothing-here") == 0
    assert await natrio_client.purge_dead_letters() == 1
    assert await entries(natrio_client) == []
    with pytest.raises(natrio.ConfigurationError):
        natrio_client.dead_letters("not.a.type")
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.purge_dead_letters(group="*")


async def test_pages_cover_the_whole_stream(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    for number in range(600):
        await publish(natrio_client.js, entry("paged", f"r{number}", task_seq=number + 1))
    reader = natrio_client.dead_letters("paged")
    assert reader.page < 600
    found = [e async for e in reader]
    assert [e.run_id for e in found] == [f"r{n}" for n in range(600)]
    assert reader.skipped == []


# -- hostile entries ------------------------------------------------------------------------


async def test_garbage_in_the_dead_letter_stream_is_skipped_with_a_warning(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    js = natrio_client.js
    good = entry("victim", "good")
    garbage = {
        "natrio.dead.x": b"garbage",
        "natrio.dead.victim.default.r.victim": b"\xff\xfe not json",
        "natrio.dead.victim.default.list.victim": b"[1, 2, 3]",
        "natrio.dead.victim.default.deep.victim": b"[" * 100_000,
        "natrio.dead.victim.default.huge.victim": b'{"attempts": 1' + b"0" * 5000 + b"}",
        # A valid entry, but for another task type than its subject says.
        "natrio.dead.victim.default.good.victim": entry("billing", "good").to_json(),
        "natrio.dead.victim.default.b64.victim": json.dumps(
            json.loads(good.to_json()) | {"input": "not base64!"}
        ).encode(),
        "natrio.dead.victim.default.ids.victim": json.dumps(
            json.loads(good.to_json()) | {"run_id": "a.b", "step_id": ">"}
        ).encode(),
        "natrio.dead.victim.default.kind.victim": json.dumps(
            json.loads(good.to_json()) | {"error": {"type": 1}, "attempts": True}
        ).encode(),
        # On their own subjects, but with headers that could not be shown or published
        # again, or another task's stored input (purging or replaying would delete it).
        "natrio.dead.victim.default.names.victim": json.dumps(
            json.loads(entry("victim", "names").to_json())
            | {"headers": {"[/x]": "1", "bad name": "x"}}
        ).encode(),
        "natrio.dead.victim.default.lines.victim": json.dumps(
            json.loads(entry("victim", "lines").to_json())
            | {"headers": {"K": "a\r\nNatrio-Reply: _INBOX.x"}}
        ).encode(),
        "natrio.dead.victim.default.theirs.victim": json.dumps(
            json.loads(entry("victim", "theirs").to_json()) | {"input": "", "input_ref": "dlq-1"}
        ).encode(),
    }
    bad_seqs = [int((await js.publish(s, data))["seq"]) for s, data in garbage.items()]
    # Valid, but with headers no task may carry, and another whose stored input is missing.
    odd = entry(
        "victim", "odd", headers={"Good": "yes", "natrio-reply": "_INBOX.x", "Natrio-Bogus": "1"}
    )
    odd_seq = await publish(js, odd)
    lost = entry("victim", "lost", data=b"", input_ref="dlq-10000")
    lost_seq = await publish(js, lost)
    good_seq = await publish(js, good)

    with caplog.at_level(logging.WARNING, logger="natrio.dead_letters"):
        reader = natrio_client.dead_letters()
        found = [e async for e in reader]
    assert [e.seq for e in found] == [odd_seq, lost_seq, good_seq]
    assert [seq for seq, _ in reader.skipped] == bad_seqs
    warned = [r.getMessage() for r in caplog.records if "not a dead-letter entry" in r.getMessage()]
    assert len(warned) == len(bad_seqs)
    reasons = dict(reader.skipped)
    assert "another subject" in reasons[bad_seqs[5]]
    assert "'[/x]' is not a token" in reasons[bad_seqs[9]]
    assert "'K' is not a token with a one-line value" in reasons[bad_seqs[10]]
    assert "not the name of this task's input" in reasons[bad_seqs[11]]
    assert len(await entries(natrio_client, "victim")) == 3

    # Nothing is done on the word of garbage, and it stays where it is.
    for seq in bad_seqs:
        with pytest.raises(natrio.NatrioError, match="not a dead-letter entry"):
            await natrio_client.dead_letter(seq)
        with pytest.raises(natrio.NatrioError, match="not a dead-letter entry"):
            await natrio_client.replay(seq)
    with pytest.raises(natrio.NatrioError, match="is gone"):
        await natrio_client.replay(lost_seq)
    assert await dlq_messages(natrio_connection) == len(bad_seqs) + 3
    assert await stored_tasks(natrio_connection, "victim") == {}

    worker = natrio_worker_factory()
    headers: list[dict[str, str]] = []

    @worker.handle("victim")
    async def victim(ctx: natrio.TaskContext) -> bytes:
        headers.append(dict(ctx.headers))
        return b"done"

    await natrio_worker_factory.start(worker)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="natrio.dead_letters"):
        handle = await natrio_client.replay(odd_seq)
    with trio.fail_after(10):
        assert await handle.result() == b"done"
    assert headers[0]["Good"] == "yes"
    assert "natrio-reply" not in headers[0]
    assert "Natrio-Bogus" not in headers[0]
    assert any("'Natrio-Bogus'" in r.getMessage() for r in caplog.records)

    # Purge takes the garbage too.
    assert await natrio_client.purge_dead_letters() == len(bad_seqs) + 2
    assert await dlq_messages(natrio_connection) == 0


def description_subject(name: str) -> str:
    return "$O.natrio_dead_inputs.M." + base64.urlsafe_b64encode(name.encode()).decode()


async def describe(js: JetStream, name: str, description: bytes) -> None:
    """Write the description of object ``name`` as anyone allowed on ``$O.>`` could."""
    await js.publish(description_subject(name), description, headers={"Nats-Rollup": "sub"})


async def test_damaged_stored_inputs_are_natrio_errors(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    js = natrio_client.js
    store = ObjectStore(js, "natrio_dead_inputs")
    theirs = entry("owner", data=b"", task_seq=1, input_ref="dlq-1")
    secret = b"someone else's input"
    await store.put("dlq-1", secret, owner=dead_input_owner(theirs))
    stored = await js.last_message("OBJ_natrio_dead_inputs", description_subject("dlq-1"))
    assert stored is not None
    real = json.loads(stored.data)
    assert real["metadata"] == {"natrio-owner": "natrio.dead.owner.default.run.owner"}
    unowned = {key: value for key, value in real.items() if key != "metadata"}
    damaged: list[dict[str, Any] | bytes] = [
        b"{not json",
        b"[1, 2]",
        {"size": 3, "chunks": 1},  # no nuid
        real | {"nuid": ">"},  # a wildcard: every chunk of the bucket
        real | {"nuid": "*"},
        real | {"size": "many"},
        real | {"chunks": -1},
        real | {"size": len(secret), "chunks": 0},
        real | {"size": 2**40},
        real | {"digest": "MD5=abc"},
        real | {"metadata": ["x"]},
        # Another object's chunks under a description of this name: its digest does not
        # match, or its owner is another.
        unowned | {"digest": "SHA-256=" + base64.urlsafe_b64encode(b"x" * 32).decode()},
        real,
        json.dumps(unowned).encode(),  # the description of dlq-1, under another name
    ]
    for number, description in enumerate(damaged, start=2):
        name = f"dlq-{number}"
        if isinstance(description, dict):
            description = json.dumps(description | {"name": name}).encode()
        await describe(js, name, description)
        victim = entry("damaged", f"r{number}", data=b"", task_seq=number, input_ref=name)
        with pytest.raises(natrio.NatrioError, match=name) as raised:
            await natrio_client.dead_letter_input(victim)
        assert secret.decode() not in str(raised.value)
        # Nor is anything deleted on its word.
        with pytest.raises(natrio.NatrioError, match=name):
            await store.delete(name, owner=dead_input_owner(victim))
    assert await store.get("dlq-1", owner=dead_input_owner(theirs)) == secret
    # An entry naming another's input is none (DeadLetter.from_json), and one built by
    # hand cannot read it.
    with pytest.raises(natrio.NatrioError, match="its own name"):
        await natrio_client.dead_letter_input(attrs.evolve(theirs, task_seq=7))


async def test_a_forged_entry_cannot_take_another_entrys_input(
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    js = natrio_client.js
    task_seq = await gone_task(js)
    name = f"dlq-{task_seq}"
    real = entry("owner", data=b"", task_seq=task_seq, input_ref=name)
    await ObjectStore(js, "natrio_dead_inputs").put(name, b"mine", owner=dead_input_owner(real))
    real_seq = await publish(js, real)
    # The same task sequence and input name, on another type's subject.
    forged = entry("thief", data=b"", task_seq=task_seq, input_ref=name)
    forged_seq = await publish(js, forged)
    with pytest.raises(natrio.NatrioError, match="belongs to"):
        await natrio_client.replay(forged_seq)
    assert await stored_tasks(natrio_connection, "thief") == {}
    with caplog.at_level(logging.WARNING, logger="natrio.dead_letters"):
        assert await natrio_client.purge_dead_letters("thief") == 1
    assert any("could not delete the stored input" in r.getMessage() for r in caplog.records)
    assert await natrio_client.dead_letter_input(real) == b"mine"
    handle = await natrio_client.replay(real_seq)
    assert not handle.duplicate
    assert await stored_tasks(natrio_connection, "owner") == {
        "natrio.task.owner.default.run.owner": 1
    }


# -- permissions ----------------------------------------------------------------------------

OPERATOR_INBOX = "_INBOX_dlq_operator"
#: What docs/permissions.md lists for replaying and purging dead letters of `resize`.
OPERATOR_PUBLISH = (
    "natrio.task.resize.>",
    "$JS.API.DIRECT.GET.NATRIO_EVENTS.natrio.event.resize.>",
    "$JS.API.DIRECT.GET.KV_natrio_routing.$KV.natrio_routing.partitions.resize",
    "$JS.API.CONSUMER.CREATE.NATRIO_DLQ.*.natrio.dead.resize.>",
    "$JS.API.CONSUMER.MSG.NEXT.NATRIO_DLQ.*",
    "$JS.API.CONSUMER.DELETE.NATRIO_DLQ.*",
    "$JS.API.DIRECT.GET.NATRIO_DLQ",
    "$JS.API.STREAM.MSG.GET.NATRIO_TASKS",
    "$JS.API.STREAM.INFO.NATRIO_TASKS",
    "$JS.API.DIRECT.GET.NATRIO_EVENTS",
    "$JS.API.STREAM.MSG.DELETE.NATRIO_DLQ",
    "$JS.API.STREAM.PURGE.NATRIO_DLQ",
    "$JS.API.DIRECT.GET.OBJ_natrio_dead_inputs",
    "$JS.API.DIRECT.GET.OBJ_natrio_dead_inputs.$O.natrio_dead_inputs.M.>",
    "$O.natrio_dead_inputs.M.>",
    "$JS.API.STREAM.PURGE.OBJ_natrio_dead_inputs",
)


@asynccontextmanager
async def server_with_operator(tmp_path: Path) -> AsyncIterator[natrio.EmbeddedServer]:
    users = [
        '{ user: "admin", password: "admin-pw" }',
        '{ user: "operator", password: "operator-pw", permissions: { publish: { allow: '
        f"{json.dumps(list(OPERATOR_PUBLISH))} }}, subscribe: {{ allow: "
        f'["{OPERATOR_INBOX}.>"] }} }} }}',
    ]
    config = tmp_path / "nats-server.conf"
    config.write_text("authorization {\n  users = [\n    " + "\n    ".join(users) + "\n  ]\n}\n")
    async with natrio.embedded_server(args=["-c", str(config)]) as server:
        yield server


def violations(server: natrio.EmbeddedServer) -> list[str]:
    return [line for line in server.log_tail.splitlines() if "Violation" in line]


async def test_the_documented_permissions_suffice_to_replay_and_purge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="natrio.dead_letters")
    url = "nats://{}@127.0.0.1:{}"
    async with server_with_operator(tmp_path) as server:
        async with natrio.connect(url.format("admin:admin-pw", server.port)) as admin:
            await natrio.provision(admin, worker_ttl=2.0)
            worker = natrio.Worker(admin, shutdown_grace=0)
            calls: list[int] = []

            @worker.handle("resize")
            async def resize(ctx: natrio.TaskContext) -> bytes:
                calls.append(len(ctx.input))
                if len(calls) <= 2:
                    raise natrio.Fatal("first time")
                return b"resized"

            large = b"p" * (admin.max_payload * 9 // 10)
            async with (
                natrio.open_worker(worker, grace=0),
                natrio.connect(
                    url.format("operator:operator-pw", server.port), inbox_prefix=OPERATOR_INBOX
                ) as operator_nc,
            ):
                admin_client = natrio.Client(admin)
                for payload in (b"small", large):
                    with trio.fail_after(10), pytest.raises(natrio.TaskFailed):
                        await (await admin_client.submit("resize", payload)).result()
                # Its inbox is not under the worker's prefix, so no direct replies: the
                # results are read from the events stream.
                operator = natrio.Client(operator_nc, check_interval=0.2)
                small, big = await entries(operator, "resize")
                assert big.input_ref is not None
                assert await operator.dead_letter(small.seq) == small
                with trio.fail_after(10):
                    assert await (await operator.replay(small)).result() == b"resized"
                    assert await (await operator.replay(big)).result() == b"resized"
                await publish(admin_client.js, entry("resize", "other"))
                assert await operator.purge_dead_letters("resize") == 1
                assert await entries(operator, "resize") == []
        assert violations(server) == []
    # Nothing left behind either: the entries and the stored input were removed.
    assert [r.getMessage() for r in caplog.records if r.name == "natrio.dead_letters"] == []
    page = (DOCS / "permissions.md").read_text(encoding="utf-8")
    for subject in OPERATOR_PUBLISH:
        assert f"`{subject}`" in page, subject


# -- natrio dlq -----------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    runner = CliRunner(env={"NATRIO_URL": None})
    return runner.invoke(cli, list(args), catch_exceptions=True)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exception, result.stdout, result.stderr)
    return result


def seed(
    url: str, items: Sequence[natrio.DeadLetter], garbage: Sequence[tuple[str, bytes]] = ()
) -> list[int]:
    """Provision the server at ``url`` and store ``items`` then ``garbage``: their seqs."""

    async def main() -> list[int]:
        async with natrio.connect(url) as nc:
            await natrio.provision(nc)
            js = JetStream(nc)
            seqs = [await publish(js, item) for item in items]
            for subject, data in garbage:
                seqs.append(int((await js.publish(subject, data))["seq"]))
            return seqs

    return trio.run(main)


def task_subjects(url: str) -> dict[str, int]:
    async def main() -> dict[str, int]:
        async with natrio.connect(url) as nc:
            info = await JetStream(nc).stream_info("NATRIO_TASKS", subjects_filter=">")
            return dict((info.get("state") or {}).get("subjects") or {})

    return trio.run(main)


ESCAPE = "\x1b[2J\x1b[31m"


def test_dlq_list_and_show(natrio_server: natrio.EmbeddedServer) -> None:
    url = natrio_server.url
    nasty = entry(
        "cli-a",
        "r-nasty",
        data=f"line one\n{ESCAPE}red\x00".encode(),
        message=f"bad {ESCAPE}thing",
        headers={"K": "v"},
    )
    binary = entry("cli-b", "r-binary", group="gpu", data=b"\xff\x00\x01")
    seqs = seed(url, [nasty, binary], [("natrio.dead.junk", b"junk")])

    result = ok(invoke("dlq", "list", "--url", url, "--json"))
    listed = json.loads(result.stdout)
    assert [item["seq"] for item in listed] == seqs[:2]
    first = listed[0]
    assert (first["task_type"], first["group"], first["run_id"], first["step_id"]) == (
        "cli-a",
        "default",
        "r-nasty",
        "cli-a",
    )
    assert first["error"] == {
        "type": "ValueError",
        "message": f"bad {ESCAPE}thing",
        "kind": "fatal",
        "attempts": 1,
    }
    assert (first["attempts"], first["worker_id"], first["input_size"]) == (
        1,
        "w.0@host",
        len(nasty.input),
    )
    assert "input" not in first
    assert f"seq {seqs[2]}" in result.stderr
    assert "not dead-letter entries" in result.stderr
    only_b = json.loads(ok(invoke("dlq", "list", "--url", url, "--json", "--type", "cli-b")).stdout)
    assert [item["run_id"] for item in only_b] == ["r-binary"]
    only_gpu = json.loads(
        ok(invoke("dlq", "list", "--url", url, "--json", "--group", "gpu")).stdout
    )
    assert [item["run_id"] for item in only_gpu] == ["r-binary"]
    assert (
        json.loads(ok(invoke("dlq", "list", "--url", url, "--json", "--type", "none")).stdout) == []
    )

    table = ok(invoke("dlq", "list", "--url", url)).stdout
    row = next(line for line in table.splitlines() if "r-nasty" in line)
    assert str(seqs[0]) in row
    assert "fatal" in row
    assert "\x1b" not in table
    assert "\\x1b" in table

    shown = json.loads(ok(invoke("dlq", "show", str(seqs[0]), "--url", url, "--json")).stdout)
    assert shown["input"] == nasty.input.decode()
    assert base64.b64decode(shown["input_base64"]) == nasty.input
    assert shown["error"]["traceback"] == "Traceback: ..."
    assert shown["headers"] == {"K": "v"}
    shown = json.loads(ok(invoke("dlq", "show", str(seqs[1]), "--url", url, "--json")).stdout)
    assert shown["input"] is None
    assert base64.b64decode(shown["input_base64"]) == b"\xff\x00\x01"

    text = ok(invoke("dlq", "show", str(seqs[0]), "--url", url)).stdout
    assert "\x1b" not in text
    assert "\x00" not in text
    assert "\\x1b[2J\\x1b[31mred\\x00" in text
    assert "line one" in text
    assert "w.0@host" in text
    assert "header K" in text
    assert repr(b"\xff\x00\x01") in ok(invoke("dlq", "show", str(seqs[1]), "--url", url)).stdout

    result = invoke("dlq", "show", str(seqs[2]), "--url", url)
    assert result.exit_code == 1
    assert "not a dead-letter entry" in result.stderr
    result = invoke("dlq", "show", "999", "--url", url)
    assert result.exit_code == 1
    assert "no dead letter 999" in result.stderr


def test_dlq_replay_and_purge(natrio_server: natrio.EmbeddedServer) -> None:
    url = natrio_server.url
    items = [
        entry("cli-r", "r-1"),
        entry("cli-r", "r-2", task_seq=10_001),
        entry("cli-s", "s-1", task_seq=10_002),
        entry("cli-s", "s-2", task_seq=10_003),
        entry("cli-t", "t-1", task_seq=10_004),
    ]
    seqs = seed(url, items, [("natrio.dead.junk", b"junk")])

    result = ok(invoke("dlq", "replay", str(seqs[0]), "--url", url))
    run_id, step_id, task_seq = result.stdout.split()
    assert (run_id, step_id) == ("r-1", "cli-r")
    assert int(task_seq) > 0
    assert task_subjects(url) == {"natrio.task.cli-r.default.r-1.cli-r": 1}
    result = invoke("dlq", "replay", str(seqs[0]), "--url", url)
    assert result.exit_code == 1
    assert "not in NATRIO_DLQ" in result.stderr

    for args in ([], [str(seqs[1]), "--all"], [str(seqs[1]), "--type", "cli-r"]):
        result = invoke("dlq", "replay", *args, "--url", url)
        assert result.exit_code == 2, (args, result.stderr)

    result = ok(invoke("dlq", "replay", "--all", "--type", "cli-r", "--url", url))
    assert result.stdout.split() == ["r-2", "cli-r", result.stdout.split()[2]]
    result = ok(invoke("dlq", "replay", "--all", "--type", "cli-s", "--url", url))
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["s-1", "s-2"]
    assert "replayed 2 of 2" in result.stderr
    assert set(task_subjects(url)) == {
        "natrio.task.cli-r.default.r-1.cli-r",
        "natrio.task.cli-r.default.r-2.cli-r",
        "natrio.task.cli-s.default.s-1.cli-s",
        "natrio.task.cli-s.default.s-2.cli-s",
    }
    left = json.loads(ok(invoke("dlq", "list", "--url", url, "--json")).stdout)
    assert [item["run_id"] for item in left] == ["t-1"]

    result = invoke("dlq", "purge", "--url", url)
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert len(json.loads(ok(invoke("dlq", "list", "--url", url, "--json")).stdout)) == 1
    result = ok(invoke("dlq", "purge", "--type", "cli-t", "--yes", "--url", url))
    assert result.stdout.strip() == "1"
    # The junk is a message of the stream too.
    result = ok(invoke("dlq", "purge", "--yes", "--url", url))
    assert result.stdout.strip() == "1"
    assert json.loads(ok(invoke("dlq", "list", "--url", url, "--json")).stdout) == []
    assert "no dead letters" in ok(invoke("dlq", "list", "--url", url)).stderr


HOSTILE_NAMES = ("[/x]", "[link=https://evil.example]click[/link]", "[bold]K", "K\x1b]8;;x\x07")


def test_dlq_show_prints_header_names_as_they_are(
    natrio_server: natrio.EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = natrio_server.url
    # From the stream, an entry with such names is none (DeadLetter.from_json)...
    [seq] = seed(url, [entry("cli-h", headers=dict.fromkeys(HOSTILE_NAMES, "v"))])
    result = invoke("dlq", "show", str(seq), "--url", url)
    assert result.exit_code == 1, result.exception
    assert "not a dead-letter entry" in result.stderr
    assert "skipped 1 message" in ok(invoke("dlq", "list", "--url", url)).stderr

    # ... and one that has them anyway is shown as text: no markup is read in it.
    hostile = entry("cli-h", headers={name: f"{name} value" for name in HOSTILE_NAMES})

    async def dead_letter(self: natrio.Client, seq: int) -> natrio.DeadLetter:
        return attrs.evolve(hostile, seq=seq)

    monkeypatch.setattr(natrio.Client, "dead_letter", dead_letter)
    text = ok(invoke("dlq", "show", str(seq), "--url", url)).stdout
    for name in HOSTILE_NAMES[:3]:
        assert f"header {name}" in text
        assert f"{name} value" in text
    assert "\x1b" not in text
    assert "header K\\x1b]8;;x\\x07" in text


def test_dlq_show_and_replay_all_get_past_a_damaged_stored_input(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    url = natrio_server.url
    damaged = entry("cli-d", "r-bad", data=b"", task_seq=77, input_ref="dlq-77")
    seqs = seed(url, [damaged, entry("cli-d", "r-good")])

    async def main() -> None:
        async with natrio.connect(url) as nc:
            await describe(JetStream(nc), "dlq-77", b"{not json")

    trio.run(main)
    text = ok(invoke("dlq", "show", str(seqs[0]), "--url", url)).stdout
    assert "unavailable (kept in the object store as dlq-77)" in text
    assert "damaged description" in text
    shown = json.loads(ok(invoke("dlq", "show", str(seqs[0]), "--url", url, "--json")).stdout)
    assert shown["input_base64"] is None
    assert "damaged description" in shown["input_error"]

    result = invoke("dlq", "replay", "--all", "--type", "cli-d", "--url", url)
    assert result.exit_code == 1, result.exception
    assert result.stdout.split()[:2] == ["r-good", "cli-d"]
    assert f"dead letter {seqs[0]} not replayed" in result.stderr
    assert "replayed 1 of 2" in result.stderr
    assert set(task_subjects(url)) == {"natrio.task.cli-d.default.r-good.cli-d"}
    left = json.loads(ok(invoke("dlq", "list", "--url", url, "--json")).stdout)
    assert [item["run_id"] for item in left] == ["r-bad"]
