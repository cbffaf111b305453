"""Rate limits: RateLimit's validation, the worker limiter's exact sliding window, and the
cluster limiter's JetStream counters on a real nats-server."""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import cast

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import natrio
from natrio._errors import ConfigurationError, JetStreamError, NatrioError
from natrio._jetstream import JetStream
from natrio._model import Task
from natrio._routing.limits import (
    COUNTER_MAX_AGE,
    COUNTER_STREAM,
    ClusterLimiter,
    RateLimit,
    WorkerLimiter,
    counter_stream_config,
    counter_value,
    rate_counter_subject,
)
from natrio._transport.protocol import check_subject

# JetStream error codes of a counter stream refusing a publish.
COUNTER_INCREMENT_MISSING = 10169
COUNTER_HAS_PAYLOAD = 10170

# A fixed Unix time in the middle of a 60 s window: the server does not care what the
# window index is, so the tests do not depend on the clock.
PER = 60.0
WINDOW = 29_000_000
NOW = WINDOW * PER + 12.5


def task(**changes: object) -> Task:
    fields: dict[str, object] = {
        "task_type": "send",
        "group": "default",
        "run_id": "r1",
        "step_id": "s1",
        "input": b"",
        "headers": {"tenant": "acme"},
        "attempt": 1,
        "seq": 1,
    }
    return Task(**(fields | changes))  # type: ignore[arg-type]


# -- RateLimit ------------------------------------------------------------------------


def test_defaults_and_key_of() -> None:
    limit = RateLimit(5, 1.5)
    assert (limit.limit, limit.per, limit.key, limit.scope) == (5, 1.5, None, "worker")
    assert limit.key_of(task()) == ""
    keyed = RateLimit(1, 3600, key=lambda t: t.headers["tenant"], scope="cluster")
    assert keyed.key_of(task()) == "acme"
    assert RateLimit(1_000_000, 1e-9).limit == 1_000_000
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limit.limit = 6  # type: ignore[misc]


@pytest.mark.parametrize("value", [0, -1, 1_000_001, True, 1.0, "5", None, 10**400])
def test_bad_limit(value: object) -> None:
    with pytest.raises(ConfigurationError, match="limit must be an int from 1 to 1_000_000"):
        RateLimit(value, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, 86400.001, 10**400, True, "1", None]
)
def test_bad_per(value: object) -> None:
    with pytest.raises(ConfigurationError, match="per must be a finite number"):
        RateLimit(1, value)  # type: ignore[arg-type]


async def async_key(t: Task) -> str:
    return ""


async def async_gen_key(t: Task) -> AsyncIterator[str]:
    yield ""


class AsyncCallable:
    async def __call__(self, t: Task) -> str:
        return ""


@pytest.mark.parametrize("value", ["tenant", 3, async_key, async_gen_key, AsyncCallable()])
def test_bad_key(value: object) -> None:
    with pytest.raises(ConfigurationError, match="key must be"):
        RateLimit(1, 1.0, key=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["global", "Worker", "", None, 1])
def test_bad_scope(value: object) -> None:
    with pytest.raises(ConfigurationError, match="scope must be 'worker' or 'cluster'"):
        RateLimit(1, 1.0, scope=value)  # type: ignore[arg-type]


def test_configuration_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="limit"):
        RateLimit(0, 1.0)


def test_key_of_wants_a_str() -> None:
    limit = RateLimit(1, 1.0, key=lambda t: t.seq)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a str, got int"):
        limit.key_of(task())


def test_key_of_a_coroutine_is_refused_without_a_warning() -> None:
    # Disguised as a sync function, so construction cannot tell.
    limit = RateLimit(1, 1.0, key=lambda t: async_key(t))  # type: ignore[arg-type,return-value]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="got coroutine"):
            limit.key_of(task())
        gc.collect()
    assert [str(w.message) for w in caught] == []


def test_key_of_lets_the_key_functions_errors_through() -> None:
    limit = RateLimit(1, 1.0, key=lambda t: t.headers["missing"])
    with pytest.raises(KeyError, match="missing"):
        limit.key_of(task())


# -- WorkerLimiter ----------------------------------------------------------------------


