"""Scenario 8, protocol fuzz: hostile raw NATS frames on the task subjects.

Hypothesis draws batches of task messages. Each one is written as a raw ``HPUB`` (or
``PUB``) frame on a plain TCP socket, the way a hostile client in any language could
write it, bypassing nats-py and natrio's client. The subject is ``natrio.task.fuzz.default.``
followed by arbitrary tokens (any bytes, invalid UTF-8, wildcards, unicode, tokens
close to the control-line limit, too few or too many tokens). The header block can be
any shape (natrio's own headers with hostile values, other-case names, duplicates,
lines without a colon, faked status lines, invalid UTF-8, blocks close to JetStream's
64 KiB limit), and bodies run up to max_payload.

The generator stays inside what nats-server 2.15 accepts and JetStream stores, so
every frame reaches the stream (each batch is checked against the stream's last
sequence). Probing the server gave these limits:

- the control line (``HPUB`` up to its CRLF) is at most 4096 bytes, else
  ``-ERR 'maximum control line exceeded'`` and the server closes the connection;
- a subject may hold any byte except LF; space and tab split the arguments and CR
  ends the line, so those are left out too. JetStream stores subjects with ``*``,
  ``>``, NUL, control bytes and invalid UTF-8. A subject with an empty token (``a..b``
  or a trailing ``.``) gets a PONG but is silently dropped by JetStream (no PubAck,
  not stored), so tokens are never empty. A subject holding DEL (0x7f) is stored but
  matched by no wildcard filter, so no consumer could ever deliver it: DEL is left
  out as well (and a batch that leaves messages no filter sees fails as a test bug);
- JetStream refuses a header block of 65536 bytes or more (err 10097); headers and
  body together are at most max_payload (read from the INFO line);
- JetStream finds ``Nats-Msg-Id`` anywhere in a block of any shape, matching case
  exactly. Each frame with headers gets a unique one (frames without headers are never
  deduplicated). Generated header names never start with ``Nats-``, so JetStream's
  own headers (expected sequence, TTL, rollup) cannot make it refuse a message.

Header blocks come in two kinds: hostile ones, and ones a valid task could carry
(natrio's headers, each once, with values a client could send, beside arbitrary other
headers), so that valid tasks with hostile surroundings reach the handler too.

One worker (concurrency 8, ack_wait 2 s, 2 attempts 0.05-0.1 s apart) serves task type
``fuzz`` and a typed ``canary`` type across the examples. The ``fuzz`` handler reads
the first byte of the input (mod 4): 0 (or no input) completes, 1 raises Fatal, 2 fails
the first attempt, 3 fails the first two (dead after 2 attempts under the worker's
policy, completed on the third under a task policy that allows more). A task's own
``Natrio-Retry`` is free to be hostile, but when it parses as a valid policy
(``RetryPolicy.from_json``) its first two retry delays are at most 0.5 s: a task that
asks to be retried an hour later does not settle in seconds, and that would be no
fault of the worker. After every batch, all measured from the server's PONG:

1. a canary submitted with ``natrio.Client`` completes within ``CANARY_BOUND`` (5 s);
2. every message of the batch settles within ``SETTLE_BOUND`` (5 s): the
   ``fuzz~default`` consumer has nothing pending or unacknowledged and the stream holds
   no ``natrio.task.fuzz.>`` message (a work queue removes acked and terminated
   messages; checked for ``+TERM`` on nats-server 2.15.1). A healthy worker takes about
   0.1 s, 1 s with the retries a task may ask for, 2 s if an ack is lost. The slowest
   batch is reported as the time to recover;
3. the worker's ``statistics().dispatcher.in_flight`` is back to 0 (same bound);
4. every dead-letter entry the batch produced is at most max_payload, reads as a
   ``natrio.DeadLetter``, and has a non-empty ``error.message`` and a known
   ``error.kind``;
5. each message has exactly one outcome, one completion event or one dead-letter
   entry, matched by task sequence (the ``lost`` and ``duplicate`` columns);
6. natrio's state survives hostile ``Natrio-Reply`` values: its streams still exist
   and ``$KV.natrio_checkpoints.x`` was never written;

and throughout, the worker's ``run()`` keeps running and its connection stays up:
``closed`` is False, the server never dropped it (no reconnect) and a round trip on
it (``flush``) completes within 2 s. At the end ``worker.stop()`` makes ``run()``
return within grace + 1 s.

A failing example leaves its rig behind: the next example gets a fresh server,
connections and worker, so that Hypothesis can shrink each failure on its own. Each
kind of violation is its own exception type raised from its own line, as Hypothesis
tells failures apart by where they are raised; the symptoms of a lost connection
(closed, dropped, stuck), which depend on timing, share one line. A failure message
names the messages without an outcome and adds what nats-server and natrio logged as
errors. Hypothesis stops looking for more bugs 10 s after the first, so a run mostly
shows one kind: fix it and run again.

``NATRIO_CHAOS_SCALE=full`` sends about 10,000 messages; the short run about 250.
``NATRIO_FUZZ_SEED=<int>`` fixes Hypothesis's seed.
"""

from __future__ import annotations

import base64
import collections
import functools
import itertools
import json
import logging
import math
import os
import string
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import natrio
from natrio._jetstream import JetStream

from . import harness

T = TypeVar("T")

TASK_TYPE = "fuzz"
CONSUMER = f"{TASK_TYPE}~default"
PREFIX = b"natrio.task.fuzz.default."
KNOWN_KINDS = frozenset(
    {"error", "fatal", "exhausted", "decode", "malformed", "timeout", "deadline", "iterations"}
)
NATRIO_STREAMS = ("NATRIO_TASKS", "NATRIO_EVENTS", "NATRIO_DLQ")
# A Natrio-Reply target the generator uses, and what writing to it would leave behind.
KV_REPLY_TARGET = "$KV.natrio_checkpoints.x"

