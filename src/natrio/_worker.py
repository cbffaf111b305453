"""The worker: handler registration, options, the nursery that holds consumers, dispatcher and
directory heartbeat, and bounded shutdown."""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import secrets
import signal
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar, overload

import attrs
import trio

from . import _wire as wire
from ._codec import decode
from ._consumer import PullConsumer
from ._context import TaskContext
from ._directory import Registration
from ._dispatch import Dispatcher, DispatcherStatistics, Handler, Route, StepHooks
from ._errors import ConfigurationError, ConnectionClosed, DecodeError, Fatal, NatrioError
from ._jetstream import JetStream
from ._model import WorkerInfo
from ._outcomes import Reporter, now_iso
from ._retry import RetryPolicy
from ._transport import Connection
from ._util import single_error
from ._version import __version__
from .middleware import Middleware

log = logging.getLogger("natrio.worker")


H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def _positive(name: str) -> Callable[[Any, Any, float], None]:
    def check(_inst: Any, _attr: Any, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")

    return check


def _check_async(task_type: str, fn: object) -> None:
    if not callable(fn):
        raise ConfigurationError(f"handler for {task_type!r} is not callable: {fn!r}")
    call = getattr(fn, "__call__", None)  # noqa: B004 - an async __call__ counts too
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)):
        raise ConfigurationError(f"handler for {task_type!r} must be an async function, got {fn!r}")


@attrs.define
class WorkerStatistics:
    """A snapshot of a worker: its dispatcher's counters and each consumer's window."""

    worker_id: str
    running: bool
    dispatcher: DispatcherStatistics
    consumers: dict[str, dict[str, int]]