def test_worker_limiter_is_an_exact_sliding_window() -> None:
    limiter = WorkerLimiter(3, 10.0)
    assert [limiter.acquire("k", t) for t in (100.0, 101.0, 102.0)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k", 103.0) == 7.0
    assert limiter.acquire("k", 109.75) == 0.25
    assert limiter.acquire("k", 110.0) == 0.0  # the start at 100 has left the window
    assert limiter.acquire("k", 110.5) == 0.5  # the one at 101 leaves next
    assert limiter.acquire("k", 111.0) == 0.0
    assert limiter.acquire("k", 112.0) == 0.0
    assert limiter.acquire("k", 112.0) == 8.0


def test_worker_limiter_never_records_a_refusal() -> None:
    limiter = WorkerLimiter(1, 1.0)
    assert limiter.acquire("k", 0.0) == 0.0
    for i in range(1, 100):
        assert limiter.acquire("k", i / 100) > 0
    assert limiter.acquire("k", 1.0) == 0.0


def test_worker_limiter_keys_are_separate() -> None:
    limiter = WorkerLimiter(2, 5.0)
    for key in ("a", "b", ""):
        assert limiter.acquire(key, 1.0) == 0.0
        assert limiter.acquire(key, 2.0) == 0.0
        assert limiter.acquire(key, 3.0) == 3.0
    assert len(limiter) == 3


def test_worker_limiter_forgets_expired_keys() -> None:
    limiter = WorkerLimiter(5, 1.0)
    for i in range(10_000):
        assert limiter.acquire(f"key-{i}", i * 1e-4) == 0.0
    assert len(limiter) == 10_000
    # At 1.5, the starts from before 0.5 have expired: those keys are gone at once.
    limiter.acquire("other", 1.5)
    assert len(limiter) == 1 + sum(1 for i in range(10_000) if i * 1e-4 + 1.0 > 1.5)
    limiter.acquire("other", 2.0)
    assert len(limiter) == 1
    limiter.acquire("new", 3.5)
    assert len(limiter) == 1  # "other" has expired too


def test_worker_limiter_validates() -> None:
    with pytest.raises(ConfigurationError, match="WorkerLimiter: limit"):
        WorkerLimiter(0, 1.0)
    with pytest.raises(ConfigurationError, match="WorkerLimiter: per"):
        WorkerLimiter(1, math.nan)


calls = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.just(0.0), st.floats(0.0, 3.0, allow_nan=False), st.sampled_from([0.5, 1.0])),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 5),
    per=st.sampled_from([0.5, 1.0, 2.0, 0.1, 1.7]),
    steps=calls,
    start=st.floats(0.0, 1e6, allow_nan=False),
)
def test_worker_limiter_matches_the_sliding_window_model(
    limit: int, per: float, steps: list[tuple[str, float]], start: float
) -> None:
    limiter = WorkerLimiter(limit, per)
    admitted: dict[str, list[float]] = {}
    now = start
    for key, step in steps:
        now += step
        live = [s for s in admitted.get(key, []) if s + per > now]
        wait = limiter.acquire(key, now)
        if len(live) < limit:
            assert wait == 0.0  # admits whenever the window has room
            admitted.setdefault(key, []).append(now)
        else:
            assert wait == min(live) + per - now
            assert wait > 0
        # Memory: exactly the keys with a start in the window are kept.
        assert len(limiter) == sum(
            1 for starts in admitted.values() if any(s + per > now for s in starts)
        )
    for starts in admitted.values():
        # Never more than `limit` in any window of `per`: starts `limit` apart are `per` apart.
        for first, later in zip(starts, starts[limit:], strict=False):
            assert first + per <= later


# -- counter subjects and values ----------------------------------------------------------

HOSTILE_KEYS = [
    " ",
    ".",
    "..",
    "a.b",
    "*",
    ">",
    "a.*.>",
    "$JS.API.>",
    "tab\there",
    "line\r\nPUB x 1\r\n",
    "\x00",
    "ü∑😀",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "_",
    "x" * 100_000,
]


@settings(max_examples=300, deadline=None)
@given(
    key=st.text(
        st.one_of(
            st.characters(exclude_categories=()),
            st.characters(categories=["Cs"]),  # lone surrogates, rare otherwise
            st.sampled_from(".*> \t\r\n\x00"),
        )
    ),
    window=st.integers(-(10**20), 10**20),
    task_type=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
)
def test_any_key_makes_a_valid_subject(key: str, window: int, task_type: str) -> None:
    subject = rate_counter_subject(task_type, key, window)
    check_subject(subject, wildcards=False)
    tokens = subject.split(".")
    assert tokens[:4] == ["natrio", "counter", "rate", task_type]
    assert tokens[5] == str(window)
    assert len(tokens) == 6
    if key:
        assert len(tokens[4]) == 16
        assert all(c in "0123456789abcdef" for c in tokens[4])
    else:
        assert tokens[4] == "_"


