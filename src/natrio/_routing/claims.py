"""Claims: the targets a worker holds, the consumers of tasks sent to them, soft targets
taken over while nobody holds their claim, and consumers of claims long unheld removed.

A task sent with ``target=<claim>`` waits in the task stream under the placement
``t<claim>`` (``s<claim>`` when soft) and its own durable consumer, which only workers
holding the claim pull: nothing else ever receives it, so it uses no attempts while it
waits, and it stays durable whoever comes and goes.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from .. import _wire as wire
from .._errors import ConfigurationError, JetStreamError, NatrioError
from .._jetstream import CONSUMER_NOT_FOUND, JetStream
from .._model import WorkerInfo
from .._transport import Connection
from .consumers import ConsumerSet
from .members import Membership
from .placement import check_claims, parse_claim_consumer

if TYPE_CHECKING:
    from .._dispatch import Route

log = logging.getLogger("natrio.routing")

_FRACTION = re.compile(r"\.(\d{6})\d*")


def _timestamp(text: object) -> float | None:
    # The server writes RFC 3339 with nanoseconds; fromisoformat takes microseconds.
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r".\1", text)).timestamp()
    except ValueError:
        return None


class ClaimCoordinator:
    """Keeps this worker pulling the consumers of the claims it holds, and of soft targets
    whose claim no live worker holds; looks every ``interval`` seconds.

    Consumers of a claim no live worker holds, with nothing pending, unused for
    ``cleanup_after`` seconds, are deleted (a task sent to the claim later makes its
    consumer again).
    """

    def __init__(
        self,
        routes: Sequence[tuple[Route, str]],
        consumers: ConsumerSet,
        membership: Membership,
        *,
        worker_id: str,
        own_claim: str,
        static_claims: Sequence[str] = (),
        source: Callable[[], Any] | None = None,
        on_change: Callable[[], None] = lambda: None,
        interval: float = 2.0,
        cleanup_after: float = 600.0,
        untargetable: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.routes = list(routes)
        self.consumers = consumers
        self.membership = membership
        self.worker_id = worker_id
        self.own_claim = own_claim
        self.static_claims = tuple(static_claims)
        self.source = source
        self.on_change = on_change
        self.interval = interval
        self.cleanup_after = cleanup_after
        self.held: tuple[str, ...] = ()
        #: The claims given (a list or the function's), beside the worker's own name's.
        self.declared: tuple[str, ...] = ()
        #: Tasks waiting for a claim no live worker holds, by consumer name.
        self.waiting: dict[str, int] = {}
        #: Soft-target consumers pulled because nobody holding their claim is alive.
        self.guest: frozenset[str] = frozenset()
        self._pulled: set[str] = set()
        # The consumers of the task stream, as the last sweep found them.
        self._existing: frozenset[str] = frozenset()
        self._by_prefix = {f"{route.task_type}~{group}~": (route, group) for route, group in routes}
        # Served here, but taking no targets (a bound across one consumer): their claim
        # consumers are only counted as waiting.
        self._untargetable = {f"{task_type}~{group}~" for task_type, group in untargetable}
        self._warned: set[str] = set()

    async def refresh_claims(self) -> bool:
        """Read the claims (calling the function, if one was given); whether they changed."""
        claims = {self.own_claim, *self.static_claims}
        if self.source is not None:
            found: Any = None
            try:
                # The function is the application's: bounded, and a failure keeps the
                # claims it returned last rather than dropping them (or the worker).
                with trio.move_on_after(self.interval):
                    found = self.source()
                    if inspect.isawaitable(found):
                        found = await found
                if found is None:
                    raise TimeoutError(f"no answer within {self.interval} s")
                claims.update(check_claims(list(found)))
            except (ConfigurationError, Exception) as exc:
                log.warning("the claims function failed: %r; keeping %s", exc, self.held)
                claims.update(self.held)
        held = tuple(sorted(claims))
        if held == self.held:
            return False
        self.declared = tuple(sorted(claims - {self.own_claim}))
        self.held = held
        self.on_change()
        return True

    def _holders(self, task_type: str, group: str, claim: str) -> bool:
        if claim in self.held:
            return True
        return any(claim in w.claims for w in self.membership.serving(task_type, group))

    async def sweep(self) -> None:
        """Look at the claim consumers of the task types served whose claim no live worker
        holds: take soft ones, count what waits, delete long unused ones.

        Names first, then the info of only those unheld consumers: most claims have a
        live holder, and a listing of every consumer's info would cost every worker a
        page per 256 consumers every interval.
        """
        js = self.consumers.js
        now = datetime.now(UTC).timestamp()
        waiting: dict[str, int] = {}
        guest: set[str] = set()
        names = await js.consumer_names(wire.TASK_STREAM)
        self._existing = frozenset(names)
        for name in names:
            parsed = parse_claim_consumer(name)
            if not parsed:
                continue
            prefix = f"{parsed[0]}~{parsed[1]}~"
            untargetable = prefix in self._untargetable
            served = self._by_prefix.get(prefix)
            if not untargetable and not served:
                continue
            soft, claim = parsed[2], parsed[3]
            if served and self._holders(served[0].task_type, served[1], claim):
                continue
            try:
                info = await js.consumer_info(wire.TASK_STREAM, name)
            except JetStreamError as exc:
                if exc.err_code == CONSUMER_NOT_FOUND:
                    continue  # deleted meanwhile (by another worker's sweep)
                raise
            pending = _pending(info)
            if untargetable:
                if pending:
                    waiting[name] = pending
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning(
                            "%d task(s) on %s wait for ever: %s in %s is a singleton or "
                            "bounded task type, which takes no targets",
                            pending,
                            name,
                            parsed[0],
                            parsed[1],
                        )
                continue
            if soft:
                guest.add(name)
            elif pending:
                waiting[name] = pending
            if pending == 0:
                last = max(
                    _timestamp(info.get("created")) or now,
                    _timestamp((info.get("delivered") or {}).get("last_active")) or 0.0,
                )
                if now - last > self.cleanup_after:
                    log.info("deleting consumer %s: claim %r unheld and unused", name, claim)
                    await js.delete_consumer(wire.TASK_STREAM, name)
                    guest.discard(name)
                    assert served is not None  # untargetable ones were skipped above
                    await self._restore_if_stored(served[0], served[1], name)
        self.waiting = waiting
        self.guest = frozenset(guest)

    async def _restore_if_stored(self, route: Route, group: str, name: str) -> None:
        # A client stores a targeted task first and then makes its consumer when missing:
        # a task stored while this sweep deleted the consumer is found here (the client's
        # look for the consumer came before the deletion), and its consumer made anew.
        placement = name.rpartition("~")[2]
        config = wire.consumer_config(route.task_type, group, route.ack_wait, placement=placement)
        js = self.consumers.js
        # Counted, not listed: the claim may have many tasks waiting.
        if await js.subject_count(wire.TASK_STREAM, config["filter_subject"]):
            log.info("consumer %s: a task arrived while it was deleted; made again", name)
            await js.ensure_consumer(wire.TASK_STREAM, config)

    async def apply(self) -> None:
        """Pull the consumers of the held claims and of the guest soft targets, no others."""
        wanted: dict[str, tuple[Route, str, str]] = {}
        for route, group in self.routes:
            for claim in self.held:
                for soft in (False, True):
                    placement = wire.claim_placement(claim, soft=soft)
                    name = wire.consumer_name(route.task_type, group, placement)
                    if claim not in self.declared and name not in self._existing:
                        # The worker's own name's claim: pulled once a task sent to it has
                        # made its consumer, not made for every worker and task type.
                        continue
                    wanted[name] = (route, group, placement)
        for name in self.guest:
            prefix, _, placement = name.rpartition("~")
            route, group = self._by_prefix[prefix + "~"]
            wanted[name] = (route, group, placement)
        for name in list(self._pulled):
            if name not in wanted:
                self.consumers.remove(name)
                self._pulled.discard(name)
        for name, (route, group, placement) in wanted.items():
            if name not in self.consumers:
                # A guest's consumer deleted as unused (by any worker's sweep) stays deleted:
                # recreating it would keep every soft claim's consumer for ever.
                await self.consumers.add(route, group, placement, recreate=name not in self.guest)
            self._pulled.add(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh, sweep and apply every interval (and when the members change)."""
        try:
            await self.sweep()
        except NatrioError as exc:
            log.warning("looking for claim consumers failed: %r; trying again", exc)
        await self.apply()
        task_status.started()
        version = self.membership.version
        while True:
            with trio.move_on_after(self.interval):
                version = await self.membership.changed(version)
            try:
                if await self.refresh_claims():
                    await self.apply()  # a dropped claim stops being pulled at once
                await self.sweep()
                await self.apply()
            except NatrioError as exc:
                log.warning("updating claims failed: %r; trying again", exc)


def _pending(info: dict[str, Any]) -> int:
    return int(info.get("num_pending") or 0) + int(info.get("num_ack_pending") or 0)


async def unheld_claims(
    conn: Connection, workers: Sequence[WorkerInfo]
) -> list[tuple[str, str, int]]:
    """(consumer, claim, tasks waiting) for every claim consumer with tasks waiting whose
    claim no live worker serving its task type holds, sorted by consumer name."""
    found = []
    for info in await JetStream(conn).consumers(wire.TASK_STREAM):
        name = str(info.get("name", ""))
        parsed = parse_claim_consumer(name)
        if parsed is None or not (pending := _pending(info)):
            continue
        task_type, group, _soft, claim = parsed
        serving = [
            w for w in workers if task_type in w.task_types and group in w.groups and not w.stopping
        ]
        if any("max_in_flight" in w.routing.get(task_type, {}) for w in serving):
            found.append((name, f"{claim} (a bounded task type takes no targets)", pending))
        elif not any(claim in w.claims for w in serving):
            found.append((name, claim, pending))
    return sorted(found)