# What nats-server 2.15 accepts (see the module docstring).
MAX_CONTROL_LINE = 4096
MAX_HEADER_BLOCK = 65535
# Room on the control line for the verb, reply subject and sizes.
MAX_SUBJECT = MAX_CONTROL_LINE - 64

ACK_WAIT = 2.0
GRACE = 2.0
RETRY = natrio.RetryPolicy(maximum_attempts=2, initial_interval=0.05, maximum_interval=0.1)
# Longest retry delay a valid task policy may ask for (see the module docstring).
MAX_RETRY_DELAY = 0.5

# A healthy worker settles a batch in about 0.1 s, 1 s with the retries a task may ask
# for, 2 s if an ack is lost (ack_wait); short bounds keep shrinking a failure quick
# (Hypothesis gives up shrinking after five minutes).
CANARY_BOUND = 5.0
SETTLE_BOUND = 5.0
STORE_BOUND = 5.0
# A PING/PONG on the worker's connection (its flush) takes longer: the connection is stuck.
ROUND_TRIP_BOUND = 2.0
POLL = 0.05

MESSAGES = harness.pick(250, 10_000)
MAX_BATCH = harness.pick(8, 32)


# -- what a message is ------------------------------------------------------------------


def short(data: bytes, limit: int = 60) -> str:
    """``data`` as a repr, cut after ``limit`` bytes with its length."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}...({len(data)} bytes)"


@attrs.frozen
class FromNow:
    """A Natrio-Deadline this many seconds from the moment the frame is written."""

    seconds: float

    def encode(self) -> bytes:
        return repr(time.time() + self.seconds).encode()


@attrs.frozen
class Line:
    """One header line: name, separator (empty for a line without a colon), value."""

    name: bytes
    sep: bytes
    value: bytes | FromNow

    def encode(self) -> bytes:
        value = self.value.encode() if isinstance(self.value, FromNow) else self.value
        return self.name + self.sep + value

    def describe(self) -> str:
        if isinstance(self.value, FromNow):
            return f"{short(self.name + self.sep)} <now{self.value.seconds:+}s>"
        return short(self.encode(), 100)


@attrs.frozen
class HeaderBlock:
    """``NATS/1.0<status>`` then the lines, each ending in CRLF, then (usually) a blank line.

    The frame's unique ``Nats-Msg-Id`` line goes in at position ``msg_id_at``.
    """

    status: bytes
    lines: tuple[Line, ...]
    msg_id_at: int
    terminated: bool

    def encode(self, msg_id: bytes) -> bytes:
        lines = [line.encode() for line in self.lines]
        lines.insert(min(self.msg_id_at, len(lines)), b"Nats-Msg-Id: " + msg_id)
        block = b"NATS/1.0" + self.status + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
        return block + b"\r\n" if self.terminated else block


@attrs.frozen
class Body:
    """``pattern``, or the pattern repeated to ``length`` bytes, or to ``slack`` bytes short
    of what max_payload leaves after the headers."""

    pattern: bytes
    length: int | None = None
    slack: int | None = None

    def encode(self, room: int) -> bytes:
        if self.slack is not None:
            size = room - self.slack
        elif self.length is not None:
            size = min(self.length, room)
        else:
            return self.pattern[:room]
        return repeat(self.pattern or b"\0", size)

    def describe(self) -> str:
        if self.slack is not None:
            return f"{short(self.pattern)} up to max_payload-{self.slack}"
        if self.length is not None:
            return f"{short(self.pattern)} repeated to {self.length} bytes"
        return short(self.pattern)


@attrs.frozen
class Fuzz:
    """One generated task message: subject tokens after PREFIX, the PUB line's reply
    subject, a header block (None: a plain PUB) and a body."""

    tokens: tuple[bytes, ...]
    reply: bytes
    headers: HeaderBlock | None
    body: Body

    @property
    def subject(self) -> bytes:
        return PREFIX + b".".join(self.tokens)

    def frame(self, msg_id: int, max_payload: int) -> bytes:
        """The frame as written to the socket."""
        reply = self.reply + b" " if self.reply else b""
        if self.headers is None:
            body = self.body.encode(max_payload)
            control = b"PUB %s %s%d\r\n" % (self.subject, reply, len(body))
            block = b""
        else:
            block = self.headers.encode(b"fuzz-%d" % msg_id)
            body = self.body.encode(max_payload - len(block))
            control = b"HPUB %s %s%d %d\r\n" % (
                self.subject,
                reply,
                len(block),
                len(block) + len(body),
            )
        # The strategies keep to these; a frame outside them is a bug in this test.
        assert len(control) <= MAX_CONTROL_LINE, f"control line of {len(control)} bytes"
        assert len(block) <= MAX_HEADER_BLOCK, f"header block of {len(block)} bytes"
        assert len(block) + len(body) <= max_payload, "message over max_payload"
        return control + block + body + b"\r\n"

    def describe(self) -> str:
        parts = [f"subject={short(self.subject, 120)}"]
        if self.reply:
            parts.append(f"pub_reply={self.reply!r}")
        if self.headers is None:
            parts.append("no headers (PUB)")
        else:
            head = self.headers
            if head.status:
                parts.append(f"status_line={head.status!r}")
            if not head.terminated:
                parts.append("no blank line at the end")
            parts.append("headers=[" + ", ".join(line.describe() for line in head.lines) + "]")
        parts.append(f"body={self.body.describe()}")
        return "Fuzz(" + ", ".join(parts) + ")"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # How Hypothesis shows a falsifying example: readable, long values cut short.
        printer.text(self.describe())


def repeat(pattern: bytes, size: int) -> bytes:
    """``pattern`` repeated to exactly ``size`` bytes."""
    return (pattern * (size // len(pattern) + 1))[:size]


# -- strategies -------------------------------------------------------------------------


def usually(default: T, rare: SearchStrategy[T], percent: int) -> SearchStrategy[T]:
    """``default``, or ``rare`` in ``percent`` % of draws; shrinks towards ``default``."""
    return st.integers(0, 99).flatmap(
        lambda roll: rare if roll >= 100 - percent else st.just(default)
    )


def without(banned: bytes, empty: bytes = b"") -> Callable[[bytes], bytes]:
    """Drop the ``banned`` bytes; ``empty`` if nothing is left."""

    def clean(raw: bytes) -> bytes:
        return raw.translate(None, banned) or empty

    return clean


# Space and tab split the PUB arguments, CR and LF end the line, '.' separates tokens;
# DEL makes a subject no wildcard filter matches (so no consumer delivers it).
token_bytes = without(b" \t\r\n.\x7f", b"_")
line_bytes = without(b"\r\n")
ID_ALPHABET = string.ascii_letters + string.digits + "_=-"

ids = st.text(ID_ALPHABET, min_size=1, max_size=128).map(str.encode)
SPECIAL_TOKENS = [
    b"*",
    b">",
    b":",
    b"~",
    b"%",
    b"%2E",
    b"a:b",
    b"x~y",
    b"=",
    b"\x00",
    b"\x0b",  # vertical tab and form feed: whitespace to many parsers, not to the server
    b"\x0c",
    b"\xff",
    b"\xc3\x28",  # an invalid two-byte UTF-8 sequence
    b"\xed\xa0\x80",  # an encoded surrogate
    "\u00e9\u20ac".encode(),
    "\u00a0".encode(),  # no-break space
    "\U0001f600".encode(),
    b"$JS",
    b"_INBOX",
]
tokens = st.one_of(
    ids,
    st.binary(min_size=1, max_size=40).map(token_bytes),
    st.text(
        st.characters(codec="utf-8", exclude_characters=" \t\r\n.\x7f"), min_size=1, max_size=20
    ).map(str.encode),
    st.sampled_from(SPECIAL_TOKENS),
    # Up to the control-line limit.
    st.builds(
        repeat,
        st.binary(min_size=1, max_size=4).map(token_bytes),
        st.integers(129, MAX_SUBJECT - len(PREFIX)),
    ),
)
subject_tails = st.one_of(
    st.tuples(ids, ids),  # natrio.task.<type>.<group>.<run>.<step>: a well-formed task
    st.lists(tokens, min_size=1, max_size=8).map(tuple),  # 5 to 12 tokens of anything
).filter(lambda tail: len(PREFIX) + len(b".".join(tail)) <= MAX_SUBJECT)

pub_replies = usually(b"", st.integers(0, 9).map(lambda n: b"_INBOX.fuzz.%d" % n), 10)


def cased(name: bytes) -> SearchStrategy[bytes]:
    return st.sampled_from([name, name, name.lower(), name.upper()])


separators = st.sampled_from([b": ", b": ", b":", b" : ", b":\t"])
hostile_text = st.one_of(
    st.binary(max_size=80).map(line_bytes),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40).map(str.encode),
)


def header(
    name: SearchStrategy[bytes], value: SearchStrategy[bytes | FromNow]
) -> SearchStrategy[Line]:
    return st.builds(Line, name, separators, value)


reply_values = st.one_of(
    st.sampled_from(
        [
            b"$JS.API.STREAM.DELETE.NATRIO_EVENTS",
            KV_REPLY_TARGET.encode(),
            b"_INBOX.ok",
            b"",
            b" ",
            b"_INBOX.a b",
            b"_INBOX.a\tb",
            b"_INBOX. ok",
            b"*",
            b">",
            b"_INBOX.>",
            b"_INBOX..x",
            b".",
            b"_INBOX.\x00",
            b"_INBOX.\x0b",
            b"_INBOX.\xff",
            "_INBOX.\u00e9".encode(),
        ]
    ),
    # Long: past the control-line limit of whoever publishes to it.
    st.builds(lambda n: b"_INBOX." + b"r" * n, st.integers(100, 30_000)),
    hostile_text,
)

POLICY_FIELDS = (
    "initial_interval",
    "backoff_coefficient",
    "maximum_interval",
    "maximum_attempts",
    "non_retryable",
    "jitter",
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2, 10**30, -(10**30), 2**63, 2**64]),
    st.floats(),  # nan and infinities included, written as NaN and Infinity
    st.sampled_from([1e308, -1e308, 5e-324]),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
policy_objects = st.fixed_dictionaries(
    {},
    optional={field: st.one_of(json_scalars, json_values) for field in POLICY_FIELDS}
    | {"unknown": json_scalars},
)
# Policies that the current RetryPolicy may or may not accept (infinities, huge counts):
# drawn as JSON, so that RetryPolicy.from_json decides, as the worker does.
valid_policies = st.fixed_dictionaries(
    {"maximum_interval": st.floats(0, 0.5)},
    optional={
        "initial_interval": st.one_of(st.floats(0, 0.5), st.just(math.inf)),
        "backoff_coefficient": st.one_of(st.floats(1, 1e308), st.just(math.inf)),
        "maximum_attempts": st.one_of(st.integers(0, 5), st.just(10**30)),
        "non_retryable": st.lists(
            st.sampled_from(["FuzzFailure", "Exception", "Fatal", "Nope"]), max_size=2
        ),
        "jitter": st.floats(0, 1),
    },
).map(lambda policy: json.dumps(policy).encode())


def quick_retries(value: bytes) -> bool:
    """Whether a Natrio-Retry value, if it is a valid policy, retries within MAX_RETRY_DELAY.

    Only the first two delays matter: the handler succeeds at the third attempt.
    """
    try:
        policy = natrio.RetryPolicy.from_json(value.decode(errors="replace").strip())
        exact = attrs.evolve(policy, jitter=0.0)
        longest = max(exact.delay(1), exact.delay(2)) * (1.0 + policy.jitter)
    except Exception:
        return True  # not a valid policy: the worker must dead-letter it at once
    return bool(longest <= MAX_RETRY_DELAY)


retry_values = st.one_of(
    st.builds(lambda v: json.dumps(v).encode(), policy_objects),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    valid_policies,
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b"NaN",
            b'{"initial_interval": NaN}',
            b'{"maximum_attempts": 1e400}',
            b'{"maximum_attempts": "2"}',
            b'{"initial_interval": -Infinity}',
            b'{"non_retryable": "ValueError"}',
            b"1" * 5000,  # past Python's int-from-string digit limit
            b"[" * 3000,
        ]
    ),
    hostile_text,
).filter(quick_retries)
deadline_values = st.one_of(
    st.sampled_from(
        [
            b"nan",
            b"NaN",
            b"inf",
            b"-inf",
            b"Infinity",
            b"1e400",
            b"-1e400",
            b"0",
            b"-1",
            b"1e308",
            b"",
            b"soon",
            b"1_000",
            b"0x10",
            b" 5 ",
            "\uff11\uff12".encode(),  # full-width digits, which float() accepts
        ]
    ),
    st.floats().map(lambda f: repr(f).encode()),
    st.integers().map(lambda n: str(n).encode()),
    st.builds(FromNow, st.floats(-30, 30)),
    hostile_text,
)
iteration_values = st.one_of(
    st.sampled_from(
        [
            b"0",
            b"-1",
            b"1",
            b"2",
            b"99",
            b"100",
            b"101",
            b"1" * 5000,
            b"1e3",
            b"abc",
            b"",
            b" 3 ",
            "\uff13".encode(),
        ]
    ),
    st.integers().map(lambda n: str(n).encode()),
    hostile_text,
)
submitted_values = st.one_of(
    st.floats().map(lambda f: repr(f).encode()), st.sampled_from([b"", b"yesterday"]), hostile_text
)
other_names = st.one_of(
    st.sampled_from(
        [
            b"Natrio-Outcome",
            b"Natrio-Task-Seq",
            b"Natrio-Attempt",
            b"Natrio-Worker",
            b"Status",
            b"Description",
            b"X-Trace",
            b"Content-Type",
        ]
    ),
    st.binary(min_size=1, max_size=30).map(without(b"\r\n:", b"X")),
).filter(lambda name: not name.strip().lower().startswith(b"nats-"))
other_values = st.one_of(
    hostile_text,
    st.builds(
        repeat,
        st.binary(min_size=1, max_size=4).map(without(b"\r\n", b"h")),
        st.integers(1000, 20_000),
    ),
)
colonless = st.binary(max_size=60).map(without(b"\r\n:")).map(lambda text: Line(text, b"", b""))

header_lines = st.one_of(
    header(cased(b"Natrio-Reply"), reply_values),
    header(cased(b"Natrio-Retry"), retry_values),
    header(cased(b"Natrio-Deadline"), deadline_values),
    header(cased(b"Natrio-Iteration"), iteration_values),
    header(cased(b"Natrio-Submitted"), submitted_values),
    header(other_names, other_values),
    colonless,
)
STATUS_LINES = [
    b" 503",
    b" 100 Idle Heartbeat",
    b" 409 Consumer Deleted",
    b" 409 Leadership Change",
    b" 404 No Messages",
    b" 408 Request Timeout",
    b" 400 Bad Request",
    b" 200 OK",
    b"x",
]
hostile_blocks = st.builds(
    HeaderBlock,
    status=usually(
        b"", st.one_of(st.sampled_from(STATUS_LINES), st.binary(max_size=24).map(line_bytes)), 8
    ),
    lines=st.lists(header_lines, max_size=8).map(tuple),
    msg_id_at=st.integers(0, 8),
    terminated=usually(True, st.just(False), 8),
)


def once_each(lines: list[Line]) -> tuple[Line, ...]:
    """The lines with each natrio header name kept once (its first line)."""
    seen: set[bytes] = set()
    kept: list[Line] = []
    for line in lines:
        if line.name.startswith(b"Natrio-"):
            if line.name in seen:
                continue
            seen.add(line.name)
        kept.append(line)
    return tuple(kept)


# What a valid task may carry: natrio's headers, each once, with values a client could
# send, beside any other headers.
task_lines = st.one_of(
    header(st.just(b"Natrio-Reply"), st.sampled_from([b"_INBOX.ok", b"_INBOX.fuzz.reply", b""])),
    header(st.just(b"Natrio-Retry"), valid_policies.filter(quick_retries)),
    header(st.just(b"Natrio-Deadline"), st.builds(FromNow, st.floats(-60, 3600))),
    header(st.just(b"Natrio-Iteration"), st.sampled_from([b"1", b"2", b"3"])),
    header(st.just(b"Natrio-Submitted"), st.builds(FromNow, st.floats(-60, 0))),
    header(other_names, other_values),
)
task_blocks = st.builds(
    HeaderBlock,
    status=st.just(b""),
    lines=st.lists(task_lines, max_size=6).map(once_each),
    msg_id_at=st.integers(0, 6),
    terminated=st.just(True),
)
header_blocks = st.one_of(task_blocks, hostile_blocks).filter(
    lambda block: len(block.encode(b"fuzz-" + b"9" * 20)) <= MAX_HEADER_BLOCK
)


def _body(roll: int) -> SearchStrategy[Body]:
    if roll < 10:
        return st.just(Body(b""))
    if roll < 85:
        # The first byte picks what the handler does: drawn on its own, so that all four
        # ways are common (Hypothesis favours zero bytes).
        return st.builds(
            lambda first, rest: Body(bytes([first]) + rest),
            st.integers(0, 255),
            st.binary(max_size=255),
        )
    if roll < 97:
        return st.builds(
            Body, st.binary(min_size=1, max_size=8), length=st.integers(4096, 256 * 1024)
        )
    return st.builds(Body, st.binary(min_size=1, max_size=8), slack=st.integers(0, 64))


bodies = st.integers(0, 99).flatmap(_body)
messages = st.builds(
    Fuzz,
    tokens=subject_tails,
    reply=pub_replies,
    headers=st.integers(0, 99).flatmap(lambda roll: st.none() if roll >= 95 else header_blocks),
    body=bodies,
)
batches = st.lists(messages, min_size=1, max_size=MAX_BATCH)


# -- the handlers -------------------------------------------------------------------------


class FuzzFailure(Exception):
    """What the fuzz handler raises."""


@attrs.frozen
class Canary:
    n: int


async def fuzz_handler(ctx: natrio.TaskContext) -> bytes:
    data = ctx.input
    mode = data[0] % 4 if data else 0
    if mode == 1:
        raise natrio.Fatal(FuzzFailure(f"fatal input {data[:8]!r}"))
    if mode >= 2 and ctx.attempt < mode:
        raise FuzzFailure(f"attempt {ctx.attempt} of input {data[:8]!r} fails")
    return data[:64]


async def canary_handler(ctx: natrio.TaskContext, value: Canary) -> int:
    return value.n + 1


# -- a hostile client on a plain socket ---------------------------------------------------


class ServerRejected(Exception):
    """The server answered the raw client with -ERR, or closed its socket."""


class RawClient:
    """The NATS protocol by hand: writes frames, and reads PONGs and the events it asked for.

    It subscribes to the ``fuzz`` completion events and counts them by their
    ``Natrio-Task-Seq`` header; its parser splits on spaces only, like the server, so
    hostile bytes in subjects cannot trip it up.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.max_payload = 0
        self.error: bytes | None = None
        self.eof = False
        self.completions: collections.Counter[int] = collections.Counter()
        self._pongs: collections.deque[trio.Event] = collections.deque()
        self._send_lock = trio.Lock()

    @classmethod
    async def open(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        info = await client._line()
        assert info.startswith(b"INFO "), info
        client.max_payload = int(json.loads(info[5:])["max_payload"])
        await client.stream.send_all(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
            b"SUB natrio.event.fuzz.*.*.completed 1\r\n"
        )
        return client

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise EOFError
        self.buffer += data

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_loop(self) -> None:
        try:
            while True:
                line = await self._line()
                if line == b"PING":
                    async with self._send_lock:
                        await self.stream.send_all(b"PONG\r\n")
                elif line == b"PONG":
                    if self._pongs:
                        self._pongs.popleft().set()
                elif line.startswith(b"-ERR"):
                    self.error = line
                    self._wake_all()
                elif line.startswith((b"MSG ", b"HMSG ")):
                    args = line.split(b" ")
                    payload = await self._exactly(int(args[-1]) + 2)
                    if args[0] == b"HMSG":
                        self._count(payload[: int(args[-2])])
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.eof = True
            self._wake_all()

    def _count(self, block: bytes) -> None:
        for line in block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name == b"Natrio-Task-Seq" and value.strip().isdigit():
                self.completions[int(value)] += 1
                return
        self.completions[-1] += 1  # a completion event that names no task

    def _wake_all(self) -> None:
        while self._pongs:
            self._pongs.popleft().set()

    async def send(self, data: bytes = b"") -> None:
        """Write ``data`` and a PING; return once the server has answered with PONG."""
        if self.error is not None or self.eof:
            raise ServerRejected(f"raw connection unusable: {self.error!r}")
        pong = trio.Event()
        self._pongs.append(pong)
        async with self._send_lock:
            await self.stream.send_all(data + b"PING\r\n")
        await pong.wait()
        if self.error is not None or self.eof:
            raise ServerRejected(
                f"the server answered {self.error!r}"
                if self.error
                else "the server closed the raw connection"
            )


# -- one server, connections and worker, shared by the examples while they pass -----------


class GeneratorBug(Exception):
    """A generated frame that does not reach the stream: this test is wrong, not the worker."""


class Violation(AssertionError):
    """One of the scenario's invariants does not hold."""


class WorkerConnectionLost(Violation):
    """The worker's connection was closed or dropped by the server."""


class WorkerDied(Violation):
    """The worker's ``run()`` ended by itself."""


class CanaryFailed(Violation):
    """Invariant 1: a valid task submitted after the batch did not complete."""


class NotSettled(Violation):
    """Invariant 2: messages were still pending or unacknowledged after SETTLE_BOUND."""


class InFlightLeak(Violation):
    """Invariant 3: the dispatcher still counted tasks in flight once all had settled."""


class BadDeadLetter(Violation):
    """Invariant 4: a dead-letter entry that is too large, unreadable or has no reason."""


class OutcomeMismatch(Violation):
    """Invariant 5: a message with no outcome, or more than one."""


class StateDamaged(Violation):
    """Invariant 6: natrio's streams or buckets changed by a hostile reply subject."""


class StopTooSlow(Violation):
    """``run()`` took longer than grace + 1 s to return after ``stop()``."""


@attrs.define(eq=False)
class Rig:
    """A server with natrio provisioned, the worker on its own connection, an observer
    connection (client and JetStream API) and the raw hostile client."""

    server: natrio.EmbeddedServer
    worker_nc: natrio.Connection
    nc: natrio.Connection
    worker: natrio.Worker
    raw: RawClient
    nursery: trio.Nursery
    client: natrio.Client = attrs.field(init=False)
    js: JetStream = attrs.field(init=False)
    reconnects: int = 0
    broken: bool = False
    worker_error: BaseException | None = None
    worker_returned_at: float | None = None
    worker_done: trio.Event = attrs.Factory(trio.Event)
    closing: trio.Event = attrs.Factory(trio.Event)
    closed: trio.Event = attrs.Factory(trio.Event)

    def __attrs_post_init__(self) -> None:
        self.client = natrio.Client(self.nc, timeout=10.0)
        self.js = JetStream(self.nc, timeout=10.0)

    async def run_worker(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self.worker.run(task_status=task_status)
        except Exception as exc:
            self.worker_error = exc
        finally:
            self.worker_returned_at = trio.current_time()
            self.worker_done.set()

    async def check_connection(self) -> None:
        """Raise when the worker's connection is gone or stuck, or the worker has stopped.

        Each of these is raised from one line whatever its symptom (closed, dropped, a
        round trip that does not come back): the symptom depends on timing, and
        Hypothesis tells failures apart by where they are raised.
        """
        problem = self.connection_problem()
        if problem is None:
            try:
                with trio.fail_after(ROUND_TRIP_BOUND):
                    await self.worker_nc.flush()
            except (trio.TooSlowError, natrio.NatrioError) as exc:
                problem = (
                    f"the worker's connection did not complete a round trip (flush) within "
                    f"{ROUND_TRIP_BOUND} s: {exc!r}"
                )
            else:
                problem = self.connection_problem()
        if problem is not None:
            raise WorkerConnectionLost(problem)
        if self.worker_done.is_set():
            raise WorkerDied(f"worker.run() returned by itself; error: {self.worker_error!r}")

    def connection_problem(self) -> str | None:
        nc = self.worker_nc
        if nc.closed:
            return "the worker's connection is closed"
        if nc.reconnects != self.reconnects or not nc.connected:
            return (
                "the server dropped the worker's connection "
                f"(reconnects {nc.reconnects - self.reconnects}, connected now: {nc.connected})"
            )
        return None

    def server_errors(self) -> str:
        """The server's latest errors and warnings, for a failure message."""
        lines = [
            line for line in self.server.log_tail.splitlines() if "[ERR]" in line or "[WRN]" in line
        ]
        if not lines:
            return ""
        return "\nnats-server logged:\n" + "\n".join(line[:300] for line in lines[-5:])


def build_worker(nc: natrio.Connection) -> natrio.Worker:
    worker = natrio.Worker(nc, concurrency=8, ack_wait=ACK_WAIT, shutdown_grace=GRACE, retry=RETRY)
    worker.handle(TASK_TYPE, fuzz_handler)
    worker.handle_typed("canary", canary_handler)
    return worker


async def serve_rig(*, task_status: trio.TaskStatus[Rig] = trio.TASK_STATUS_IGNORED) -> None:
    """Bring up a rig, hand it over, and keep it until ``rig.closing`` is set."""
    server = natrio.EmbeddedServer()
    await trio.to_thread.run_sync(server.start)
    rig: Rig | None = None
    try:
        async with (
            natrio.connect(server.url, name="fuzz-worker") as worker_nc,
            natrio.connect(server.url, name="fuzz-observer") as nc,
        ):
            await natrio.provision(nc, worker_ttl=2.0)
            raw = await RawClient.open(server.port)
            async with trio.open_nursery() as nursery:
                rig = Rig(server, worker_nc, nc, build_worker(worker_nc), raw, nursery)
                nursery.start_soon(raw.read_loop)
                await raw.send()
                await nursery.start(rig.run_worker)
                rig.reconnects = worker_nc.reconnects
                task_status.started(rig)
                await rig.closing.wait()
                if rig.broken:
                    # Down first, so that closing a stuck connection does not wait for
                    # its flush: the next example is waiting.
                    await trio.to_thread.run_sync(server.kill)
                rig.worker.stop(0.0)
                # A broken rig gets no more than its stop bound: the next example waits.
                with trio.move_on_after(1.5 if rig.broken else GRACE + 2.0):
                    await rig.worker_done.wait()
                nursery.cancel_scope.cancel()
            await raw.stream.aclose()
    except Exception:
        if rig is None:
            raise  # could not even start
        # A broken rig may fail on the way down too; the examples report what broke.
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
            if rig is not None:
                rig.closed.set()


@attrs.define
class Figures:
    """What the passing examples added up to."""

    batches: int = 0
    sent: int = 0
    completed: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    max_settle: float = 0.0
    failures: int = 0
    kinds: collections.Counter[str] = attrs.Factory(collections.Counter)


@attrs.define
class Batch:
    """One batch as it went out: its messages and where the streams stood before it."""

    messages: list[Fuzz]
    first_seq: int
    dlq_before: int

    def message(self, seq: int) -> str:
        index = seq - self.first_seq
        if 0 <= index < len(self.messages):
            return f"#{index} (task seq {seq}) {self.messages[index].describe()}"
        return f"task seq {seq} (not from this batch)"

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.first_seq + len(self.messages))


class ErrorLog(logging.Handler):
    """natrio's ERROR records during the current example, shown with a failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]!r})"
        self.records.append(text[:400])

    def text(self) -> str:
        if not self.records:
            return ""
        shown = list(dict.fromkeys(self.records))[-5:]
        return f"\nnatrio logged {len(self.records)} error(s), the last:\n" + "\n".join(shown)


class Rigs:
    """The current rig, replaced by a fresh one after an example fails."""

    def __init__(self, nursery: trio.Nursery, errors: ErrorLog) -> None:
        self.nursery = nursery
        self.errors = errors
        self.current: Rig | None = None
        self.msg_ids = itertools.count()
        self.canaries = itertools.count()

    async def healthy(self) -> Rig:
        if self.current is None or self.current.broken:
            await self.close()
            self.current = await self.nursery.start(serve_rig)
        return self.current

    async def close(self) -> None:
        rig, self.current = self.current, None
        if rig is not None:
            rig.closing.set()
            with trio.CancelScope(shield=True), trio.move_on_after(GRACE + 10.0):
                await rig.closed.wait()

    async def check(self, messages: list[Fuzz], figures: Figures) -> None:
        """Send one batch and check every invariant; a failure leaves the rig broken."""
        rig = await self.healthy()
        self.errors.records.clear()
        try:
            await self._check(rig, messages, figures)
        except BaseException as exc:
            rig.broken = True
            figures.failures += 1
            if isinstance(exc, Violation) and exc.args:
                # The same exception (raised from the same line), so Hypothesis still
                # tells the kinds of failure apart.
                extra = rig.server_errors() + self.errors.text()
                exc.args = (str(exc.args[0]) + extra, *exc.args[1:])
            raise

    async def _check(self, rig: Rig, messages: list[Fuzz], figures: Figures) -> None:
        js = rig.js
        tasks_before = await last_seq(js, "NATRIO_TASKS")
        batch = Batch(messages, tasks_before + 1, await last_seq(js, "NATRIO_DLQ"))
        rig.raw.completions.clear()
        frames = b"".join(m.frame(next(self.msg_ids), rig.raw.max_payload) for m in messages)
        try:
            with trio.fail_after(30):
                await rig.raw.send(frames)
        except ServerRejected as exc:
            raise GeneratorBug(f"the server refused a generated frame: {exc}") from None
        sent_at = trio.current_time()
        await self._all_stored(rig, batch)

        # Invariant 1 (in the background) and 2, 3 and 6 (polled), all from the PONG on.
        canary: dict[str, Any] = {}
        canary_done = trio.Event()
        n = next(self.canaries)
        rig.nursery.start_soon(run_canary, rig.client, n, canary, canary_done)
        deadline = sent_at + max(SETTLE_BOUND, CANARY_BOUND)
        settled_at: float | None = None
        while True:
            await rig.check_connection()
            await check_state(rig)
            left = await left_over(rig)
            now = trio.current_time()
            if not left and settled_at is None:
                settled_at = now
            in_flight = rig.worker.statistics().dispatcher.in_flight
            if canary_done.is_set() and canary.get("error") is not None:
                raise CanaryFailed(f"the canary task failed: {canary['error']!r}")
            if settled_at is not None and in_flight == 0 and canary_done.is_set():
                break
            if not canary_done.is_set() and now - sent_at > CANARY_BOUND:
                raise CanaryFailed(
                    f"a canary task submitted after the batch did not complete within {CANARY_BOUND} s"
                    + await self._outcomes_text(rig, batch)
                )
            if settled_at is None and now - sent_at > SETTLE_BOUND:
                raise NotSettled(
                    f"not settled {SETTLE_BOUND} s after the server took the batch: {left}"
                    + await self._outcomes_text(rig, batch)
                )
            if settled_at is not None and now >= deadline:
                raise InFlightLeak(
                    f"everything settled, but the dispatcher still counts {in_flight} in flight"
                )
            await trio.sleep(POLL)
        if canary.get("value") != n + 1:
            raise CanaryFailed(f"the canary returned {canary.get('value')!r}, not {n + 1}")
        # The fuzz tasks and the canary are gone, so the work queue is empty; anything
        # left is a message no consumer filter matches (see DEL in the module docstring).
        stored = int((await js.stream_info("NATRIO_TASKS"))["state"]["messages"])
        if stored:
            raise GeneratorBug(
                f"{stored} message(s) left in NATRIO_TASKS that the fuzz~default filter does "
                "not see: the generator made subjects no consumer can deliver"
            )

        # Invariants 4 and 5.
        await rig.raw.send()  # every completion event sent to the raw client is in
        entries = await dead_letters(rig, batch)
        problems = outcome_problems(batch, rig.raw.completions, entries)
        if problems:
            raise OutcomeMismatch("\n".join(problems))
        await check_state(rig, kv=True)
        await rig.check_connection()

        figures.batches += 1
        figures.sent += len(messages)
        figures.completed += sum(rig.raw.completions[seq] for seq in batch.seqs)
        figures.dead_lettered += len(entries)
        figures.kinds.update(entry.error.kind for entry in entries)
        figures.malformed += sum(entry.error.kind == "malformed" for entry in entries)
        assert settled_at is not None
        figures.max_settle = max(figures.max_settle, settled_at - sent_at)

    async def _all_stored(self, rig: Rig, batch: Batch) -> None:
        expected = batch.first_seq + len(batch.messages) - 1
        with trio.move_on_after(STORE_BOUND):
            while (stored := await last_seq(rig.js, "NATRIO_TASKS")) < expected:  # noqa: ASYNC110
                await trio.sleep(POLL)
            return
        raise GeneratorBug(
            f"the stream stored {stored - batch.first_seq + 1} of {len(batch.messages)} frames "
            "the server took: the generator made messages JetStream drops"
        )

    async def _outcomes_text(self, rig: Rig, batch: Batch) -> str:
        """Which messages of the batch have an outcome so far, for a failure message."""
        try:
            with trio.move_on_after(5):
                await rig.raw.send()
                entries = await dead_letters(rig, batch, check=False)
                problems = outcome_problems(batch, rig.raw.completions, entries)
                return "\n" + "\n".join(problems or ["(every message has exactly one outcome)"])
        except Exception as exc:
            return f"\n(could not read the outcomes: {exc!r})"
        return "\n(could not read the outcomes in time)"


async def run_canary(
    client: natrio.Client, n: int, result: dict[str, Any], done: trio.Event
) -> None:
    try:
        handle = await client.submit("canary", Canary(n))
        result["value"] = await handle.result(int)
    except Exception as exc:
        result["error"] = exc
    finally:
        done.set()


async def last_seq(js: JetStream, stream: str) -> int:
    return int((await js.stream_info(stream))["state"]["last_seq"])


async def left_over(rig: Rig) -> dict[str, Any]:
    """What of the fuzz messages is still in the consumer or the stream (empty: settled)."""
    info = await rig.js.consumer_info("NATRIO_TASKS", CONSUMER)
    # One page of subjects, not JetStream.subjects(): the server writes invalid UTF-8 in
    # subjects as U+FFFD, so distinct subjects can collide and paging never ends.
    stream = await rig.js.stream_info("NATRIO_TASKS", subjects_filter="natrio.task.fuzz.>")
    subjects: dict[str, int] = (stream.get("state") or {}).get("subjects") or {}
    left: dict[str, Any] = {}
    if info["num_ack_pending"] or info["num_pending"]:
        left["consumer"] = {
            key: info[key] for key in ("num_ack_pending", "num_pending", "num_redelivered")
        }
    if subjects:
        left["stream"] = {
            "messages": sum(subjects.values()),
            "subjects": {s[:120]: count for s, count in itertools.islice(subjects.items(), 5)},
        }
    return left


async def check_state(rig: Rig, *, kv: bool = False) -> None:
    """Invariant 6: natrio's streams exist, and (with ``kv``) the reply target key was not written."""
    names = set((await rig.js.api("STREAM.NAMES")).get("streams") or [])
    missing = [name for name in NATRIO_STREAMS if name not in names]
    if missing:
        raise StateDamaged(f"natrio's streams {missing} are gone (a Natrio-Reply deleted them?)")
    if kv:
        info = await rig.js.stream_info("KV_natrio_checkpoints", subjects_filter=KV_REPLY_TARGET)
        if (info.get("state") or {}).get("subjects"):
            raise StateDamaged(f"a reply wrote {KV_REPLY_TARGET}, natrio's own checkpoint bucket")


async def dead_letters(rig: Rig, batch: Batch, *, check: bool = True) -> list[natrio.DeadLetter]:
    """Every entry added to NATRIO_DLQ since the batch went out; with ``check``, invariant 4."""
    entries: list[natrio.DeadLetter] = []
    for seq in range(batch.dlq_before + 1, await last_seq(rig.js, "NATRIO_DLQ") + 1):
        try:
            reply = await rig.js.api("STREAM.MSG.GET.NATRIO_DLQ", {"seq": seq})
        except natrio.JetStreamError as exc:
            if exc.err_code == 10037:  # no message: gone already
                continue
            raise
        stored = reply["message"]
        data = _b64(stored.get("data"))
        size = len(data) + len(_b64(stored.get("hdrs")))
        try:
            entry = natrio.DeadLetter.from_json(data)
        except Exception as exc:
            if check:
                raise BadDeadLetter(
                    f"dead-letter entry {seq} does not read back: {exc!r}"
                ) from None
            continue
        if check:
            where = f"dead-letter entry {seq} for {batch.message(entry.task_seq)}"
            if size > rig.raw.max_payload:
                raise BadDeadLetter(f"{where} is {size} bytes, over max_payload")
            if not entry.error.message:
                raise BadDeadLetter(f"{where} gives no reason: {entry.error!r}")
            if entry.error.kind not in KNOWN_KINDS:
                raise BadDeadLetter(f"{where} has an unknown kind {entry.error.kind!r}")
        entries.append(entry)
    return entries


def _b64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def outcome_problems(
    batch: Batch, completions: collections.Counter[int], entries: list[natrio.DeadLetter]
) -> list[str]:
    """Invariant 5: each message of the batch has one completion event or one dead letter."""
    dead = collections.Counter(entry.task_seq for entry in entries)
    problems: list[str] = []
    for seq in batch.seqs:
        done, died = completions[seq], dead[seq]
        if done + died == 0:
            problems.append(f"no outcome: {batch.message(seq)}")
        elif done + died > 1:
            problems.append(
                f"{done} completion event(s) and {died} dead letter(s): {batch.message(seq)}"
            )
    strays = {seq: n for seq, n in (completions + dead).items() if seq not in batch.seqs}
    if strays:
        problems.append(f"outcomes for task sequences outside the batch: {strays}")
    return problems


# -- the test -------------------------------------------------------------------------------


def run_property(rigs: Rigs, figures: Figures) -> None:
    """Hypothesis drives the batches from this thread; each runs in Trio on the shared rig."""

    @settings(
        max_examples=MESSAGES,  # batches; the examples after the MESSAGES-th message pass at once
        deadline=None,
        database=None,
        print_blob=True,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(batches)
    def every_batch_settles(batch: list[Fuzz]) -> None:
        if figures.sent >= MESSAGES and not figures.failures:
            return  # enough sent; while shrinking, every example runs
        trio.from_thread.run(rigs.check, batch, figures)

    test = every_batch_settles
    if os.environ.get("NATRIO_FUZZ_SEED"):
        test = seed(int(os.environ["NATRIO_FUZZ_SEED"]))(test)
    test()


async def test_protocol_fuzz_never_kills_or_stalls_the_worker(nursery: trio.Nursery) -> None:
    figures = Figures()
    errors = ErrorLog()
    logging.getLogger("natrio").addHandler(errors)
    rigs = Rigs(nursery, errors)
    try:
        await trio.to_thread.run_sync(functools.partial(run_property, rigs, figures))
        rig = await rigs.healthy()
        await rig.check_connection()
        began = trio.current_time()
        rig.worker.stop()
        with trio.fail_after(GRACE + 10.0):
            await rig.worker_done.wait()
        assert rig.worker_returned_at is not None
        stop_seconds = rig.worker_returned_at - began
        if stop_seconds > GRACE + 1.0:
            raise StopTooSlow(f"run() returned {stop_seconds:.2f} s after stop(grace={GRACE})")
        assert rig.worker_error is None, rig.worker_error
        assert not rig.worker_nc.closed
    finally:
        await rigs.close()
        logging.getLogger("natrio").removeHandler(errors)
    assert figures.failures == 0
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(figures.kinds.items()))
    harness.report(
        harness.ScenarioResult(
            scenario="Protocol fuzz",
            load=f"{figures.sent} hypothesis-drawn raw NATS frames in {figures.batches} batches",
            faults="arbitrary subject bytes and tokens, hostile header blocks and natrio "
            "headers, bodies up to max_payload",
            submitted=figures.sent,
            completed=figures.completed,
            dead_lettered=figures.dead_lettered,
            lost=figures.sent - figures.completed - figures.dead_lettered,
            duplicate_completions=0,
            recovery_seconds=figures.max_settle,
            notes=f"{figures.malformed} malformed; dead letters by kind: {kinds}; "
            f"time to recover = slowest batch to settle (bound {SETTLE_BOUND:.0f} s); "
            f"canary completed after every batch; stop {stop_seconds:.2f} s (grace {GRACE:.0f} s)",
        )
    )
