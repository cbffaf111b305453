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
    prober.answered(5.0, prober.epoch)
    lease = prober.lease(10.0)
    assert lease.ends == 15.0
    assert not lease.fenced(15.0 - 10.0 * FENCE_SHARE - 0.01)
    assert lease.fenced(15.0 - 10.0 * FENCE_SHARE)


def test_an_answered_keep_alive_renews_the_lease_from_when_it_was_sent() -> None:
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0, 3.1)
    assert lease.ends == 13.0
    lease.renewed(2.0, 3.5)  # an older one answered late moves nothing back
    assert lease.ends == 13.0


def test_an_answer_after_the_lease_ended_proves_nothing() -> None:
    # The server may have handed the task on before the keep-alive was processed.
    lease = Lease(0.0, 10.0)
    lease.renewed(3.0, 10.5)
    assert lease.ends == 10.0


def test_a_link_change_voids_what_was_sent_before() -> None:
    prober = Prober()
    epoch = prober.epoch
    assert prober.due()
    prober.link_changed()
    prober.answered(4.0, epoch)
    assert prober.answered_sent == -math.inf
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
    # every exclusive delivery (answered a round trip later), send a probe. A delivery
    # may arrive at any moment between ticks, with probes still out. Healthy: round
    # trips under a third of the ack wait (two ticks).
    ack_wait = 6.0
    tick = ack_wait / 6
    rtt = rtt_share * tick
    for phase in [i / 20 for i in range(20)]:
        prober = Prober()
        prober.answered(-tick, prober.epoch)
        probes: list[tuple[float, float]] = []  # (answered at, sent at)
        renewals: list[tuple[float, float]] = []
        lease = None
        arrival = (phase + 3) * tick
        for n in range(60):
            now = n * tick
            for at, sent in probes:
                if at <= now:
                    prober.answered(sent, prober.epoch)
            probes = [(at, sent) for at, sent in probes if at > now]
            if lease is not None:
                for at, sent in renewals:
                    if at <= now:
                        lease.renewed(sent, at)
                renewals = [(at, sent) for at, sent in renewals if at > now]
            if lease is None and now >= arrival:
                # Arrived between the previous tick and this one, answers so far in.
                lease = prober.lease(ack_wait)
            if lease is not None:
                assert not lease.fenced(now), (rtt_share, phase, n)
                renewals.append((now + rtt, now))
            probes.append((now + rtt, now))


@given(
    st.lists(
        st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 2.0), st.floats(0.0, 2.0)),
        max_size=40,
    )
)
def test_the_proven_end_never_passes_what_the_server_could_have(
    steps: list[tuple[float, float, float]],
) -> None:
    # A model of the server: its timer restarts when it processes a keep-alive before
    # the timer ran out, and it answers after processing.
    ack_wait = 3.0
    lease = Lease(0.0, ack_wait)
    now = 0.0
    server_ends = ack_wait
    for gap, to_server, back in steps:
        now += gap
        processed = now + to_server
        if processed < server_ends:
            server_ends = processed + ack_wait
        lease.renewed(now, processed + back)
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
