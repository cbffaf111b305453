"""Leases of exclusive deliveries (pure logic: natrio._dispatch.lease), and that a healthy
worker never fences a long execution."""

from __future__ import annotations

import math

import pytest
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


def test_a_link_change_drops_unproven_keep_alives_and_stale_answers() -> None:
    prober = Prober()
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0)
    epoch = prober.epoch
    assert prober.due()
    prober.link_changed([lease])
    assert lease.renewals == []
    prober.answered(4.0, epoch, 4.1, [lease])
    assert (lease.ends, prober.answered_sent) == (10.0, -math.inf)
    assert prober.outstanding == 0  # the lost probe is no longer counted as out


def test_probes_out_are_bounded() -> None:
    prober = Prober()
    for _ in range(Prober.MAX_OUTSTANDING):
        assert prober.due()
    assert not prober.due()
    prober.settled(prober.epoch)
    assert prober.due()


@pytest.mark.parametrize("rtt_share", [0.01, 0.3, 0.9, 1.5, 1.9])
def test_a_healthy_link_never_fences_a_long_execution(rtt_share: float) -> None:
    # The dispatcher's order on every tick (ack_wait / 6): fence what is short, renew
    # every exclusive delivery, send a probe; answers come one round trip later. A
    # delivery may arrive at any moment between ticks, with probes still out. Healthy:
    # round trips under a third of the ack wait (two ticks).
    ack_wait = 6.0
    tick = ack_wait / 6
    rtt = rtt_share * tick
    for phase in [i / 20 for i in range(20)]:
        prober = Prober()
        prober.answered(-tick, prober.epoch, -tick + rtt, [])
        answers: list[tuple[float, float]] = []  # (answered at, sent at)
        lease = None
        for n in range(60):
            now = n * tick
            arrival = (phase + 3) * tick
            for at, sent in sorted(answers):
                if at <= now:
                    prober.answered(sent, prober.epoch, at, [lease] if lease else [])
            answers = [(at, sent) for at, sent in answers if at > now]
            if lease is None and now >= arrival:
                # Arrived between the previous tick and this one, answers so far in.
                lease = prober.lease(ack_wait)
            if lease is not None:
                assert not lease.fenced(now), (rtt_share, phase, n)
                lease.renewed(now)
            answers.append((now + rtt, now))


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
