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
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs
import trio

from . import _wire as wire
from ._codec import decode
from ._context import TaskContext
from ._directory import Registration
from ._dispatch import Dispatcher, DispatcherStatistics, Handler, Route, StepHooks
from ._dispatch.tally import TaskTypeStatistics
from ._errors import (
    ConfigurationError,
    ConnectionClosed,
    DecodeError,
    Fatal,
    JetStreamError,
    NatrioError,
)
from ._jetstream import STREAM_NOT_FOUND, JetStream
from ._model import WorkerInfo
from ._outcomes import Reporter, now_iso
from ._retry import RetryPolicy
from ._routing.claims import ClaimCoordinator
from ._routing.consumers import ConsumerSet
from ._routing.limits import RateLimit
from ._routing.members import Membership
from ._routing.partitions import PartitionCoordinator, store_partitions, stored_partitions
from ._routing.placement import check_claims, check_partitions, worker_target
from ._telemetry import telemetry_option
from ._transport import Connection
from ._util import single_error
from ._version import __version__
from .middleware import Middleware

if TYPE_CHECKING:
    from .otel import Telemetry

log = logging.getLogger("natrio.worker")


H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

#: What ``Worker(claims=...)`` takes: claim names, or a function returning them.
Claims = Iterable[str] | Callable[[], Iterable[str] | Awaitable[Iterable[str]]]


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
    """A snapshot of a worker: its dispatcher's counters, each consumer's window, and what
    it holds of the deployment's partitions and claims."""

    worker_id: str
    running: bool
    dispatcher: DispatcherStatistics
    consumers: dict[str, dict[str, int]]
    #: The partitions held, by ``<task_type>/<group>``.
    partitions: dict[str, tuple[int, ...]] = attrs.field(factory=dict)
    #: The claims held, this worker's own name's included.
    claims: tuple[str, ...] = ()
    #: Tasks waiting for a claim no live worker holds, by consumer name (as last looked).
    waiting_for_claims: dict[str, int] = attrs.field(factory=dict)
    #: Counters and handler-time percentiles of each registered task type.
    task_types: dict[str, TaskTypeStatistics] = attrs.field(factory=dict)


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
    - ``telemetry``: ``True`` for OpenTelemetry spans and metrics of every execution,
      sent to the global providers, or a :class:`natrio.otel.Telemetry` naming others
      (needs the ``otel`` extra; default False: natrio then never imports OpenTelemetry;
      see docs/telemetry.md).

    - ``partitions``: the partition count of every handler registered without one of
      its own (see :meth:`handle` and docs/routing.md).
    - ``claims``: names of claims this worker holds, so that tasks submitted with
      ``target=`` one of them run here: a list, or a function (plain or async) returning
      the list, called every 2 s. Every worker also holds
      :func:`natrio.worker_target` of its name.

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
        partitions: int | None = None,
        claims: Claims | None = None,
        telemetry: bool | Telemetry = False,
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
        # Decided once here: without telemetry, run() builds the plain dispatcher.
        self._telemetry = telemetry_option(telemetry)
        self.partitions = None if partitions is None else check_partitions(partitions)
        self._claims_source: Callable[[], Any] | None = None
        self._static_claims: tuple[str, ...] = ()
        if callable(claims):
            self._claims_source = claims
        elif claims is not None:
            if isinstance(claims, str | bytes):
                raise ConfigurationError("claims must be a list of names, not a string")
            self._static_claims = check_claims(list(claims))
        self._routes: dict[str, Route] = {}
        self._token = secrets.token_hex(6)
        self._hostname = socket.gethostname()
        self._stop = trio.Event()
        self._grace: float | None = None
        self._running = False
        self._dispatcher: Dispatcher | None = None
        self._consumer_set: ConsumerSet | None = None
        self._partitions: PartitionCoordinator | None = None
        self._claims: ClaimCoordinator | None = None
        self._stopping = False
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
        partitions = options.get("partitions")
        if partitions is None:
            partitions = self.partitions
        singleton = options.get("singleton", False)
        if not isinstance(singleton, bool):
            raise ConfigurationError(f"singleton must be True or False, got {singleton!r}")
        max_in_flight = options.get("max_in_flight")
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ConfigurationError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if singleton:
            if max_in_flight not in (None, 1):
                raise ConfigurationError("a singleton runs one at a time: drop max_in_flight")
            if options.get("partitions") is not None:
                raise ConfigurationError("a singleton cannot be partitioned")
            max_in_flight, partitions = 1, None
        if partitions is not None:
            check_partitions(partitions)
            if max_in_flight is not None:
                raise ConfigurationError(
                    "a partitioned task type runs one task per partition at a time: "
                    "drop max_in_flight (or use fewer partitions)"
                )
        rate_limit = options.get("rate_limit")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise ConfigurationError(f"rate_limit must be a natrio.RateLimit, got {rate_limit!r}")
        self._routes[task_type] = Route(
            task_type=task_type,
            handler=handler,
            ack_wait=float(ack_wait or self.ack_wait),
            retry=retry,
            timeout=None if timeout is None else float(timeout),
            max_iterations=max_iterations,
            keep_checkpoint=bool(options.get("keep_checkpoint", False)),
            partitions=partitions,
            max_in_flight=max_in_flight,
            rate_limit=rate_limit,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
    ) -> H | Callable[[H], H]:
        """Register ``async def fn(ctx) -> bytes | None | value`` for ``task_type``.

        Use as ``@worker.handle("type")`` or ``worker.handle("type", fn)``. The handler
        reads ``ctx.input`` (bytes); what it returns is the output (bytes as they are,
        other values as JSON via cattrs). ``ack_wait`` and ``retry`` override the worker's;
        ``timeout`` (seconds) fails an execution that runs longer (kind ``timeout``,
        retryable); ``max_iterations`` bounds an agent loop (``ctx.continue_with``);
        ``keep_checkpoint`` keeps the step's checkpoint after its terminal outcome.

        Routing (docs/routing.md): ``partitions`` (1-256; default the worker's) spreads the
        task type over that many partitions whose tasks run one at a time, in order,
        each on one live worker; ``singleton`` runs one execution of the task type at a
        time across the deployment; ``max_in_flight`` bounds its executions at once
        across the deployment; ``rate_limit`` (a :class:`natrio.RateLimit`) bounds how
        many start per period, a task over the limit waiting without using an attempt.
        """
        options = {
            "timeout": timeout,
            "max_iterations": max_iterations,
            "keep_checkpoint": keep_checkpoint,
            "partitions": partitions,
            "singleton": singleton,
            "max_in_flight": max_in_flight,
            "rate_limit": rate_limit,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
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
        partitions: int | None = None,
        singleton: bool = False,
        max_in_flight: int | None = None,
        rate_limit: RateLimit | None = None,
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
            "partitions": partitions,
            "singleton": singleton,
            "max_in_flight": max_in_flight,
            "rate_limit": rate_limit,
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
        routing: dict[str, dict[str, int]] = {}
        for route in self._routes.values():
            bounds = {}
            if route.partitions is not None:
                bounds["partitions"] = route.partitions
            if route.max_in_flight is not None:
                bounds["max_in_flight"] = route.max_in_flight
            if bounds:
                # Every worker keeps its tasks alive by its own ack wait, and the consumer
                # has one: the bound holds only if they agree.
                bounds["ack_wait_ms"] = round(route.ack_wait * 1000)
                routing[route.task_type] = bounds
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
            claims=self._claims.held if self._claims else (),
            partitions=dict(self._partitions.held) if self._partitions else {},
            routing=routing,
            stopping=self._stopping,
        )

    @property
    def claims(self) -> tuple[str, ...]:
        """The claims this worker holds now (its own name's included), sorted."""
        return self._claims.held if self._claims else ()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve tasks until :meth:`stop` is called or the enclosing scope is cancelled.

        Signals ``task_status.started()`` once every consumer is pulling and the worker
        is in the directory (and holds its partitions and claims). Either way of stopping
        is bounded: the worker marks itself stopping in the directory (its partitions move
        at once), pulling stops, queued tasks are NAK'd at once, running handlers get the
        grace period and are then cancelled and NAK'd, the directory entry is deleted;
        ``run`` returns within grace + 1 s.
        """
        if not self._routes:
            raise ConfigurationError("the worker has no handlers: register one before run()")
        if self._running:
            raise NatrioError("this worker is already running")
        self._running = True
        self._stopping = False
        self._started_at = now_iso()
        telemetry = None
        if self._telemetry is not None:
            telemetry = self._telemetry._for_worker(self.worker_id)
        reporter = (
            Reporter(self.nc, self.worker_id) if telemetry is None else telemetry.reporter(self.nc)
        )
        dispatcher = Dispatcher(
            reporter,
            concurrency=self.concurrency,
            default_retry=self.retry,
            logger=self.logger,
            middleware=self._middleware,
            hooks=self.hooks,
            hook_timeout=self.hook_timeout,
            started_event_after=self.started_event_after,
            telemetry=telemetry,
        )
        self._dispatcher = dispatcher
        registration = Registration(self.nc, self._token, self._describe)
        # Exclusive deliveries (partitions, bounded types) are fenced unless the link is
        # proven: by reading the worker's own directory entry, which it may always read.
        dispatcher.probe_subject = registration.kv.direct_get_subject(registration.key)
        # Partitions move when members change: looked at twice a second; otherwise the
        # directory only matters to claims, looked at every 2 s anyway.
        partitioned = any(route.partitions is not None for route in self._routes.values())
        membership = Membership(self.nc, interval=0.5 if partitioned else 2.0)
        consumers = ConsumerSet(self.nc, dispatcher, window=self.prefetch)
        self._consumer_set = consumers
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
                        ttl = await registration.prepare()
                        await nursery.start(membership.run)
                        plan = await self._plan(membership, ttl)
                        await nursery.start(dispatcher.run)
                        nursery.start_soon(self._watch_for_faults, dispatcher)
                        await nursery.start(consumers.run)
                        for route, group, max_ack_pending, window in plan.plain:
                            await consumers.add(
                                route, group, None, max_ack_pending=max_ack_pending, window=window
                            )
                        self._partitions = PartitionCoordinator(
                            plan.partitioned,
                            consumers,
                            membership,
                            worker_id=self.worker_id,
                            on_change=registration.refresh_soon,
                        )
                        self._claims = ClaimCoordinator(
                            plan.targetable,
                            consumers,
                            membership,
                            worker_id=self.worker_id,
                            own_claim=worker_target(self.worker_name),
                            static_claims=self._static_claims,
                            source=self._claims_source,
                            on_change=registration.refresh_soon,
                            untargetable=plan.untargetable,
                        )
                        await self._claims.refresh_claims()
                        await registration.register()
                        await membership.refresh()
                        await nursery.start(self._partitions.run)
                        await nursery.start(self._claims.run)
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

    async def _plan(self, membership: Membership, ttl: float) -> _Plan:
        # What to pull: checked against what the deployment already agreed on, before
        # anything is pulled.
        plan = _Plan()
        for task_type, route in list(self._routes.items()):
            stored = await stored_partitions(self.nc, task_type)
            if route.partitions is not None:
                await store_partitions(self.nc, task_type, route.partitions)
                if ttl > 0 and route.ack_wait > ttl:
                    # A killed member's running task holds its partition until the ack
                    # wait passes: no longer than its entry takes to expire.
                    route = attrs.evolve(route, ack_wait=ttl)
                    self._routes[task_type] = route
                for group in self.groups:
                    self._check_ack_wait(membership, route, group)
                plan.partitioned.extend((route, group) for group in self.groups)
                # Tasks published without a partition are moved into theirs, one at a time.
                plan.plain.extend((route, group, 1, 1) for group in self.groups)
                continue
            if stored is not None:
                raise ConfigurationError(
                    f"task type {task_type!r} has {stored} partitions: register its handler "
                    f"with partitions={stored}"
                )
            if route.rate_limit is not None and route.rate_limit.scope == "cluster":
                await self._check_counters()
            for group in self.groups:
                self._check_bound(membership, route, group)
                bound = route.max_in_flight or -1
                window = min(self.prefetch, route.max_in_flight or self.prefetch)
                plan.plain.append((route, group, bound, window))
                if route.max_in_flight is None:
                    plan.targetable.append((route, group))
                else:
                    # A bound holds across one consumer: a bounded type takes no targets.
                    plan.untargetable.append((route.task_type, group))
        return plan

    async def _check_counters(self) -> None:
        try:
            info = await JetStream(self.nc).stream_info(wire.COUNTER_STREAM)
        except JetStreamError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
            raise NatrioError(
                f"cluster-scope rate limits count in the {wire.COUNTER_STREAM} stream, which "
                f"does not exist: run natrio.provision() (it needs nats-server 2.12 or later; "
                f"this one is {self.nc.server_version})"
            ) from None
        if not info.get("config", {}).get("allow_msg_counter"):
            # Without it every increment would be refused, each task's check failing.
            raise NatrioError(
                f"the {wire.COUNTER_STREAM} stream does not allow message counters "
                "(allow_msg_counter): delete it and run natrio.provision() again"
            )

    def _check_ack_wait(self, membership: Membership, route: Route, group: str) -> None:
        # A worker whose ack wait is longer than the consumer's keeps its task alive too
        # seldom: the server would hand it to another while it still runs.
        mine = round(route.ack_wait * 1000)
        for other in membership.serving(route.task_type, group):
            theirs = other.routing.get(route.task_type, {}).get("ack_wait_ms")
            if theirs is not None and theirs != mine:
                raise ConfigurationError(
                    f"worker {other.worker_id} serves {route.task_type!r} in {group!r} with "
                    f"ack_wait {theirs / 1000:g} s, this worker with {mine / 1000:g} s: a "
                    "partitioned or bounded task type needs one ack wait (stop every worker "
                    "of the task type before changing it)"
                )

    def _check_bound(self, membership: Membership, route: Route, group: str) -> None:
        # A bound across the deployment holds only if every worker pulls with it.
        if route.max_in_flight is not None:
            self._check_ack_wait(membership, route, group)
        mine = route.max_in_flight
        for other in membership.serving(route.task_type, group):
            theirs = other.routing.get(route.task_type, {}).get("max_in_flight")
            if theirs != mine:
                raise ConfigurationError(
                    f"worker {other.worker_id} serves {route.task_type!r} in {group!r} with "
                    f"max_in_flight={theirs} (singleton: 1), this worker with {mine}: stop "
                    "every worker of the task type before changing it"
                )

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
        consumers: ConsumerSet,
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
        self._stopping = True
        if self._partitions is not None:
            self._partitions.stopping = True
        live = consumers.close()
        for consumer in live:
            consumer.stop_pulling()

        async def mark_stopping() -> None:
            # Marked stopping, the others take its partitions and claims now, not when its
            # entry is gone after the grace (the server still withholds a partition's next
            # task until the one this worker runs is settled).
            try:
                await registration.refresh()
            except NatrioError as exc:
                log.warning("could not mark the directory entry stopping: %r", exc)

        with trio.move_on_after(0.2):
            async with trio.open_nursery() as nursery:
                if registration.registered:
                    nursery.start_soon(mark_stopping)
                for consumer in live:
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
        """A snapshot of the dispatcher's counters, each consumer's window, the
        partitions and claims held, and each task type's counters and handler times."""
        if self._dispatcher is not None:
            counters = self._dispatcher.statistics()
            by_type = self._dispatcher.task_type_statistics(self.task_types)
        else:
            counters = DispatcherStatistics(self.concurrency, 0, 0, 0, 0, 0, 0)
            by_type = {t: TaskTypeStatistics(t) for t in self.task_types}
        live = self._consumer_set.live() if self._consumer_set is not None else []
        return WorkerStatistics(
            worker_id=self.worker_id,
            running=self._running,
            dispatcher=counters,
            consumers={c.name: c.statistics() for c in live},
            partitions=dict(self._partitions.held) if self._partitions else {},
            claims=self.claims,
            waiting_for_claims=dict(self._claims.waiting) if self._claims else {},
            task_types=by_type,
        )


@attrs.define
class _Plan:
    # (route, group, max_ack_pending, window) of each consumer without a placement.
    plain: list[tuple[Route, str, int, int]] = attrs.field(factory=list)
    # (route, group) of each partitioned route and of each route that takes targets.
    partitioned: list[tuple[Route, str]] = attrs.field(factory=list)
    targetable: list[tuple[Route, str]] = attrs.field(factory=list)
    # (task type, group) of each bounded route: served, but taking no targets.
    untargetable: list[tuple[str, str]] = attrs.field(factory=list)


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
