"""Routing in one process: partitions, singletons, targets and their configuration, on a real
server (several workers share one connection; processes and kills are in
tests/test_routing_processes.py)."""

from __future__ import annotations

import pytest
import trio

import natrio
from natrio._jetstream import JetStream
from natrio._routing.placement import assign, fnv1a_32, partition_of, worker_target
from natrio.testing import WorkerFactory

from .helpers import event_counts, eventually

# -- pure placement -------------------------------------------------------------------


def test_fnv1a_matches_known_values() -> None:
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


@pytest.mark.parametrize("members", [1, 2, 3, 5, 7, 256, 300])
@pytest.mark.parametrize("partitions", [1, 2, 8, 13, 256])
def test_assignment_is_complete_even_and_the_same_everywhere(partitions: int, members: int) -> None:
    ids = [f"w{i}" for i in range(members)]
    held = assign(partitions, ids)
    every = sorted(p for parts in held.values() for p in parts)
    assert every == list(range(partitions))
    sizes = {len(parts) for parts in held.values()}
    assert sizes <= {partitions // members, -(-partitions // members)}
    assert assign(partitions, reversed(ids)) == held


def test_partition_of_is_stable_and_in_range() -> None:
    assert partition_of("run-1", 8) == fnv1a_32(b"run-1") % 8
    assert all(0 <= partition_of(f"k{i}", 5) < 5 for i in range(100))


def test_worker_target() -> None:
    assert worker_target("primary") == "w-primary"
    odd = worker_target("resize+thumb/default")
    assert odd.startswith("w-")
    assert odd == worker_target("resize+thumb/default")
    with pytest.raises(natrio.ConfigurationError):
        worker_target("")


@pytest.mark.parametrize(
    "options",
    [
        {"partitions": 0},
        {"partitions": 257},
        {"partitions": True},
        {"singleton": True, "partitions": 4},
        {"singleton": True, "max_in_flight": 2},
        {"partitions": 4, "max_in_flight": 2},
        {"max_in_flight": 0},
        {"singleton": "yes"},
        {"rate_limit": 5},
    ],
)
async def test_invalid_routing_options(
    natrio_connection: natrio.Connection, options: dict[str, object]
) -> None:
    worker = natrio.Worker(natrio_connection)
    with pytest.raises(natrio.ConfigurationError):
        worker.handle("t", _noop, **options)  # type: ignore[call-overload]


async def test_invalid_worker_routing_options(natrio_connection: natrio.Connection) -> None:
    for options in ({"partitions": 0}, {"claims": "primary"}, {"claims": ["bad.claim"]}):
        with pytest.raises(natrio.ConfigurationError):
            natrio.Worker(natrio_connection, **options)


async def _noop(ctx: natrio.TaskContext) -> None:
    return None


# -- partitions -----------------------------------------------------------------------


async def test_partitioned_tasks_keep_per_key_order_across_workers(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    ledger: list[tuple[str, str, int]] = []
    running: dict[str, int] = {}
    overlaps = []
    workers = []
    for name in ("a", "b"):
        worker = natrio_worker_factory(name=name, concurrency=8)

        @worker.handle("ordered", partitions=4)
        async def ordered(ctx: natrio.TaskContext, name: str = name) -> bytes:
            key = ctx.task.headers["key"]
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlaps.append(key)
            ledger.append((key, name, int(ctx.input)))
            await trio.sleep(0.001)
            running[key] -= 1
            return b""

        workers.append(await natrio_worker_factory.start(worker))

    def balanced() -> bool:
        held = [w.statistics().partitions.get("ordered/default", ()) for w in workers]
        return sorted(p for parts in held for p in parts) == [0, 1, 2, 3] and all(
            len(parts) == 2 for parts in held
        )

    await eventually(balanced)
    handles = []
    for i in range(40):
        for key in ("k1", "k2", "k3"):
            handles.append(
                await natrio_client.submit(
                    "ordered", str(i).encode(), key=key, headers={"key": key}
                )
            )
    with trio.fail_after(20):
        for handle in handles:
            await handle.result()
    assert not overlaps
    for key in ("k1", "k2", "k3"):
        assert [n for k, _, n in ledger if k == key] == list(range(40))
    assert await natrio_client.partitions("ordered") == 4
    completed = await event_counts(natrio_client.nc, "completed")
    assert len(completed) == 120
    assert set(completed.values()) == {1}


async def test_conflicting_partition_counts_are_refused(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection
) -> None:
    await natrio.provision(natrio_connection, partitions={"p": 4})
    with pytest.raises(natrio.ConfigurationError, match="4 partitions"):
        await natrio.provision(natrio_connection, partitions={"p": 8})
    worker = natrio_worker_factory()
    worker.handle("p", _noop, partitions=8)
    with pytest.raises(natrio.ConfigurationError, match="4 partitions"):
        await natrio_worker_factory.start(worker)
    plain = natrio_worker_factory()
    plain.handle("p", _noop)
    with pytest.raises(natrio.ConfigurationError, match="partitions=4"):
        await natrio_worker_factory.start(plain)


async def test_a_key_for_an_unpartitioned_type_is_refused(natrio_client: natrio.Client) -> None:
    with pytest.raises(natrio.ConfigurationError, match="not partitioned"):
        await natrio_client.submit("plain", key="k")


# -- singletons and max_in_flight -----------------------------------------------------


async def test_singleton_runs_one_at_a_time_across_workers(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    running = 0
    most = 0
    served = set()
    for name in ("s1", "s2", "s3"):
        worker = natrio_worker_factory(name=name, concurrency=4)

        @worker.handle("solo", singleton=True)
        async def solo(ctx: natrio.TaskContext, name: str = name) -> bytes:
            nonlocal running, most
            running += 1
            most = max(most, running)
            served.add(name)
            await trio.sleep(0.01)
            running -= 1
            return b""

        await natrio_worker_factory.start(worker)
    handles = [await natrio_client.submit("solo") for _ in range(30)]
    with trio.fail_after(20):
        for handle in handles:
            await handle.result()
    assert most == 1
    completed = await event_counts(natrio_client.nc, "completed")
    assert len(completed) == 30
    assert set(completed.values()) == {1}
    info = await JetStream(natrio_client.nc).consumer_info("NATRIO_TASKS", "solo~default")
    assert info["config"]["max_ack_pending"] == 1


async def test_max_in_flight_bounds_the_deployment(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    running = 0
    most = 0
    for _ in range(2):
        worker = natrio_worker_factory(concurrency=8)

        @worker.handle("capped", max_in_flight=3)
        async def capped(ctx: natrio.TaskContext) -> bytes:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await trio.sleep(0.02)
            running -= 1
            return b""

        await natrio_worker_factory.start(worker)
    handles = [await natrio_client.submit("capped") for _ in range(40)]
    with trio.fail_after(20):
        for handle in handles:
            await handle.result()
    assert most == 3


async def test_a_worker_with_another_bound_is_refused(
    natrio_worker_factory: WorkerFactory,
) -> None:
    first = natrio_worker_factory()
    first.handle("bounded", _noop, singleton=True)
    await natrio_worker_factory.start(first)
    second = natrio_worker_factory()
    second.handle("bounded", _noop)
    with pytest.raises(natrio.ConfigurationError, match="max_in_flight=1"):
        await natrio_worker_factory.start(second)


# -- targets --------------------------------------------------------------------------


async def test_targets_run_only_on_a_holder_and_wait_for_one(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    ran_on: list[str] = []
    plain = natrio_worker_factory(name="plain")

    @plain.handle("job")
    async def job_plain(ctx: natrio.TaskContext) -> bytes:
        ran_on.append("plain")
        return b"plain"

    await natrio_worker_factory.start(plain)
    handle = await natrio_client.submit("job", target="primary")
    await eventually(lambda: plain.statistics().waiting_for_claims.get("job~default~tprimary"))
    assert ran_on == []
    primary = natrio_worker_factory(name="prim", claims=["primary"])

    @primary.handle("job")
    async def job_primary(ctx: natrio.TaskContext) -> bytes:
        ran_on.append("primary")
        return b"primary"

    await natrio_worker_factory.start(primary)
    with trio.fail_after(10):
        assert await handle.result() == b"primary"
    assert "primary" in primary.claims
    assert worker_target("prim") in primary.claims
    # Colocated: the step goes to the worker that ran the first.
    second = await natrio_client.submit("job", colocate_with=handle)
    with trio.fail_after(10):
        assert await second.result() == b"primary"
    assert ran_on == ["primary", "primary"]


async def test_a_soft_target_runs_elsewhere_while_nobody_holds_its_claim(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(name="anyone")

    @worker.handle("soft")
    async def soft(ctx: natrio.TaskContext) -> bytes:
        return ctx.task.target.encode() if ctx.task.target else b""

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("soft", target="gone", soft=True)
    with trio.fail_after(10):
        assert await handle.result() == b"gone"


async def test_claims_from_a_function_move_between_workers(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    owner = {"value": "one"}
    workers = {}
    for name in ("one", "two"):

        async def claims(name: str = name) -> list[str]:
            return ["leader"] if owner["value"] == name else []

        worker = natrio_worker_factory(name=name, claims=claims)

        @worker.handle("lead")
        async def lead(ctx: natrio.TaskContext, name: str = name) -> bytes:
            return name.encode()

        workers[name] = await natrio_worker_factory.start(worker)
    with trio.fail_after(10):
        assert await (await natrio_client.submit("lead", target="leader")).result() == b"one"
    owner["value"] = "two"
    await eventually(
        lambda: "leader" not in workers["one"].claims and "leader" in workers["two"].claims
    )
    with trio.fail_after(10):
        assert await (await natrio_client.submit("lead", target="leader")).result() == b"two"


# -- rate limits ----------------------------------------------------------------------


# Slack for the time between a start's admission and the handler reading the clock.
JITTER = 0.02


def _most_in_any_window(times: list[float], per: float) -> int:
    """The most start times within any half-open window of ``per`` seconds."""
    times = sorted(times)
    most = 0
    first = 0
    for last, at in enumerate(times):
        while at - times[first] >= per:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_worker_rate_limit_holds_over_sliding_windows_without_using_attempts(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    starts: list[float] = []
    attempts: list[int] = []
    worker = natrio_worker_factory(concurrency=16)

    @worker.handle("limited", rate_limit=natrio.RateLimit(5, 0.5))
    async def limited(ctx: natrio.TaskContext) -> bytes:
        starts.append(trio.current_time())
        attempts.append(ctx.attempt)
        return b""

    await natrio_worker_factory.start(worker)
    handles = [await natrio_client.submit("limited") for _ in range(20)]
    with trio.fail_after(20):
        for handle in handles:
            await handle.result()
    assert len(starts) == 20
    # Starts are admitted exactly; each handler begins a scheduling latency after its
    # admission, so the times taken inside handlers get 20 ms of slack.
    assert _most_in_any_window(starts, 0.5 - JITTER) <= 5
    # 20 starts at 5 per 0.5 s take at least 1.5 s.
    assert max(starts) - min(starts) >= 1.5
    assert set(attempts) == {1}
    stats = worker.statistics().dispatcher
    assert stats.deferred > 0
    assert stats.waiting_for_rate == 0


async def test_rate_limit_per_key(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    starts: dict[str, list[float]] = {"a": [], "b": []}
    worker = natrio_worker_factory(concurrency=16)

    @worker.handle(
        "keyed", rate_limit=natrio.RateLimit(2, 0.5, key=lambda task: task.headers["tenant"])
    )
    async def keyed(ctx: natrio.TaskContext) -> bytes:
        starts[ctx.task.headers["tenant"]].append(trio.current_time())
        return b""

    await natrio_worker_factory.start(worker)
    handles = [
        await natrio_client.submit("keyed", headers={"tenant": tenant})
        for _ in range(6)
        for tenant in ("a", "b")
    ]
    with trio.fail_after(20):
        for handle in handles:
            await handle.result()
    for tenant in ("a", "b"):
        assert len(starts[tenant]) == 6
        assert _most_in_any_window(starts[tenant], 0.5 - JITTER) <= 2


async def test_cluster_rate_limit_holds_across_workers(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    import time

    starts: list[float] = []
    for _ in range(3):
        worker = natrio_worker_factory(concurrency=8)

        @worker.handle("shared", rate_limit=natrio.RateLimit(4, 0.5, scope="cluster"))
        async def shared(ctx: natrio.TaskContext) -> bytes:
            starts.append(time.time())
            return b""

        await natrio_worker_factory.start(worker)
    handles = [await natrio_client.submit("shared") for _ in range(24)]
    with trio.fail_after(30):
        for handle in handles:
            await handle.result()
    assert len(starts) == 24
    # Windows of 0.5 s aligned to the Unix epoch: at most 4 starts in each. A handler
    # reads the clock a scheduling latency after its admission, so a start read within
    # JITTER after a boundary may have been admitted in the window before: the count is
    # of the starts clearly inside a window.
    inside: dict[int, int] = {}
    for at in starts:
        window = int(at // 0.5)
        if at - window * 0.5 >= JITTER:
            inside[window] = inside.get(window, 0) + 1
    assert max(inside.values()) <= 4
    assert len({int(at // 0.5) for at in starts}) >= 6


async def test_a_failing_key_function_fails_the_task(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    def broken(task: natrio.Task) -> str:
        raise KeyError("tenant")

    @worker.handle(
        "badkey",
        rate_limit=natrio.RateLimit(1, 1.0, key=broken),
        retry=natrio.RetryPolicy(maximum_attempts=1),
    )
    async def badkey(ctx: natrio.TaskContext) -> bytes:
        return b"ran"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("badkey")
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed, match="KeyError"):
        await handle.result()


async def test_tasks_held_by_a_rate_limit_go_back_at_shutdown(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("slowrate", rate_limit=natrio.RateLimit(1, 60.0))
    async def slowrate(ctx: natrio.TaskContext) -> bytes:
        return b""

    await natrio_worker_factory.start(worker)
    handles = [await natrio_client.submit("slowrate") for _ in range(3)]
    await handles[0].result()
    await eventually(lambda: worker.statistics().dispatcher.waiting_for_rate == 2)
    worker.stop(0.0)
    second = natrio_worker_factory()
    seen = []

    @second.handle("slowrate")
    async def unlimited(ctx: natrio.TaskContext) -> bytes:
        seen.append(ctx.attempt)
        return b""

    await natrio_worker_factory.start(second)
    with trio.fail_after(10):
        for handle in handles[1:]:
            await handle.result()
    assert seen == [1, 1]


async def test_a_task_published_without_its_partition_is_moved_into_it(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    ran: list[tuple[int | None, str]] = []
    worker = natrio_worker_factory()

    @worker.handle("moved", partitions=4)
    async def moved(ctx: natrio.TaskContext) -> bytes:
        assert ctx.task.partition is not None
        ran.append((ctx.task.partition, ctx.input.decode()))
        return ctx.input

    await natrio_worker_factory.start(worker)
    js = JetStream(natrio_client.nc)
    # As a client in another language would: the plain subject, a Natrio-Key header.
    for i in range(10):
        await js.publish(
            f"natrio.task.moved.default.raw-{i}.step", str(i).encode(), headers={"Natrio-Key": "k"}
        )
    await js.publish("natrio.task.moved.default.raw-x.step", b"x")
    handles = [natrio_client.handle("moved", f"raw-{i}", "step") for i in range(10)]
    with trio.fail_after(10):
        for i, handle in enumerate(handles):
            assert await handle.result() == str(i).encode()
        assert await natrio_client.handle("moved", "raw-x", "step").result() == b"x"
    assert [text for p, text in ran if text != "x"] == [str(i) for i in range(10)]
    assert {p for p, text in ran if text != "x"} == {partition_of("k", 4)}
    assert (partition_of("raw-x", 4), "x") in ran
    assert worker.statistics().dispatcher.forwarded == 11


async def test_consumers_of_claims_unheld_and_unused_are_deleted(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    holder = natrio_worker_factory(name="holder", claims=["old"])
    holder.handle("c", _noop)
    await natrio_worker_factory.start(holder)
    with trio.fail_after(10):
        await (await natrio_client.submit("c", target="old")).result()
    holder.stop(0.0)
    waiting = await natrio_client.submit("c", target="kept")
    other = natrio_worker_factory(name="other")
    other.handle("c", _noop)
    await natrio_worker_factory.start(other)
    assert other._claims is not None
    other._claims.cleanup_after = 0.0  # "for a while" is 10 minutes otherwise
    js = JetStream(natrio_client.nc)

    async def names() -> set[str]:
        return {info["name"] for info in await js.consumers("NATRIO_TASKS")}

    with trio.fail_after(10):
        while "c~default~told" in await names():  # noqa: ASYNC110 - the server's state
            await trio.sleep(0.1)
    # Unheld but with a task waiting: kept, and the task is still there.
    assert "c~default~tkept" in await names()
    info = await js.consumer_info("NATRIO_TASKS", "c~default~tkept")
    assert info["num_pending"] == 1
    assert waiting.seq is not None


async def test_a_target_for_a_singleton_waits_and_is_shown(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(name="solo-holder", claims=["c"])
    worker.handle("bounded-target", _noop, singleton=True)
    await natrio_worker_factory.start(worker)
    await natrio_client.submit("bounded-target", target="c")
    await eventually(
        lambda: worker.statistics().waiting_for_claims.get("bounded-target~default~tc") == 1
    )


# -- review regressions ----------------------------------------------------------------


async def test_an_odd_directory_entry_is_ignored_not_fatal(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    js = JetStream(natrio_client.nc)
    for key, raw in (("odd1", b"[]"), ("odd2", b'{"routing": {"t": 5}}'), ("odd3", b"\xff")):
        await js.publish(f"$KV.natrio_workers.{key}", raw)
    worker = natrio_worker_factory()
    worker.handle("alive", _noop, partitions=2)
    await natrio_worker_factory.start(worker)
    with trio.fail_after(10):
        await (await natrio_client.submit("alive")).result()
    assert [w.worker_id for w in await natrio.list_workers(natrio_client.nc)] == [worker.worker_id]


async def test_a_task_that_cannot_be_forwarded_is_dead_lettered_not_blocking(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    worker.handle("fwd", _noop, partitions=2)
    await natrio_worker_factory.start(worker)
    js = JetStream(natrio_client.nc)
    # Stored with an expectation that held for the original and would not for a copy
    # (JetStream's own headers are not copied), then a plain one behind it.
    await js.publish(
        "natrio.task.fwd.default.r1.s", b"", headers={"Nats-Expected-Last-Sequence": "0"}
    )
    await js.publish("natrio.task.fwd.default.r3.s", b"fine")
    with trio.fail_after(15):
        assert await natrio_client.handle("fwd", "r1", "s").result() == b""
        await natrio_client.handle("fwd", "r3", "s").result()


async def test_a_deleted_partition_count_can_be_stored_again(
    natrio_connection: natrio.Connection,
) -> None:
    from natrio._jetstream import KeyValue

    await natrio.provision(natrio_connection, partitions={"again": 4})
    await KeyValue(JetStream(natrio_connection), "natrio_routing").delete("partitions.again")
    await natrio.provision(natrio_connection, partitions={"again": 8})
    assert await natrio.Client(natrio_connection).partitions("again") == 8


async def test_workers_with_another_ack_wait_are_refused_for_a_singleton(
    natrio_worker_factory: WorkerFactory,
) -> None:
    first = natrio_worker_factory()
    first.handle("acked", _noop, singleton=True, ack_wait=5.0)
    await natrio_worker_factory.start(first)
    second = natrio_worker_factory()
    second.handle("acked", _noop, singleton=True, ack_wait=9.0)
    with pytest.raises(natrio.ConfigurationError, match="ack_wait"):
        await natrio_worker_factory.start(second)


async def test_a_failing_claims_function_keeps_the_own_name_claim(
    natrio_worker_factory: WorkerFactory,
) -> None:
    def broken() -> list[str]:
        raise RuntimeError("no claims today")

    worker = natrio_worker_factory(name="steady", claims=broken)
    worker.handle("j", _noop)
    await natrio_worker_factory.start(worker)
    assert worker.claims == (worker_target("steady"),)


async def test_an_empty_key_and_a_soft_task_without_target_are_refused(
    natrio_client: natrio.Client,
) -> None:
    await natrio.provision(natrio_client.nc, partitions={"keyed-refusals": 2})
    with pytest.raises(natrio.ConfigurationError, match="non-empty"):
        await natrio_client.submit("keyed-refusals", key="")
    with pytest.raises(natrio.ConfigurationError, match="soft applies to a target"):
        await natrio_client.submit("keyed-refusals", key="k", soft=True)


async def test_a_task_stored_while_its_claim_consumer_was_deleted_gets_it_back(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    # The clean-up's race: the sweep found the consumer unused, a client stored a task
    # for the claim (its look for the consumer came first), the sweep deleted it.
    worker = natrio_worker_factory(name="sweeper")
    worker.handle("c", _noop)
    await natrio_worker_factory.start(worker)
    assert worker._claims is not None
    js = JetStream(natrio_client.nc)
    await js.publish("natrio.task.c.default~tgone.r.c", b"", headers={"Nats-Msg-Id": "raced"})
    (route, group) = worker._claims.routes[0]
    await worker._claims._restore_if_stored(route, group, "c~default~tgone")
    info = await js.consumer_info("NATRIO_TASKS", "c~default~tgone")
    assert info["num_pending"] == 1
    # Nothing stored: nothing made.
    await worker._claims._restore_if_stored(route, group, "c~default~tnothing")
    assert "c~default~tnothing" not in await js.consumer_names("NATRIO_TASKS")


async def test_guests_do_not_make_a_deleted_soft_consumer_again(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    guests = [natrio_worker_factory(name=f"guest-{i}") for i in range(2)]
    for guest in guests:
        guest.handle("g", _noop)
        await natrio_worker_factory.start(guest)
    handle = await natrio_client.submit("g", target="away", soft=True)
    with trio.fail_after(10):
        await handle.result()
    name = "g~default~saway"
    for guest in guests:
        assert guest._consumer_set is not None
        await eventually(lambda guest=guest: name in guest._consumer_set)  # type: ignore[misc]
    # Another worker's clean-up deletes it.
    js = JetStream(natrio_client.nc)
    await js.delete_consumer("NATRIO_TASKS", name)
    for guest in guests:
        await eventually(lambda guest=guest: name not in guest._consumer_set)  # type: ignore[misc]
    assert name not in await js.consumer_names("NATRIO_TASKS")
