"""Leases of exclusive deliveries (pure logic: natrio._dispatch.lease), and that a healthy
worker never fences a long execution."""

from __future__ import annotations

import math

import trio
from hypothesis import given
from hypothesis import strategies as st

import natrio
from natrio._dispatch.lease import FENCE_SHARE, Lease, Prober
from natrio.testing import WorkerFactory


def test_a_delivery_before_any_answered_probe_is_fenced_at_once() -> None:
    assert Prober().lease(10.0).fenced(0.0)


def test_a_lease_starts_at_the_last_answered_probe() -> None:
    prober = Prober()
    prober.answered(5.0, prober.epoch, 5.1, [])
    lease = prober.lease(10.0)
    assert lease.ends == 15.0
    assert not lease.fenced(15.0 - 10.0 * FENCE_SHARE - 0.01)
    assert lease.fenced(15.0 - 10.0 * FENCE_SHARE)


def test_a_keep_alive_counts_once_a_later_probe_is_answered_in_time() -> None:
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0)
    lease.proven(2.0, 2.1)  # a probe sent before the keep-alive proves nothing of it
    assert (lease.ends, lease.renewals) == (10.0, [3.0])
    lease.proven(4.0, 4.1)
    assert (lease.ends, lease.renewals) == (13.0, [])


def test_an_answer_after_the_lease_ended_proves_nothing() -> None:
    # The server may have handed the task on before the keep-alive arrived.
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0)
    lease.proven(4.0, 10.5)
    assert lease.ends == 10.0


def test_a_reconnect_drops_unproven_keep_alives_and_stale_answers() -> None:
    prober = Prober()
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0)
    epoch = prober.epoch
    assert prober.due()
    prober.reconnected([lease])
    assert lease.renewals == []
    prober.answered(4.0, epoch, 4.1, [lease])
    assert (lease.ends, prober.answered_sent) == (10.0, -math.inf)
    assert prober.due()  # the lost probe is no longer out


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["renew", "probe"]),
            st.floats(0.0, 5.0),
            st.floats(0.0, 2.0),
        ),
        max_size=40,
    )
)
def test_the_proven_end_never_passes_what_the_server_could_have(
    steps: list[tuple[str, float, float]],
) -> None:
    # A model of the server: its timer restarts when a keep-alive arrives before it ran
    # out. Keep-alives and probes share one ordered link with a varying delay.
    ack_wait = 3.0
    lease = Lease(0.0, ack_wait)
    now = 0.0
    arrived = 0.0  # the link is in order: nothing arrives before what was sent earlier
    server_ends = ack_wait
    for kind, gap, delay in steps:
        now += gap
        arrived = max(arrived, now + delay)
        if kind == "renew":
            lease.renewed(now)
            if arrived < server_ends:
                server_ends = arrived + ack_wait
        else:
            answered = arrived + delay
            lease.proven(now, answered)
            now = max(now, answered)
        assert lease.ends <= server_ends


async def test_a_healthy_worker_keeps_an_exclusive_task_past_its_ack_wait(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    # The partition's ack wait is capped at the directory TTL (2 s here): the task runs
    # for three of them on leases the probes keep proving.
    worker = natrio_worker_factory()
    runs: list[int] = []

    @worker.handle("long", partitions=2)
    async def long(ctx: natrio.TaskContext) -> bytes:
        runs.append(ctx.attempt)
        await trio.sleep(6.0)
        return b"done"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("long", b"", key="k")
    with trio.fail_after(20):
        assert await handle.result() == b"done"
    assert runs == [1]
    assert worker.statistics().dispatcher.fenced == 0