def test_distinct_keys_make_distinct_subjects() -> None:
    keys = ["", *HOSTILE_KEYS, "A", "a", "a ", "x" * 99_999]
    assert len({rate_counter_subject("t", key, 1) for key in keys}) == len(keys)
    assert rate_counter_subject("t", "k", 1) != rate_counter_subject("u", "k", 1)
    assert rate_counter_subject("t", "k", 1) != rate_counter_subject("t", "k", 2)


@pytest.mark.parametrize("task_type", ["", "a.b", "*", "a b", "x" * 65])
def test_bad_task_type(task_type: str) -> None:
    with pytest.raises(ConfigurationError, match="task type"):
        rate_counter_subject(task_type, "", 1)


@pytest.mark.parametrize(
    ("ack", "value"),
    [({"val": "3"}, 3), ({"val": "-2"}, -2), ({"val": "+4"}, 4), ({"val": 5}, 5)],
)
def test_counter_value(ack: dict[str, object], value: int) -> None:
    assert counter_value({"stream": COUNTER_STREAM, "seq": 1, **ack}, "s") == value


@pytest.mark.parametrize(
    "ack",
    [
        {"stream": "X", "seq": 1},
        {"stream": "X", "seq": 1, "duplicate": True},
        {"val": None},
        {"val": True},
        {"val": 1.5},
        {"val": "1.5"},
        {"val": ""},
        {"val": "abc"},
        {"val": "\u0663"},  # a digit to int(), but not what the server writes
        {"val": "9" * 101},
    ],
)
def test_unreadable_counter_values(ack: dict[str, object]) -> None:
    with pytest.raises(NatrioError, match="without a readable value"):
        counter_value(ack, "s")


def test_counter_stream_config_validates() -> None:
    config = counter_stream_config(replicas=3, storage="memory")
    assert config["name"] == COUNTER_STREAM
    assert (config["num_replicas"], config["storage"]) == (3, "memory")
    for options in ({"replicas": 0}, {"replicas": 6}, {"replicas": True}, {"storage": "disk"}):
        with pytest.raises(ConfigurationError, match="counter stream"):
            counter_stream_config(**({"replicas": 1, "storage": "file"} | options))  # type: ignore[arg-type]


# -- ClusterLimiter on a real server ------------------------------------------------------


@asynccontextmanager
async def counter_connections(
    server: natrio.EmbeddedServer, count: int
) -> AsyncIterator[list[JetStream]]:
    """``count`` connections to ``server``, with the counter stream created."""
    async with AsyncExitStack() as stack:
        streams = [
            JetStream(await stack.enter_async_context(natrio.connect(server.url)))
            for _ in range(count)
        ]
        await streams[0].ensure_stream(counter_stream_config(replicas=1, storage="file"))
        yield streams


async def acquire_all(
    limiters: list[ClusterLimiter], per_limiter: int, key: str, now: float
) -> list[float]:
    """``per_limiter`` concurrent acquires on every limiter, released at once."""
    waits: list[float] = []
    go = trio.Event()

    async def one(limiter: ClusterLimiter) -> None:
        await go.wait()
        waits.append(await limiter.acquire(key, now))

    async with trio.open_nursery() as nursery:
        for limiter in limiters:
            for _ in range(per_limiter):
                nursery.start_soon(one, limiter)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    return waits


