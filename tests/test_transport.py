"""The transport's own rules: the nats-py versions it runs on, what it refuses to publish,
and subscriptions that end cleanly even when a drain is cancelled."""

from __future__ import annotations

import pytest
import trio

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