class Worker:
    """Takes tasks off JetStream and runs their handlers, ``concurrency`` at a time.

    Register handlers with :meth:`handle` or :meth:`handle_typed`, then run it in a
    nursery with ``await nursery.start(worker.run)`` (it returns once its consumers pull
    and it is registered in the directory), or with :func:`open_worker` or
    :func:`run_worker`. Options:

    - ``concurrency``: handlers running at once across all task types (>= 1).
    - ``groups``: the worker groups served; every task lives in exactly one group,
      ``"default"`` unless submitted with another. A worker serves ``("default",)``
      unless told otherwise, so grouped and ungrouped workers run side by side.
    - ``retry``: the default RetryPolicy (a handler's or a task's own policy wins).
    - ``ack_wait``: default seconds before the server redelivers an unacknowledged task;
      running tasks are kept alive with ``+WPI`` every ack_wait/3.
    - ``shutdown_grace``: seconds running handlers get when the worker stops.
    - ``prefetch``: messages each consumer may hold (queued or running); default
      ``concurrency``.
    - ``name``: the stable worker name; default from its task types and groups.
    - ``middleware``: wrappers around every handler call, first outermost (see
      :mod:`natrio.middleware`); add more with :meth:`use`.
    - ``hooks``: an object with async ``on_step_done(task, output)`` and
      ``on_step_failed(task, error)``, called once per terminal outcome; each call gets
      ``hook_timeout`` seconds (default 10), after which it counts as failed.
    - ``started_event_after``: seconds a handler runs before the worker publishes its
      ``started`` event (default 1; 0: as every handler starts; None: never). Every event
      of an execution carries the time it began (``Natrio-Started``), so a task that ends
      sooner needs no started event in its history.
    - ``freeze_gc``: when the worker starts, collect once and move every object that
      exists by then into the cycle collector's permanent generation (:func:`gc.freeze`),
      so that its full collections only walk what was made since; unfrozen when the
      worker stops (default True; see docs/performance.md).

    Invalid options raise ConfigurationError here, invalid registrations in
    :meth:`handle`.
    """

    def __init__(
        self,
        nc: Connection,
        *,
        concurrency: int = 16,
        groups: Iterable[str] | None = None,
        retry: RetryPolicy | None = None,
        ack_wait: float = 30.0,
        shutdown_grace: float = 30.0,
        prefetch: int | None = None,
        name: str | None = None,
        logger: logging.Logger | None = None,
        middleware: Iterable[Middleware] = (),
        hooks: StepHooks | None = None,
        hook_timeout: float = 10.0,
        started_event_after: float | None = 1.0,
        freeze_gc: bool = True,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if prefetch is not None and (
            isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1
        ):
            raise ConfigurationError(f"prefetch must be an int >= 1, got {prefetch!r}")
        group_list = [wire.DEFAULT_GROUP] if groups is None else list(groups)
        if isinstance(groups, str):
            raise ConfigurationError("groups must be a list of names, not a string")
        if not group_list:
            raise ConfigurationError("groups must name at least one group")
        for group in group_list:
            wire.check_name("group", group)
        if len(set(group_list)) != len(group_list):
            raise ConfigurationError(f"groups has duplicates: {group_list!r}")
        _positive("ack_wait")(None, None, ack_wait)
        if (
            isinstance(shutdown_grace, bool)
            or not isinstance(shutdown_grace, int | float)
            or shutdown_grace < 0
        ):
            raise ConfigurationError(f"shutdown_grace must be >= 0, got {shutdown_grace!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if name is not None:
            wire.check_name("worker name", name)
        self.nc = nc
        self.concurrency = concurrency
        self.groups: tuple[str, ...] = tuple(group_list)
        self.retry = retry or RetryPolicy()
        self.ack_wait = float(ack_wait)
        self.shutdown_grace = float(shutdown_grace)
        self.prefetch = prefetch or concurrency
        self.logger = logger or logging.getLogger("natrio.task")
        self._name = name
        self._running = False
        self._middleware: list[Middleware] = []
        for item in middleware:
            self.use(item)
        for method in ("on_step_done", "on_step_failed"):
            if hooks is not None and not inspect.iscoroutinefunction(getattr(hooks, method, None)):
                raise ConfigurationError(f"hooks must have an async {method}(task, ...) method")
        self.hooks = hooks
        _positive("hook_timeout")(None, None, hook_timeout)
        self.hook_timeout = float(hook_timeout)
        if started_event_after is not None and (
            isinstance(started_event_after, bool)
            or not isinstance(started_event_after, int | float)
            or not 0 <= started_event_after < math.inf
        ):
            raise ConfigurationError(
                f"started_event_after must be None or a finite number >= 0, "
                f"got {started_event_after!r}"
            )
        self.started_event_after = started_event_after
        self.freeze_gc = bool(freeze_gc)
        self._routes: dict[str, Route] = {}
        self._token = secrets.token_hex(6)
        self._hostname = socket.gethostname()
        self._stop = trio.Event()
        self._grace: float | None = None
        self._running = False
        self._dispatcher: Dispatcher | None = None
        self._consumers: list[PullConsumer] = []
        self._started_at = ""

    # -- identity ---------------------------------------------------------------------

    @property
    def worker_name(self) -> str:
        """Stable across processes with the same task types and groups (or the given name)."""
        if self._name:
            return self._name
        return f"{'+'.join(sorted(self._routes)) or 'none'}/{'+'.join(sorted(self.groups))}"

    @property
    def worker_id(self) -> str:
        """Unique per worker, ``<worker_name>.<random>@<hostname>``."""
        return f"{self.worker_name}.{self._token}@{self._hostname}"

    @property
    def task_types(self) -> tuple[str, ...]:
        """The registered task types, sorted."""
        return tuple(sorted(self._routes))

    # -- registration -----------------------------------------------------------------

    def use(self, middleware: Middleware) -> Middleware:
        """Add a middleware inside those already added; returns it (usable as a decorator)."""
        if self._running:
            raise ConfigurationError("add middleware before the worker starts")
        if not callable(middleware):
            raise ConfigurationError(f"middleware must be callable, got {middleware!r}")
        self._middleware.append(middleware)
        return middleware

    def _register(
        self,
        task_type: str,
        handler: Handler,
        ack_wait: float | None,
        retry: RetryPolicy | None,
        options: dict[str, Any],
    ) -> None:
        wire.check_name("task type", task_type)
        if self._running:
            raise ConfigurationError("register handlers before the worker starts")
        if task_type in self._routes:
            raise ConfigurationError(f"a handler for {task_type!r} is already registered")
        if ack_wait is not None:
            _positive("ack_wait")(None, None, ack_wait)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        timeout = options.get("timeout")
        if timeout is not None:
            _positive("timeout")(None, None, timeout)
        max_iterations = options.get("max_iterations", 100)
        if (
            isinstance(max_iterations, bool)
            or not isinstance(max_iterations, int)
            or max_iterations < 1
        ):
            raise ConfigurationError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
        self._routes[task_type] = Route(
            task_type=task_type,
            handler=handler,
            ack_wait=float(ack_wait or self.ack_wait),
            retry=retry,
            timeout=None if timeout is None else float(timeout),
            max_iterations=max_iterations,
            keep_checkpoint=bool(options.get("keep_checkpoint", False)),
        )

    @overload
    def handle(
        self,
        task_type: str,
        fn: None = None,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> Callable[[H], H]: ...

    @overload
    def handle(
        self,
        task_type: str,
        fn: H,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> H: ...

    def handle(
        self,
        task_type: str,
        fn: H | None = None,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> H | Callable[[H], H]:
        """Register ``async def fn(ctx) -> bytes | None | value`` for ``task_type``.

        Use as ``@worker.handle("type")`` or ``worker.handle("type", fn)``. The handler
        reads ``ctx.input`` (bytes); what it returns is the output (bytes as they are,
        other values as JSON via cattrs). ``ack_wait`` and ``retry`` override the worker's;
        ``timeout`` (seconds) fails an execution that runs longer (kind ``timeout``,
        retryable); ``max_iterations`` bounds an agent loop (``ctx.continue_with``);
        ``keep_checkpoint`` keeps the step's checkpoint after its terminal outcome.
        """
        options = {
            "timeout": timeout,
            "max_iterations": max_iterations,
            "keep_checkpoint": keep_checkpoint,
        }

        def register(fn: H) -> H:
            _check_async(task_type, fn)
            self._register(task_type, fn, ack_wait, retry, options)
            return fn

        return register if fn is None else register(fn)

    @overload
    def handle_typed(
        self,
        task_type: str,
        fn: None = None,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> Callable[[H], H]: ...

    @overload
    def handle_typed(
        self,
        task_type: str,
        fn: H,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> H: ...

    def handle_typed(
        self,
        task_type: str,
        fn: H | None = None,
        *,
        ack_wait: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_iterations: int = 100,
        keep_checkpoint: bool = False,
    ) -> H | Callable[[H], H]:
        """Register ``async def fn(ctx, value: In) -> Out`` for ``task_type``.

        The input is decoded from JSON into ``In`` and the output encoded from ``Out`` with
        cattrs, both types taken from the annotations (``Out`` may be ``None``). Input
        that cannot be decoded fails the task permanently, naming the type and the field.
        Options as for :meth:`handle`.
        """
        options = {
            "timeout": timeout,
            "max_iterations": max_iterations,
            "keep_checkpoint": keep_checkpoint,
        }

        def register(fn: H) -> H:
            _check_async(task_type, fn)
            input_type = _input_type(task_type, fn)

            async def typed(ctx: TaskContext) -> Any:
                try:
                    value = decode(ctx.input, input_type)
                except DecodeError as exc:
                    raise Fatal(exc) from None
                return await fn(ctx, value)

            typed.__qualname__ = getattr(fn, "__qualname__", typed.__qualname__)
            self._register(task_type, typed, ack_wait, retry, options)
            return fn

        return register if fn is None else register(fn)

    # -- running ----------------------------------------------------------------------

    def _describe(self) -> WorkerInfo:
        stats = self._dispatcher.statistics() if self._dispatcher else None
        return WorkerInfo(
            worker_id=self.worker_id,
            worker_name=self.worker_name,
            task_types=self.task_types,
            groups=self.groups,
            hostname=self._hostname,
            pid=os.getpid(),
            version=__version__,
            started_at=self._started_at,
            last_seen=now_iso(),
            in_flight=stats.in_flight if stats else 0,
            processed=stats.processed if stats else 0,
            failed=stats.dead if stats else 0,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve tasks until :meth:`stop` is called or the enclosing scope is cancelled.

        Signals ``task_status.started()`` once every consumer is pulling and the worker
        is in the directory. Either way of stopping is bounded: pulling stops, queued tasks
        are NAK'd at once, running handlers get the grace period and are then cancelled
        and NAK'd, the directory entry is deleted; ``run`` returns within grace + 1 s.
        """
        if not self._routes:
            raise ConfigurationError("the worker has no handlers: register one before run()")
        if self._running:
            raise NatrioError("this worker is already running")
        self._running = True
        self._started_at = now_iso()
        reporter = Reporter(self.nc, self.worker_id)
        dispatcher = Dispatcher(
            reporter,
            concurrency=self.concurrency,
            default_retry=self.retry,
            logger=self.logger,
            middleware=self._middleware,
            hooks=self.hooks,
            hook_timeout=self.hook_timeout,
            started_event_after=self.started_event_after,
        )
        self._dispatcher = dispatcher
        js = JetStream(self.nc)
        registration = Registration(self.nc, self._token, self._describe)
        consumers: list[PullConsumer] = []
        for route in self._routes.values():
            for group in self.groups:
                config = wire.consumer_config(route.task_type, group, route.ack_wait)

                async def recreate(config: dict[str, Any] = config) -> None:
                    await js.ensure_consumer(wire.TASK_STREAM, config)

                await recreate()
                consumer = PullConsumer(
                    self.nc,
                    stream=wire.TASK_STREAM,
                    name=config["durable_name"],
                    window=self.prefetch,
                    recreate=recreate,
                )
                consumer.sink = dispatcher.sink(route, group, consumer)
                consumers.append(consumer)
        self._consumers = consumers
        failing = False
        if self.freeze_gc:
            # What exists now (modules, classes, handlers, configuration) mostly lives as
            # long as the process: collected once, then frozen, the cycle collector need not
            # walk it again at every full run (a tenth of a busy worker's time otherwise).
            # Unfrozen when the worker stops, so an embedding program's objects are not
            # kept from the collector for longer than the worker runs.
            gc.collect()
            gc.freeze()
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(dispatcher.run)
                        nursery.start_soon(self._watch_for_faults, dispatcher)
                        for consumer in consumers:
                            await nursery.start(consumer.run)
                        await registration.register()
                        nursery.start_soon(registration.heartbeat)
                        log.info("worker %s serving %s", self.worker_id, ", ".join(self.task_types))
                        task_status.started()
                        await self._stop.wait()
                    except BaseException:
                        # A fault ends the worker: hand everything back at once.
                        failing = dispatcher.failed.is_set() or self.nc.closed
                        raise
                    finally:
                        # Also when starting failed: the dispatcher's shielded keep-alive
                        # loop ends only here.
                        with trio.CancelScope(shield=True):
                            await self._shutdown(
                                dispatcher, consumers, registration, grace=0.0 if failing else None
                            )
                        nursery.cancel_scope.cancel()
        finally:
            if self.freeze_gc:
                gc.unfreeze()
            self._running = False
            # A stopped worker may be run again.
            self._stop = trio.Event()
            self._grace = None

    async def _watch_for_faults(self, dispatcher: Dispatcher) -> None:
        # Faults the worker cannot survive end run() with the error (after the bounded
        # shutdown), never a worker that stays registered and serves nothing.
        async with trio.open_nursery() as nursery:

            async def connection_lost() -> None:
                await self.nc.wait_closed_for_good()
                raise ConnectionClosed(
                    f"the connection to {self.nc.url} closed and will not reconnect"
                )

            nursery.start_soon(connection_lost)
            await dispatcher.failed.wait()
            assert dispatcher.failure is not None
            raise dispatcher.failure

    async def _shutdown(
        self,
        dispatcher: Dispatcher,
        consumers: list[PullConsumer],
        registration: Registration,
        *,
        grace: float | None = None,
    ) -> None:
        if grace is None:
            grace = self.shutdown_grace if self._grace is None else self._grace
        log.info("worker %s stopping (grace %.1f s)", self.worker_id, grace)
        # From here on every arriving message is NAK'd at once. The steps below are bounded
        # so that the whole shutdown takes at most grace + 1 s.
        dispatcher.stopping = True
        for consumer in consumers:
            consumer.stop_pulling()
        with trio.move_on_after(0.2):
            async with trio.open_nursery() as nursery:
                for consumer in consumers:
                    nursery.start_soon(consumer.stop)
        await dispatcher.shutdown(grace)
        with trio.move_on_after(0.15):
            try:
                await registration.deregister()
            except NatrioError as exc:
                log.warning("could not delete directory entry: %r", exc)
        with trio.move_on_after(0.05), suppress(NatrioError):
            await self.nc.flush()

    def stop(self, grace: float | None = None) -> None:
        """Ask the running worker to stop; ``run()`` returns within ``grace`` + 1 s.

        ``grace`` defaults to the worker's ``shutdown_grace``. Safe to call more than once
        (the first grace given is used) and before the worker starts.
        """
        if grace is not None and not grace >= 0:
            raise ConfigurationError(f"grace must be >= 0, got {grace!r}")
        if self._grace is None and grace is not None:
            self._grace = float(grace)
        self._stop.set()

    def statistics(self) -> WorkerStatistics:
        """A snapshot of the dispatcher's counters and each consumer's window."""
        if self._dispatcher is not None:
            counters = self._dispatcher.statistics()
        else:
            counters = DispatcherStatistics(self.concurrency, 0, 0, 0, 0, 0, 0)
        return WorkerStatistics(
            worker_id=self.worker_id,
            running=self._running,
            dispatcher=counters,
            consumers={c.name: c.statistics() for c in self._consumers},
        )


def _input_type(task_type: str, fn: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot read the annotations of the {task_type!r} handler: {exc}"
        ) from None
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    if len(params) != 2:
        raise ConfigurationError(
            f"a typed handler takes (ctx, value); the {task_type!r} handler takes {len(params)} parameter(s)"
        )
    input_type = hints.get(params[1].name)
    if input_type is None:
        raise ConfigurationError(
            f"annotate the second parameter of the {task_type!r} handler with its input type"
        )
    if "return" not in hints:
        raise ConfigurationError(
            f"annotate the return type of the {task_type!r} handler (None is fine)"
        )
    return input_type


@asynccontextmanager
async def open_worker(worker: Worker, *, grace: float | None = None) -> AsyncIterator[Worker]:
    """Run ``worker`` for the body of an ``async with``; on exit stop it and wait for it.

    The worker is pulling and registered when the body starts.
    """
    with single_error():
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            try:
                yield worker
            finally:
                worker.stop(grace)


async def run_worker(
    worker: Worker,
    *,
    grace: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``worker`` until SIGINT or SIGTERM, then stop it gracefully (``grace`` seconds).

    Works with ``nursery.start``: started once the worker is serving. Must be called
    from the main thread.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    worker.stop(grace)

            nursery.start_soon(on_signals)
            await worker.run(task_status=task_status)
            nursery.cancel_scope.cancel()
