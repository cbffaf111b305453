"""The transport's own rules: the nats-py versions it runs on, what it refuses to publish,
and subscriptions that end cleanly even when a drain is cancelled."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import natrio
from natrio._asyncio.nats_client import version_supported
from natrio._transport.protocol import MAX_SUBJECTS_LENGTH


@pytest.mark.parametrize(
    ("version", "supported"),
    [("2.16.0", True), ("2.16.3", True), ("2.15.0", False), ("2.17.0", False), ("x", False)],
)
def test_only_tested_nats_py_releases_are_accepted(version: str, supported: bool) -> None:
    assert version_supported(version) is supported


@pytest.mark.parametrize(
    ("subject", "reply"),
    [
        ("a" * (MAX_SUBJECTS_LENGTH + 1), ""),
        ("a", "b" * MAX_SUBJECTS_LENGTH),
        ("a b", ""),
        ("a..b", ""),
        ("ä", ""),
        ("a", "_INBOX.*"),
        ("a", "_INBOX.x y"),
    ],
)
async def test_publishes_that_could_close_the_connection_are_refused(
    subject: str, reply: str, natrio_connection: natrio.Connection
) -> None:
    with pytest.raises(ValueError, match=r"invalid|too long"):
        natrio_connection.publish_nowait(subject, b"", reply=reply)
    await natrio_connection.flush()
    assert not natrio_connection.closed


async def test_a_cancelled_drain_still_lets_unsubscribe_remove_the_subscription(
    natrio_connection: natrio.Connection,
) -> None:
    subs = natrio_connection._link._subs
    before = len(subs)
    sub = await natrio_connection.subscribe("drained")
    assert len(subs) == before + 1
    with trio.CancelScope() as scope:
        scope.cancel()
        await sub.drain()
    await sub.unsubscribe()
    assert len(subs) == before


async def test_a_connection_knows_its_own_inboxes(natrio_connection: natrio.Connection) -> None:
    # Replies a client expects may be answered; its requests' replies and its pull
    # inboxes are natrio's own, and no task may have a worker answer there.
    expected, _slot = natrio_connection.expect_reply()
    assert not natrio_connection.is_own_inbox(expected)
    assert natrio_connection.is_own_inbox(natrio_connection._mux_prefix + "r5")
    inbox = natrio_connection.new_inbox()
    sub = await natrio_connection.subscribe(inbox + ".*.*")
    assert natrio_connection.is_own_inbox(inbox + ".1.16")
    assert not natrio_connection.is_own_inbox(inbox + "x.1")
    await sub.unsubscribe()
    assert not natrio_connection.is_own_inbox(inbox + ".1.16")


async def test_a_wide_subscription_under_the_inbox_prefix_is_no_own_inbox(
    natrio_connection: natrio.Connection,
) -> None:
    sub = await natrio_connection.subscribe(f"{natrio_connection.inbox_prefix}.>")
    expected, _slot = natrio_connection.expect_reply()
    assert not natrio_connection.is_own_inbox(expected)
    assert not natrio_connection.is_own_inbox(f"{natrio_connection.inbox_prefix}.client.x")
    await sub.unsubscribe()


async def test_a_request_after_the_loop_was_busy_does_not_time_out_early(
    natrio_connection: natrio.Connection,
) -> None:
    import time

    nc = natrio_connection

    def echo(msg: natrio.Message) -> None:
        nc.publish_nowait(msg.reply, b"pong")

    await nc.subscribe("test.echo", on_message=echo)
    await nc.subscribe("test.silent")  # never answers: keeps the request sweeper awake
    await nc.flush()
    async with trio.open_nursery() as nursery:

        async def unanswered() -> None:
            await nc.request("test.silent", timeout=30)  # cancelled below

        nursery.start_soon(unanswered)
        await trio.testing.wait_all_tasks_blocked()
        # A handler computing without yielding, for longer than the timeout: the fault itself.
        time.sleep(0.6)  # noqa: ASYNC251
        reply = await nc.request("test.echo", timeout=0.5)
        assert reply.data == b"pong"
        nursery.cancel_scope.cancel()


async def test_a_subscription_drained_at_once_leaves_no_interest_on_the_server(
    natrio_connection: natrio.Connection,
) -> None:
    nc = natrio_connection
    for n in range(20):
        sub = await nc.subscribe(f"test.drained.{n}", queue="q")
        await sub.drain()
        await nc.flush()
        # Gone from the server: nobody answers, at once, rather than a request lost to an
        # interest the client has forgotten.
        with pytest.raises(natrio.NoResponders):
            await nc.request(f"test.drained.{n}", b"x", timeout=2)
