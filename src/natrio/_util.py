"""Small Trio helpers shared by natrio's modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def unwrapped(exc: BaseException) -> BaseException:
    """``exc`` without the ExceptionGroups of exactly one exception around it: the lone
    failure they wrap, or the first group in them that holds several (``exc`` itself when
    it is no such group)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a nursery's ExceptionGroup of exactly one exception as that exception.

    Trio nurseries wrap even a single failure; natrio's callers get the failure itself.
    A group of several failures (however deeply wrapped) is re-raised as it came.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner = unwrapped(group)
        if isinstance(inner, BaseExceptionGroup):
            raise
        raise inner from None
