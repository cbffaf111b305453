"""Retry policy: how long to wait before the next attempt, and when to stop trying."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from typing import Any

import attrs

from ._errors import ConfigurationError, Fatal


def _number(value: object) -> float:
    """``value`` as a float, NaN for what is no number or too large for one (an int like
    10**400 from a task's JSON would overflow when a delay is computed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= _number(value) < math.inf:
        raise ConfigurationError(
            f"RetryPolicy.{attribute.name} must be a finite number >= 0, got {value!r}"
        )


def _exception_names(value: Iterable[type[BaseException] | str]) -> tuple[str, ...]:
    names: list[str] = []
    for item in value:
        if isinstance(item, str) and item:
            names.append(item)
        elif isinstance(item, type) and issubclass(item, BaseException):
            names.append(item.__name__)
        else:
            raise ConfigurationError(
                f"RetryPolicy.non_retryable takes exception types or names, got {item!r}"
            )
    return tuple(names)


@attrs.frozen
class RetryPolicy:
    """When and how often a failed task is tried again.

    The delay before attempt ``n + 1`` is ``initial_interval * backoff_coefficient **
    (n - 1)``, capped at ``maximum_interval``, then spread by ``jitter`` (a fraction:
    0.1 means up to 10 % either way). After ``maximum_attempts`` attempts (0 means no
    limit) the task is dead-lettered. Exceptions whose type, or any base class, is named
    in ``non_retryable`` fail at once. Policies travel with tasks by name, so types are
    stored as their ``__name__``.

    Precedence: a policy sent with the task overrides the handler's, which overrides the
    worker's. The default is 5 attempts, 1 s doubling up to 60 s.
    """

    initial_interval: float = attrs.field(default=1.0, validator=_non_negative)
    backoff_coefficient: float = attrs.field(default=2.0)
    maximum_interval: float = attrs.field(default=60.0, validator=_non_negative)
    maximum_attempts: int = attrs.field(default=5)
    non_retryable: tuple[str, ...] = attrs.field(default=(), converter=_exception_names)
    jitter: float = attrs.field(default=0.0)

    @backoff_coefficient.validator
    def _check_coefficient(self, _attribute: object, value: float) -> None:
        if not 1 <= _number(value) < math.inf:
            raise ConfigurationError(
                f"RetryPolicy.backoff_coefficient must be finite and >= 1, got {value!r}"
            )

    @maximum_attempts.validator
    def _check_attempts(self, _attribute: object, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigurationError(
                f"RetryPolicy.maximum_attempts must be an int >= 0 (0 = unlimited), got {value!r}"
            )

    @jitter.validator
    def _check_jitter(self, _attribute: object, value: float) -> None:
        if not 0.0 <= _number(value) <= 1.0:
            raise ConfigurationError(f"RetryPolicy.jitter must be within [0, 1], got {value!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        # Grow step by step and stop at the cap: a large attempt number must not overflow.
        base = self.initial_interval
        for _ in range(max(attempt - 1, 0)):
            if base >= self.maximum_interval or base == 0 or self.backoff_coefficient == 1.0:
                break
            base *= self.backoff_coefficient
        base = min(base, self.maximum_interval)
        if self.jitter:
            base *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)

    def exhausted(self, attempt: int) -> bool:
        """Whether attempt number ``attempt`` was the last one allowed."""
        return self.maximum_attempts > 0 and attempt >= self.maximum_attempts

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried under this policy."""
        if isinstance(exc, Fatal):
            return False
        if not self.non_retryable:
            return True
        names = {cls.__name__ for cls in type(exc).__mro__}
        return not names.intersection(self.non_retryable)

    def to_json(self) -> str:
        """The policy as sent with a task."""
        return json.dumps(
            attrs.asdict(self, recurse=False) | {"non_retryable": list(self.non_retryable)}
        )

    @classmethod
    def from_json(cls, text: str) -> RetryPolicy:
        """Read a policy sent with a task; raises ConfigurationError if it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return cls(**data)
        except ConfigurationError:
            raise
        except (ValueError, TypeError, RecursionError) as exc:
            raise ConfigurationError(f"malformed retry policy {text[:200]!r}: {exc!r}") from None
