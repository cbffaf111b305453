"""Rate limits: at most ``limit`` task starts per ``per`` seconds, for one worker or a cluster.

:class:`RateLimit` is the configuration. :class:`WorkerLimiter` enforces a worker-scope
limit in memory (an exact sliding-window log, no I/O); :class:`ClusterLimiter` enforces a
cluster-scope limit with JetStream message counters (nats-server 2.12+), one counter per
task type, key and window, in the stream :data:`COUNTER_STREAM`::

    natrio.counter.rate.<task_type>.<key token>.<window>

The key token is ``_`` for the empty key, else 16 hex digits of the key's BLAKE2b hash
(keys come from user code and may hold anything, a subject token may not); the window is
``floor(unix_time / per)``. A stream with counters on accepts nothing but ``Nats-Incr``
publishes without payload, so natrio publishes nothing else there.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs

from .. import _wire as wire
from .._errors import ConfigurationError, NatrioError
from .._jetstream import JetStream
from .._model import Task
from .._transport.protocol import check_subject

#: The stream holding cluster-scope rate-limit counters (and, later, other counters).
COUNTER_STREAM: Final = wire.COUNTER_STREAM
#: The subjects of :data:`COUNTER_STREAM`.
COUNTER_SUBJECTS: Final = f"{wire.PREFIX}.counter.>"
#: The header that makes a publish into a counter stream an increment.
H_INCR: Final = "Nats-Incr"

#: Bounds of :class:`RateLimit` ``limit`` and ``per`` (seconds).
MAX_LIMIT: Final = 1_000_000
MAX_PER: Final = 86400

_NS: Final = 1_000_000_000
#: The longest ``per`` of a cluster-scope limit: each window leaves a counter behind
#: until the stream's max age removes it (a counter stream cannot expire messages one by
#: one), so short windows over a long age would pile up counters.
MAX_CLUSTER_PER: Final = 3600
# A counter must outlive its window (at most MAX_CLUSTER_PER) and the stragglers that
# still increment it late; twice that covers both.
COUNTER_MAX_AGE: Final = 2 * MAX_CLUSTER_PER * _NS

# A refused cluster start comes back at the next window plus up to this much, so that
# the deferred starts of many workers do not all hit the counter in the same instant.
_JITTER_FRACTION: Final = 0.05
_JITTER_MAX: Final = 0.25
# A refusal never says "retry now": the caller would spin on the counter.
_MIN_WAIT: Final = 1e-3
# The Unix time 2100-01-01: window indices up to then must be finite numbers.
_FAR_FUTURE: Final = 4_102_444_800.0

_INCREMENT: Final[Mapping[str, str]] = {H_INCR: "+1"}
# Counter values are arbitrary-precision integers, sent as decimal strings.
_COUNTER_VALUE = re.compile(r"[+-]?[0-9]{1,100}")

Scope = Literal["worker", "cluster"]
_SCOPES: Final = ("worker", "cluster")


def _check_limit(owner: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ConfigurationError(
            f"{owner}: limit must be an int from 1 to {MAX_LIMIT:_}, got {value!r}"
        )
    return value


def _check_per(owner: str, value: object) -> float:
    # NaN fails both comparisons, infinity and huge ints the upper bound.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_PER:
        raise ConfigurationError(
            f"{owner}: per must be a finite number of seconds > 0 and <= {MAX_PER}, got {value!r}"
        )
    return float(value)


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    # An instance whose __call__ is async is as unusable as an async function.
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the method, not callability
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


@attrs.frozen
class RateLimit:
    """At most ``limit`` executions start per ``per`` seconds; per key when ``key`` is given.

    ``limit`` is an int from 1 to 1,000,000; ``per`` a number of seconds, > 0 and at
    most 86400 (3600 for the cluster scope). ``key``, if given, is a synchronous function of the :class:`Task` that
    returns a str: the limit then holds for each key separately (``None``: one limit for
    all tasks). ``scope`` says whose starts are counted:

    - ``"worker"``: this worker's starts, in any sliding window of ``per`` seconds (so
      never more than ``limit`` in any ``per`` seconds, on each worker; ``n`` workers
      together may start ``n * limit``).
    - ``"cluster"``: every worker's starts, counted on the server in windows of ``per``
      seconds aligned to the Unix epoch (``floor(time / per)``). Windows are fixed, not
      sliding: up to ``limit`` may start at the end of one window and ``limit`` more at
      the start of the next, so up to ``2 * limit`` may start within ``per`` seconds
      across a window boundary. Workers place a start by their own clock, so clock skew
      between hosts shifts the boundaries by as much. A start refused for a window is
      still counted in it (the counter is incremented either way), which never lets
      more than ``limit`` through.
    """

    limit: int = attrs.field()
    per: float = attrs.field()
    key: Callable[[Task], str] | None = attrs.field(default=None)
    scope: Scope = attrs.field(default="worker")

    @limit.validator
    def _validate_limit(self, _attribute: object, value: object) -> None:
        _check_limit("RateLimit", value)

    @per.validator
    def _validate_per(self, _attribute: object, value: object) -> None:
        _check_per("RateLimit", value)

    @key.validator
    def _validate_key(self, _attribute: object, value: object) -> None:
        if value is None:
            return
        if not callable(value):
            raise ConfigurationError(
                f"RateLimit: key must be None or a function of the task returning a str, "
                f"got {value!r}"
            )
        if _is_async(value):
            raise ConfigurationError(
                f"RateLimit: key must be a synchronous function (it runs before every "
                f"start), got the async {value!r}"
            )

    @scope.validator
    def _validate_scope(self, _attribute: object, value: object) -> None:
        if value not in _SCOPES:
            raise ConfigurationError(
                f"RateLimit: scope must be 'worker' or 'cluster', got {value!r}"
            )

    def __attrs_post_init__(self) -> None:
        if self.scope == "cluster" and self.per > MAX_CLUSTER_PER:
            raise ConfigurationError(
                f"RateLimit: a cluster-scope per is at most {MAX_CLUSTER_PER} s, got {self.per!r}"
            )

    def key_of(self, task: Task) -> str:
        """The key ``task`` is counted under: ``""`` without a ``key`` function.

        What the key function raises propagates; a result that is not a str raises
        TypeError.
        """
        if self.key is None:
            return ""
        result: object = self.key(task)
        if not isinstance(result, str):
            if inspect.iscoroutine(result):
                result.close()  # else Python warns it was never awaited
            raise TypeError(
                f"RateLimit key function {self.key!r} must return a str, "
                f"got {type(result).__name__}"
            )
        return result


class WorkerLimiter:
    """A worker-scope limit: at most ``limit`` starts per key in any ``per`` seconds.

    Pure bookkeeping, no I/O and no clock of its own: an exact log of each key's admitted
    starts within the last ``per`` seconds. Keys whose starts have all expired are
    dropped, so memory is bounded by the starts of the last ``per`` seconds (at most
    ``limit`` per key), however many keys come and go.
    """

    def __init__(self, limit: int, per: float) -> None:
        self.limit = _check_limit("WorkerLimiter", limit)
        self.per = _check_per("WorkerLimiter", per)
        # Each key's admitted starts, oldest first. Keys are in the order of their latest
        # start, so the first key is always the one whose whole log expires first: the
        # sweep stops at the first key still live, and drops each key at most once per
        # time it was added, O(1) amortised per call.
        self._logs: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many keys have a start within the last ``per`` seconds (or had, at the
        last call)."""
        return len(self._logs)

    def acquire(self, key: str, now: float) -> float:
        """Admit a start for ``key`` at ``now``: 0.0 when admitted (and the start is
        recorded), else the seconds until one could be (> 0; nothing is recorded).

        ``now`` is a monotonic clock reading (``trio.current_time()``, for instance)
        that never decreases from one call to the next.
        """
        per = self.per
        logs = self._logs
        while logs:
            first = next(iter(logs))
            if logs[first][-1] + per > now:
                break
            del logs[first]
        log = logs.get(key)
        if log is None:
            logs[key] = deque((now,))
            return 0.0
        # The same expression decides expiry and the wait, so a refusal's wait is > 0.
        while log[0] + per <= now:
            log.popleft()
        if len(log) >= self.limit:
            return log[0] + per - now
        log.append(now)
        logs.move_to_end(key)
        return 0.0