async def test_counter_stream_is_accepted_as_configured(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with counter_connections(natrio_server, 1) as [js]:
        config = counter_stream_config(replicas=1, storage="file")
        info = await js.ensure_stream(config)
        for name, value in config.items():
            assert info["config"][name] == value
        assert info["config"]["max_age"] == COUNTER_MAX_AGE == 2 * 3600 * 10**9
        # Created by counter_connections already: this was the (idempotent) update.
        assert info["state"]["messages"] == 0


async def test_concurrent_acquires_admit_exactly_the_limit(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with counter_connections(natrio_server, 3) as streams:
        limiters = [ClusterLimiter(js, "send", 7, PER) for js in streams]
        waits = await acquire_all(limiters, 40, "", NOW)
        assert len(waits) == 120
        assert waits.count(0.0) == 7
        # The rest are told to come back when the next window starts, with some jitter.
        to_next = (WINDOW + 1) * PER - NOW
        assert all(to_next <= wait <= to_next + 0.25 for wait in waits if wait)
        # The next window has room again, however crowded this one was.
        waits = await acquire_all(limiters, 5, "", NOW + to_next)
        assert waits.count(0.0) == 7


async def test_waits_point_at_the_next_window(natrio_server: natrio.EmbeddedServer) -> None:
    async with counter_connections(natrio_server, 1) as [js]:
        limiter = ClusterLimiter(js, "send", 1, 2)
        now = 1_000_001 * 2 + 0.5
        assert await limiter.acquire("k", now) == 0.0
        seen = set()
        for _ in range(20):
            wait = await limiter.acquire("k", now)
            assert 1.5 <= wait <= 1.5 + 0.1  # jitter: at most 5 % of per
            seen.add(wait)
        assert len(seen) > 1  # jittered, not all alike
        assert await limiter.acquire("k", now + max(seen)) == 0.0
        # Real time too: a refusal never waits past the next window (plus the jitter).
        now = time.time()
        while await limiter.acquire("live", now) == 0.0:
            pass
        assert 0 < await limiter.acquire("live", now) <= 2.1


async def test_keys_and_task_types_are_counted_apart(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with counter_connections(natrio_server, 2) as streams:
        send = [ClusterLimiter(js, "send", 3, PER) for js in streams]
        for key in ("", "tenant-a", "tenant-b"):
            waits = await acquire_all(send, 5, key, NOW)
            assert waits.count(0.0) == 3, key
        other = ClusterLimiter(streams[0], "resize", 3, PER)
        assert await other.acquire("tenant-a", NOW) == 0.0
        subjects = await streams[0].subjects(COUNTER_STREAM, "natrio.counter.rate.>")
        # One message per counter: the last one holds the total.
        assert subjects == {
            rate_counter_subject("send", "", WINDOW): 1,
            rate_counter_subject("send", "tenant-a", WINDOW): 1,
            rate_counter_subject("send", "tenant-b", WINDOW): 1,
            rate_counter_subject("resize", "tenant-a", WINDOW): 1,
        }


async def test_hostile_keys_count_on_the_server(natrio_server: natrio.EmbeddedServer) -> None:
    async with counter_connections(natrio_server, 1) as [js]:
        limiter = ClusterLimiter(js, "send", 1, PER)
        for key in ["", *HOSTILE_KEYS]:
            assert await limiter.acquire(key, NOW) == 0.0, repr(key)
            assert await limiter.acquire(key, NOW) > 0, repr(key)
        subjects = await js.subjects(COUNTER_STREAM, "natrio.counter.>")
        assert len(subjects) == 1 + len(HOSTILE_KEYS)


async def test_a_counter_keeps_counting_with_one_message_per_subject(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with counter_connections(natrio_server, 1) as [js]:
        subject = rate_counter_subject("send", "k", WINDOW)
        for expected in range(1, 31):
            ack = await js.publish(subject, b"", headers={"Nats-Incr": "+1"})
            # The server sends the total as a decimal string.
            assert ack == {"stream": COUNTER_STREAM, "seq": expected, "val": str(expected)}
        info = await js.stream_info(COUNTER_STREAM)
        assert info["state"]["messages"] == 1
        assert info["state"]["first_seq"] == 30


async def test_a_counter_stream_takes_only_increments(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with counter_connections(natrio_server, 1) as [js]:
        subject = rate_counter_subject("send", "", WINDOW)
        with pytest.raises(JetStreamError) as missing:
            await js.publish(subject, b"")
        assert (missing.value.code, missing.value.err_code) == (400, COUNTER_INCREMENT_MISSING)
        with pytest.raises(JetStreamError) as payload:
            await js.publish(subject, b"1", headers={"Nats-Incr": "+1"})
        assert (payload.value.code, payload.value.err_code) == (400, COUNTER_HAS_PAYLOAD)
        # A duplicate (same Nats-Msg-Id) is acknowledged without a value: natrio never
        # sends message ids there, and would refuse such an answer rather than guess.
        headers = {"Nats-Incr": "+1", "Nats-Msg-Id": "once"}
        assert counter_value(await js.publish(subject, b"", headers=headers), subject) == 1
        with pytest.raises(NatrioError, match="without a readable value"):
            counter_value(await js.publish(subject, b"", headers=headers), subject)


@pytest.mark.parametrize(
    ("task_type", "limit", "per", "match"),
    [
        ("a.b", 1, 1.0, "task type"),
        ("send", 0, 1.0, "limit"),
        ("send", 1, 0, "per"),
        ("send", 1, 5e-324, "too small"),
    ],
)
def test_cluster_limiter_validates(task_type: str, limit: int, per: float, match: str) -> None:
    js = JetStream(cast(natrio.Connection, None))  # never used: construction fails first
    with pytest.raises(ConfigurationError, match=match):
        ClusterLimiter(js, task_type, limit, per)
