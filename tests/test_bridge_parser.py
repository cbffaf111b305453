"""The bridge's fast message parser reads what nats-py's parser reads, however reads cut it."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from natrio._asyncio import nats_client

Received = tuple[int, bytes, bytes, bytes, bytes | None]

_tokens = st.text("abcXYZ019_-$~", min_size=1, max_size=12).map(str.encode)
_subjects = st.lists(_tokens, min_size=1, max_size=6).map(b".".join)
_payloads = st.binary(max_size=300) | st.sampled_from([b"", b"\r\n", b"MSG x 1 2\r\n", b"PING\r\n"])


@st.composite
def _messages(draw: Any) -> tuple[bytes, Received | None]:
    """One protocol line as nats-server writes it, and what a subscriber should receive."""
    kind = draw(st.sampled_from(["MSG", "HMSG", "PING", "PONG", "+OK"]))
    if kind in ("PING", "PONG", "+OK"):
        return kind.encode() + b"\r\n", None
    subject, sid = draw(_subjects), draw(st.integers(1, 10**6))
    reply = draw(st.none() | _subjects)
    payload = draw(_payloads)
    head = [kind.encode(), subject, str(sid).encode()] + ([reply] if reply else [])
    if kind == "MSG":
        line = b" ".join([*head, str(len(payload)).encode()])
        return line + b"\r\n" + payload + b"\r\n", (sid, subject, reply or b"", payload, None)
    block = b"NATS/1.0\r\n" + draw(st.binary(max_size=40).map(bytes.hex).map(str.encode))
    block += b"\r\n\r\n"
    sizes = [str(len(block)).encode(), str(len(block) + len(payload)).encode()]
    line = b" ".join([*head, *sizes])
    return line + b"\r\n" + block + payload + b"\r\n", (sid, subject, reply or b"", payload, block)


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    # The parser only awaits the recorder's coroutines, which never suspend: no event
    # loop is needed to drive it.
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the parser suspended")


class _Recorder:
    """Stands in for the client the parser hands messages and control lines to."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.pings = 0

    def deliver(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        if sid % 2:
            return False  # odd ids go the slow way, like a subscription without a lane
        self.received.append((sid, bytes(subject), bytes(reply), data, headers))
        return True

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.received.append((sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self) -> None:
        self.pings += 1

    async def _process_pong(self) -> None:
        pass


@given(
    st.lists(_messages(), min_size=1, max_size=30),
    st.lists(st.integers(0, 10_000), max_size=25),
)
@settings(max_examples=300, deadline=None)
def test_any_cut_of_the_stream_delivers_every_message_intact(
    messages: list[tuple[bytes, Received | None]], cuts: list[int]
) -> None:
    stream = b"".join(raw for raw, _ in messages)
    expected = [message for _, message in messages if message is not None]
    pings = sum(raw == b"PING\r\n" for raw, _ in messages)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {len(stream)})

    async def feed() -> _Recorder:
        recorder = _Recorder()
        parser = nats_client._Parser(recorder)
        previous = 0
        for point in points:
            await parser.parse(stream[previous:point])
            previous = point
        return recorder

    recorder = _run(feed())
    assert recorder.received == expected
    assert recorder.pings == pings