def rate_counter_subject(task_type: str, key: str, window: int) -> str:
    """The counter subject of one task type's rate limit for ``key`` in ``window``.

    Any str is a valid key (it is hashed, never put in the subject); a key that is not
    valid UTF-8 (lone surrogates) is hashed as its surrogate code points.
    """
    wire.check_name("task type", task_type)
    if key == "":
        token = "_"
    else:
        data = key.encode("utf-8", "surrogatepass")
        token = hashlib.blake2b(data, digest_size=8).hexdigest()
    subject = f"{wire.PREFIX}.counter.rate.{task_type}.{token}.{window}"
    check_subject(subject, kind="counter subject", wildcards=False)
    return subject


def counter_value(ack: Mapping[str, Any], subject: str) -> int:
    """The counter's new total from the PubAck of an increment; NatrioError if it has none.

    nats-server sends it as a decimal string in ``val``. A PubAck without it comes from a
    stream without counters (a server older than 2.12, or another stream on the
    subject), or is a duplicate's (which carries no value).
    """
    val = ack.get("val")
    if isinstance(val, str) and _COUNTER_VALUE.fullmatch(val):
        return int(val)
    if isinstance(val, int) and not isinstance(val, bool):
        return val
    raise NatrioError(
        f"the increment of counter {subject} was acknowledged without a readable value "
        f"({str(ack)[:200]}): is {COUNTER_STREAM} a counter stream (nats-server 2.12+)?"
    )


