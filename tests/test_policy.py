"""The outcome policy without a server (natrio._dispatch.policy): what a handler raised, its
retry policy and the attempt number decide a finite retry or a dead letter of some kind."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import natrio
from natrio._dispatch.policy import (
    MAX_DELAY,
    Dead,
    Decision,
    Retry,
    decide,
    finite_delay,
    leaves,
    nak_payload,
    unwrap,
)
from natrio._errors import DecodeError, Fatal, HandlerTimeout, Retryable
from natrio._model import MAX_ERROR_MESSAGE, MAX_TRACEBACK, TaskError, truncate
from natrio._retry import RetryPolicy

POLICY = RetryPolicy(
    initial_interval=1.0, backoff_coefficient=2.0, maximum_interval=60.0, maximum_attempts=5
)
INF = float("inf")
NAN = float("nan")


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a handler's failure has one."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def retry(decision: Decision) -> Retry:
    assert isinstance(decision, Retry), decision
    return decision


def dead(decision: Decision) -> Dead:
    assert isinstance(decision, Dead), decision
    return decision


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class AppError(LookupError):
    pass


# -- plain failures -----------------------------------------------------------------------


def test_a_plain_exception_is_retried_after_the_policy_delay() -> None:
    decision = retry(decide(raised(ValueError("boom")), POLICY, 1))
    assert decision.delay == 1.0
    error = decision.error
    assert (error.type, error.message, error.kind, error.attempts) == (
        "ValueError",
        "boom",
        "error",
        1,
    )
    assert "ValueError: boom" in error.traceback
    assert "in raised" in error.traceback


@pytest.mark.parametrize(("attempt", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)])
def test_the_delay_grows_with_the_attempt(attempt: int, delay: float) -> None:
    assert retry(decide(ValueError(), POLICY, attempt)).delay == delay


def test_the_delay_stops_at_the_maximum_interval() -> None:
    unlimited = RetryPolicy(maximum_attempts=0, maximum_interval=60.0)
    assert retry(decide(ValueError(), unlimited, 10**6)).delay == 60.0


@pytest.mark.parametrize("attempt", [5, 6, 100])
def test_exhausted_at_maximum_attempts(attempt: int) -> None:
    error = dead(decide(ValueError("last"), POLICY, attempt)).error
    assert (error.type, error.message, error.kind, error.attempts) == (
        "ValueError",
        "last",
        "exhausted",
        attempt,
    )


def test_a_single_attempt_policy_is_exhausted_at_once() -> None:
    assert dead(decide(ValueError(), RetryPolicy(maximum_attempts=1), 1)).error.kind == "exhausted"


def test_permanent_dead_letters_at_once() -> None:
    for exc in (ValueError("x"), Retryable("again", delay=1), HandlerTimeout("slow")):
        assert dead(decide(exc, POLICY, 1, permanent=True)).error.kind == "fatal"


def test_a_delay_given_overrides_the_policy() -> None:
    assert retry(decide(ValueError(), POLICY, 1, delay=7.5)).delay == 7.5
    assert retry(decide(Retryable(delay=2), POLICY, 1, delay=7.5)).delay == 7.5


# -- Fatal, Retryable, DecodeError, HandlerTimeout ----------------------------------------


def test_fatal_is_fatal() -> None:
    error = dead(decide(raised(Fatal("no way")), POLICY, 1)).error
    assert (error.type, error.message, error.kind, error.attempts) == (
        "Fatal",
        "no way",
        "fatal",
        1,
    )


def test_fatal_wrapping_an_exception_records_it() -> None:
    error = dead(decide(raised(Fatal(ValueError("bad input"))), POLICY, 2)).error
    assert (error.type, error.message, error.kind, error.attempts) == (
        "ValueError",
        "bad input",
        "fatal",
        2,
    )


def test_retryable_with_a_delay_uses_it() -> None:
    decision = retry(decide(Retryable("later", delay=2), POLICY, 1))
    assert decision.delay == 2.0
    assert (decision.error.type, decision.error.kind) == ("Retryable", "error")


@pytest.mark.parametrize("delay", [0, 0.0])
def test_retryable_with_no_delay_retries_at_once(delay: float) -> None:
    assert retry(decide(Retryable(delay=delay), POLICY, 3)).delay == 0.0


def test_retryable_without_a_delay_uses_the_policy() -> None:
    assert retry(decide(Retryable("later"), POLICY, 3)).delay == 4.0


def test_retryable_wrapping_an_exception_records_it() -> None:
    decision = retry(decide(Retryable(KeyError("k"), delay=3), POLICY, 1))
    assert (decision.delay, decision.error.type, decision.error.message) == (3.0, "KeyError", "'k'")


def test_retryable_still_counts_attempts() -> None:
    assert dead(decide(Retryable(delay=1), POLICY, 5)).error.kind == "exhausted"


@pytest.mark.parametrize(
    "exc",
    [DecodeError("field x: not an int"), Fatal(DecodeError("field x")), Retryable(DecodeError())],
)
def test_decode_errors_are_dead_at_once(exc: BaseException) -> None:
    error = dead(decide(exc, POLICY, 1)).error
    assert (error.type, error.kind) == ("DecodeError", "decode")


def test_a_decode_error_is_decode_even_on_the_last_attempt() -> None:
    assert dead(decide(DecodeError(), POLICY, 5)).error.kind == "decode"


def test_a_handler_timeout_is_a_retried_timeout() -> None:
    decision = retry(decide(HandlerTimeout("over 5 s"), POLICY, 2))
    assert decision.delay == 2.0
    assert (decision.error.type, decision.error.kind) == ("HandlerTimeout", "timeout")


def test_a_handler_timeout_on_the_last_attempt_is_exhausted() -> None:
    assert dead(decide(HandlerTimeout(), POLICY, 5)).error.kind == "exhausted"


# -- non_retryable ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("non_retryable", "exc"),
    [
        ((KeyError,), KeyError("k")),
        (("KeyError",), KeyError("k")),
        (("LookupError",), KeyError("k")),  # a base class
        ((LookupError,), AppError("app")),
        (("Exception",), ValueError("v")),
        (("AppError",), AppError("app")),
        (("TypeError", "ValueError"), natrio.ConfigurationError("c")),  # a ValueError
    ],
)
def test_non_retryable_names_are_fatal(
    non_retryable: tuple[type[BaseException] | str, ...], exc: BaseException
) -> None:
    policy = RetryPolicy(non_retryable=non_retryable)
    error = dead(decide(exc, policy, 1)).error
    assert (error.type, error.kind) == (type(exc).__name__, "fatal")


@pytest.mark.parametrize(
    ("non_retryable", "exc"),
    [
        (("KeyError",), LookupError("base")),  # a subclass named, the base raised
        (("AppError",), KeyError("k")),
        (("keyerror",), KeyError("k")),  # names are exact
    ],
)
def test_other_exceptions_stay_retryable(
    non_retryable: tuple[str, ...], exc: BaseException
) -> None:
    assert retry(decide(exc, RetryPolicy(non_retryable=non_retryable), 1)).error.kind == "error"


# -- exception groups ---------------------------------------------------------------------


def test_leaves_are_depth_first() -> None:
    a, b, c, d = ValueError("a"), KeyError("b"), TypeError("c"), OSError("d")
    group = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("x", [c])]), d])
    assert list(leaves(group)) == [a, b, c, d]
    assert list(leaves(a)) == [a]


def test_unwrap() -> None:
    value, fatal, retryable, decode = ValueError(), Fatal(), Retryable(), DecodeError()
    assert unwrap(value) is value
    assert unwrap(ExceptionGroup("g", [value])) is value
    assert unwrap(ExceptionGroup("g", [ExceptionGroup("h", [value])])) is value
    assert unwrap(ExceptionGroup("g", [value, retryable, decode, fatal])) is fatal
    assert unwrap(ExceptionGroup("g", [retryable, decode])) is decode
    assert unwrap(ExceptionGroup("g", [value, ExceptionGroup("h", [retryable])])) is retryable
    pair = ExceptionGroup("g", [value, KeyError()])
    assert unwrap(pair) is pair


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("g", [ValueError(), Fatal("stop")]),
        ExceptionGroup("g", [ExceptionGroup("h", [KeyError(), Fatal("stop")]), ValueError()]),
        ExceptionGroup("g", [Retryable(delay=1), Fatal("stop")]),
        ExceptionGroup("g", [DecodeError(), Fatal("stop")]),
    ],
)
def test_fatal_in_a_group_is_fatal(group: ExceptionGroup[Exception]) -> None:
    error = dead(decide(group, POLICY, 1)).error
    assert (error.type, error.message, error.kind) == ("Fatal", "stop", "fatal")


def test_fatal_wrapping_an_exception_in_a_group() -> None:
    group = ExceptionGroup("g", [ValueError(), ExceptionGroup("h", [Fatal(KeyError("k"))])])
    error = dead(decide(group, POLICY, 1)).error
    assert (error.type, error.kind) == ("KeyError", "fatal")


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("g", [Retryable(delay=2)]),
        ExceptionGroup("g", [ValueError(), Retryable(delay=2)]),
        ExceptionGroup("g", [ExceptionGroup("h", [ExceptionGroup("i", [Retryable(delay=2)])])]),
        ExceptionGroup("g", [KeyError(), ExceptionGroup("h", [OSError(), Retryable(delay=2)])]),
    ],
)
def test_retryable_in_a_group_sets_the_delay(group: ExceptionGroup[Exception]) -> None:
    decision = retry(decide(group, POLICY, 1))
    assert decision.delay == 2.0
    assert decision.error.type == "Retryable"


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("g", [DecodeError("field")]),
        ExceptionGroup("g", [ValueError(), DecodeError("field")]),
        ExceptionGroup("g", [Retryable(delay=2), ExceptionGroup("h", [DecodeError("field")])]),
    ],
)
def test_a_decode_error_in_a_group_is_decode(group: ExceptionGroup[Exception]) -> None:
    error = dead(decide(group, POLICY, 1)).error
    assert (error.type, error.message, error.kind) == ("DecodeError", "field", "decode")


def test_a_timeout_alone_in_a_group_is_a_timeout() -> None:
    error = retry(decide(ExceptionGroup("g", [HandlerTimeout()]), POLICY, 1)).error
    assert (error.type, error.kind) == ("HandlerTimeout", "timeout")


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("g", [ValueError("only")]),
        ExceptionGroup("g", [ExceptionGroup("h", [ValueError("only")])]),
    ],
)
def test_a_group_of_one_records_that_one(group: ExceptionGroup[Exception]) -> None:
    decision = retry(decide(group, POLICY, 1))
    assert (decision.error.type, decision.error.message, decision.error.kind) == (
        "ValueError",
        "only",
        "error",
    )
    assert decision.delay == 1.0


def test_a_group_of_different_errors_stays_a_group_and_retries() -> None:
    group = raised(ExceptionGroup("two failed", [ValueError("v"), KeyError("k")]))
    decision = retry(decide(group, POLICY, 2))
    assert decision.delay == 2.0
    assert (decision.error.type, decision.error.kind) == ("ExceptionGroup", "error")
    assert "two failed" in decision.error.message
    assert "ValueError: v" in decision.error.traceback
    assert "KeyError: 'k'" in decision.error.traceback


def test_a_group_exhausts_like_anything_else() -> None:
    group = ExceptionGroup("g", [ValueError(), KeyError()])
    assert dead(decide(group, POLICY, 5)).error.kind == "exhausted"


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("g", [ValueError(), KeyError()]),
        ExceptionGroup("g", [ValueError(), ExceptionGroup("h", [OSError(), KeyError()])]),
        ExceptionGroup("g", [ExceptionGroup("h", [AppError()]), ValueError()]),
    ],
)
def test_any_non_retryable_leaf_makes_a_group_fatal(group: ExceptionGroup[Exception]) -> None:
    # The member the policy refuses is what the dead letter records.
    policy = RetryPolicy(non_retryable=("LookupError",))
    error = dead(decide(group, policy, 1)).error
    assert error.kind == "fatal"
    assert error.type in ("KeyError", "AppError")


def test_a_non_retryable_member_decides_before_a_retryable_beside_it() -> None:
    group = ExceptionGroup("g", [Retryable("soon", delay=2), ValueError("no")])
    error = dead(decide(group, RetryPolicy(non_retryable=("ValueError",)), 1)).error
    assert (error.type, error.kind, error.message) == ("ValueError", "fatal", "no")


# -- finite delays ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fallback", "expected"),
    [
        (NAN, 1.0, 1.0),
        (NAN, 3.0, 3.0),
        (NAN, INF, MAX_DELAY),
        (NAN, -2.0, 0.0),
        (INF, 1.0, MAX_DELAY),
        (-INF, 1.0, 0.0),
        (-5.0, 1.0, 0.0),
        (-0.0, 1.0, 0.0),
        (1e300, 1.0, MAX_DELAY),
        (MAX_DELAY, 1.0, MAX_DELAY),
        (MAX_DELAY + 1, 1.0, MAX_DELAY),
        (2.5, 1.0, 2.5),
        (0.0, 1.0, 0.0),
        (3, 1.0, 3.0),
    ],
)
def test_finite_delay(value: float, fallback: float, expected: float) -> None:
    assert finite_delay(value, fallback) == expected


def test_finite_delay_with_a_nan_fallback_is_finite() -> None:
    assert 0 <= finite_delay(NAN, NAN) <= MAX_DELAY


@pytest.mark.parametrize(("delay", "expected"), [(NAN, 1.0), (INF, MAX_DELAY), (-1.0, 0.0)])
def test_decide_clamps_a_delay_given(delay: float, expected: float) -> None:
    assert retry(decide(ValueError(), POLICY, 1, delay=delay)).delay == expected


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(initial_interval=1e300, maximum_interval=1e308, maximum_attempts=0),
        RetryPolicy(initial_interval=1e308, maximum_interval=1e308, jitter=1.0, maximum_attempts=0),
        RetryPolicy(
            initial_interval=1.0,
            backoff_coefficient=1e300,
            maximum_interval=1.7e308,
            maximum_attempts=0,
        ),
    ],
)
def test_decide_clamps_huge_policy_delays(policy: RetryPolicy) -> None:
    for attempt in (1, 2, 3, 10**6):
        assert 0 <= retry(decide(ValueError(), policy, attempt)).delay <= MAX_DELAY


@settings(max_examples=300, deadline=None)
@given(
    st.floats(),
    st.floats(min_value=0, max_value=1e308),
    st.floats(min_value=1, max_value=1e308),
    st.floats(min_value=0, max_value=1),
    st.integers(1, 1000),
)
def test_every_retry_delay_is_finite(
    delay: float, initial: float, coefficient: float, jitter: float, attempt: int
) -> None:
    policy = RetryPolicy(
        initial_interval=initial,
        backoff_coefficient=coefficient,
        maximum_interval=1e308,
        jitter=jitter,
        maximum_attempts=0,
    )
    for given_delay in (delay, None):
        decision = retry(decide(ValueError(), policy, attempt, delay=given_delay))
        assert 0 <= decision.delay <= MAX_DELAY
    payload = nak_payload(decision.delay)
    assert payload == b"-NAK" or payload.startswith(b"-NAK {")


# -- NAK payloads -------------------------------------------------------------------------


def nak_delay(payload: bytes) -> int:
    assert payload.startswith(b"-NAK ")
    value = json.loads(payload[5:])["delay"]
    assert isinstance(value, int)
    return value


@pytest.mark.parametrize("delay", [0, 0.0, -0.0, -1.0, -INF])
def test_a_nak_at_once(delay: float) -> None:
    assert nak_payload(delay) == b"-NAK"


@pytest.mark.parametrize(
    ("delay", "nanoseconds"),
    [
        (1.0, 1_000_000_000),
        (2.5, 2_500_000_000),
        (1e-12, 1),  # a delay is never rounded down to "at once"
        (INF, int(MAX_DELAY) * 1_000_000_000),
        (1e300, int(MAX_DELAY) * 1_000_000_000),
        (NAN, 1_000_000_000),
    ],
)
def test_a_nak_with_a_delay(delay: float, nanoseconds: int) -> None:
    assert nak_delay(nak_payload(delay)) == nanoseconds


@given(st.floats())
def test_every_nak_payload_is_finite_json(delay: float) -> None:
    payload = nak_payload(delay)
    if payload != b"-NAK":
        assert 0 < nak_delay(payload) <= MAX_DELAY * 1_000_000_000
        assert b"NaN" not in payload
        assert b"Infinity" not in payload


# -- invalid delays and policies fail at construction -------------------------------------


@pytest.mark.parametrize("delay", [INF, NAN, -INF, -1, -0.001, "2"])
def test_retryable_refuses_a_bad_delay(delay: object) -> None:
    with pytest.raises(natrio.ConfigurationError, match="Retryable delay"):
        natrio.Retryable("x", delay=delay)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"maximum_interval": INF},
        {"maximum_interval": NAN},
        {"initial_interval": NAN},
        {"initial_interval": INF},
        {"initial_interval": -1.0},
        {"backoff_coefficient": INF},
        {"backoff_coefficient": NAN},
        {"backoff_coefficient": 0.5},
        {"jitter": NAN},
        {"jitter": 1.5},
        {"maximum_attempts": -1},
        {"maximum_attempts": 2.0},
        {"non_retryable": [3]},
    ],
)
def test_retry_policy_refuses_non_finite_options(options: dict[str, object]) -> None:
    with pytest.raises(natrio.ConfigurationError, match="RetryPolicy"):
        natrio.RetryPolicy(**options)  # type: ignore[arg-type]


# -- TaskError bounds ---------------------------------------------------------------------


def test_a_huge_message_is_truncated() -> None:
    exc = raised(ValueError("<" + "x" * 1_000_000 + ">"))
    error = retry(decide(exc, POLICY, 1)).error
    assert len(error.message) <= MAX_ERROR_MESSAGE
    assert error.message.startswith("<xxx")
    assert error.message.endswith("xxx>")
    assert "characters cut" in error.message
    assert len(error.traceback) <= MAX_TRACEBACK
    assert error.traceback.startswith("Traceback")


def test_a_huge_exception_type_name_is_truncated() -> None:
    huge = type("E" * 1000, (Exception,), {})
    assert len(retry(decide(huge(), POLICY, 1)).error.type) <= 200


def test_a_huge_fatal_is_truncated() -> None:
    error = dead(decide(Fatal(ValueError("y" * 1_000_000)), POLICY, 1)).error
    assert len(error.message) <= MAX_ERROR_MESSAGE
    assert len(error.traceback) <= MAX_TRACEBACK


def test_an_exception_whose_str_fails_still_gives_an_error() -> None:
    error = retry(decide(raised(BadStr()), POLICY, 1)).error
    assert isinstance(error, TaskError)
    assert (error.type, error.message, error.kind) == (
        "BadStr",
        "<str() failed: RuntimeError>",
        "error",
    )
    assert "BadStr" in error.traceback


def test_an_exception_whose_str_fails_inside_a_group() -> None:
    group = raised(ExceptionGroup("g", [BadStr(), ValueError("v")]))
    error = retry(decide(group, POLICY, 1)).error
    assert error.type == "ExceptionGroup"
    assert "BadStr" in error.traceback


def test_a_fatal_wrapping_an_exception_whose_str_fails() -> None:
    error = dead(decide(Fatal(BadStr()), POLICY, 1)).error
    assert (error.type, error.message) == ("BadStr", "<str() failed: RuntimeError>")


def test_a_huge_traceback_is_truncated() -> None:
    # Chained exceptions each print their own (here 8000-character) message.
    outer = raised(RuntimeError("outer"))
    outer.__context__ = ValueError("v" * 8000)
    outer.__context__.__cause__ = OSError("o" * 8000)
    outer.__context__.__cause__.__cause__ = KeyError("k" * 8000)
    error = TaskError.from_exception(outer, kind="error", attempts=1)
    assert len(error.traceback) <= MAX_TRACEBACK
    assert "characters cut" in error.traceback
    assert error.traceback.startswith("KeyError: 'kkk")
    assert error.traceback.rstrip().endswith("RuntimeError: outer")


@pytest.mark.parametrize("limit", [64, 200, MAX_ERROR_MESSAGE])
def test_truncate_keeps_head_and_tail(limit: int) -> None:
    text = "H" * 10_000 + "T" * 10_000
    cut = truncate(text, limit)
    assert len(cut) == limit
    assert cut.startswith("H")
    assert cut.endswith("T")
    assert truncate("short", limit) == "short"
    assert truncate("x" * limit, limit) == "x" * limit


@given(st.text(max_size=2000), st.integers(64, 3000))
def test_truncate_never_exceeds_the_limit(text: str, limit: int) -> None:
    cut = truncate(text, limit)
    assert len(cut) <= limit
    assert cut == text or len(text) > limit


def test_truncate_to_a_tiny_limit() -> None:
    assert len(truncate("x" * 100, 10)) <= 10


def test_finite_delay_is_a_float() -> None:
    assert isinstance(finite_delay(3), float)
    assert not math.isnan(finite_delay(NAN))
