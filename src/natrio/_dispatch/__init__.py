"""Dispatch, the way a delivery goes through a worker: :mod:`.edge` (a wire message to a
valid task, pure), :mod:`.pool` (the runners), :mod:`.delivery` (one settlement, one
release, pure), :mod:`.execution` (the handler under its scope), :mod:`.policy` (what a
failure means, pure) and :mod:`.recording` (the outcome, then the settlement)."""

from .execution import Handler, Route
from .pool import Dispatcher, DispatcherStatistics
from .recording import StepHooks

__all__ = ["Dispatcher", "DispatcherStatistics", "Handler", "Route", "StepHooks"]