class ClusterLimiter:
    """A cluster-scope limit for one task type: at most ``limit`` starts per key in each
    window of ``per`` seconds aligned to the Unix epoch, counted by JetStream.

    Every acquire increments the window's counter in :data:`COUNTER_STREAM` (which must
    exist: :func:`counter_stream_config`); the server orders the increments, so exactly
    the first ``limit`` of a window are admitted, whichever workers send them. A failed
    publish (RequestTimeout, for one) propagates, and may still have been counted: that
    errs on the side of fewer starts.
    """

    def __init__(self, js: JetStream, task_type: str, limit: int, per: float) -> None:
        self.js = js
        self.task_type = wire.check_name("task type", task_type)
        self.limit = _check_limit("ClusterLimiter", limit)
        self.per = _check_per("ClusterLimiter", per)
        if not math.isfinite(_FAR_FUTURE / self.per):
            raise ConfigurationError(f"ClusterLimiter: per {per!r} is too small for windows")
        self.jitter = min(_JITTER_FRACTION * self.per, _JITTER_MAX)

    async def acquire(self, key: str, now: float) -> float:
        """Count a start for ``key`` at Unix time ``now`` (``time.time()``): 0.0 when
        admitted, else the seconds until the next window starts plus a random jitter of
        up to ``min(5% of per, 0.25 s)``.
        """
        window = math.floor(now / self.per)
        subject = rate_counter_subject(self.task_type, key, window)
        ack = await self.js.publish(subject, b"", headers=_INCREMENT)
        if counter_value(ack, subject) <= self.limit:
            return 0.0
        wait = (window + 1) * self.per - now
        return max(wait + random.uniform(0.0, self.jitter), _MIN_WAIT)


def counter_stream_config(*, replicas: int, storage: str) -> dict[str, Any]:
    """The stream of natrio's counters, :data:`COUNTER_STREAM` on ``natrio.counter.>``.

    Message counters (``allow_msg_counter``, nats-server 2.12+): each publish carries a
    ``Nats-Incr`` header and no payload, and the PubAck returns the subject's new total.
    Every counter message holds its running total, so one message per subject is all a
    counter keeps. A counter lives two hours after its last increment (counter streams
    cannot use per-message TTLs), longer than any rate-limit window.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise ConfigurationError(f"counter stream: replicas must be 1-5, got {replicas!r}")
    if storage not in ("file", "memory"):
        raise ConfigurationError(
            f"counter stream: storage must be 'file' or 'memory', got {storage!r}"
        )
    return {
        "name": COUNTER_STREAM,
        "subjects": [COUNTER_SUBJECTS],
        "retention": "limits",
        "allow_msg_counter": True,
        "max_msgs_per_subject": 1,
        "max_age": COUNTER_MAX_AGE,
        "discard": "old",
        "storage": storage,
        "num_replicas": replicas,
    }
