"""The outcome policy, free of I/O: from what a handler raised, its retry policy and the attempt
number to a decision — retry after a finite delay, or dead-letter with a kind.

Exceptions raised inside a nursery reach the policy as exception groups; it looks inside
them, so ``Fatal`` or ``Retryable(delay=...)`` raised in a child task mean what they say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import attrs

from .._errors import DecodeError, Fatal, HandlerTimeout, Retryable
from .._model import TaskError
from .._retry import RetryPolicy

#: The longest retry or pause delay natrio sends: a week. Longer (or infinite) delays are
#: cut to it, so the NAK's nanoseconds stay a number the server reads.
MAX_DELAY = 7 * 86400.0


def finite_delay(value: float, fallback: float = 1.0) -> float:
    """``value`` as a delay the server can take: NaN becomes ``fallback``, the rest is
    clamped to ``[0, MAX_DELAY]``."""
    if value != value:  # NaN
        value = fallback if fallback == fallback else 0.0
    return min(max(float(value), 0.0), MAX_DELAY)


@attrs.frozen
class Retry:
    """Fail this attempt and deliver the task again after ``delay`` seconds."""

    delay: float
    error: TaskError


@attrs.frozen
class Dead:
    """Dead-letter the task: no more attempts."""

    error: TaskError


Decision = Retry | Dead


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``: itself, or every non-group member of a group, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def unwrap(exc: BaseException) -> BaseException:
    """The exception the policy judges: ``exc``, or for a group the member that decides.

    A ``Fatal`` anywhere in the group wins, then a ``DecodeError``, then a ``Retryable``;
    a group of one exception is that exception; any other group stays a group.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    found = list(leaves(exc))
    for kind in (Fatal, DecodeError, Retryable):
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    return found[0] if len(found) == 1 else exc


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, Fatal | Retryable) and isinstance(exc.reason, BaseException):
        return exc.reason
    return exc


def decide(
    exc: BaseException,
    policy: RetryPolicy,
    attempt: int,
    *,
    permanent: bool = False,
    delay: float | None = None,
) -> Decision:
    """What to do after attempt number ``attempt`` failed with ``exc``.

    ``permanent`` (``ctx.fail_permanent``) dead-letters at once; ``delay``
    (``ctx.fail_retry_after``) overrides the policy's delay. The kinds are those of
    :class:`natrio.TaskError`.
    """
    judged = unwrap(exc)
    if not isinstance(judged, Fatal | DecodeError):
        # A member the policy will not retry decides before a Retryable beside it.
        refused = [leaf for leaf in leaves(exc) if not policy.retryable(leaf)]
        if refused:
            judged = refused[0]
    cause = _cause(judged)
    if isinstance(cause, DecodeError):
        kind = "decode"
    elif permanent or not all(policy.retryable(leaf) for leaf in leaves(judged)):
        kind = "fatal"
    elif policy.exhausted(attempt):
        kind = "exhausted"
    else:
        kind = "timeout" if isinstance(cause, HandlerTimeout) else "error"
    error = TaskError.from_exception(judged, kind=kind, attempts=attempt)
    if kind not in ("error", "timeout"):
        return Dead(error)
    fallback = policy.delay(attempt)
    if delay is None and isinstance(judged, Retryable) and judged.delay is not None:
        delay = judged.delay
    return Retry(finite_delay(fallback if delay is None else delay, fallback), error)


def nak_payload(delay: float) -> bytes:
    """The ``-NAK`` that redelivers after ``delay`` seconds (at once for 0)."""
    delay = finite_delay(delay)
    if delay <= 0:
        return b"-NAK"
    return b'-NAK {"delay": %d}' % math.ceil(delay * 1_000_000_000)
