"""Run the bench: each scenario on its own embedded nats-server, its contestants in turn.

Every scenario starts a fresh nats-server with a file store in a temporary directory,
provisions natrio's streams, and runs its contestants one after another against that
server with the same task payloads. Before each contestant that works tasks, the task
and event streams are purged, the consumer is recreated and the tasks are published
again under a round id of their own (so ``Nats-Msg-Id`` never drops one as a duplicate).

Contestants are subprocesses (``natrio._asyncio.baselines``, ``natrio._bench.contestants``
and the peers ``natrio._asyncio.faststream_peer`` and ``natrio._asyncio.taskiq_peer``,
run only when their libraries are installed) that report through ``workload.emit``;
they are terminated, then killed, whenever the bench fails or is cancelled. The bench
adds what the server did meanwhile (its CPU, from ``/proc``; its message counts, from its
monitoring port). What comes back is raw: :mod:`natrio._bench.report` computes medians,
ratios and targets.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import importlib.util
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

import attrs
import trio

import natrio

from .. import _wire as wire
from .._errors import BenchError, ContestantFailed
from .._jetstream import JetStream
from . import workload

__all__ = [
    "FULL",
    "QUICK",
    "SCENARIOS",
    "Bar",
    "BenchConfig",
    "BenchError",
    "Contestant",
    "ContestantFailed",
    "Progress",
    "Sizes",
    "run_bench",
    "spawn",
]

#: Every scenario, in the order a full run goes through them.
SCENARIOS = ("drain", "roundtrip", "concurrency", "longrun", "loss")

_BASELINES = "natrio._asyncio.baselines"
_CONTESTANTS = "natrio._bench.contestants"
# How often the bench reads the server's stream state for the progress bars.
_WATCH_INTERVAL = 0.25
# Tasks published per chunk; each chunk ends with a publish awaited for its ack.
_CHUNK = 2_000
_STDERR_TAIL = 30
# Seconds a server contestant gets to exit once its stdin is closed.
_STOP_TIMEOUT = 10.0


@attrs.frozen
class Sizes:
    """How much work each scenario does."""

    #: Tasks queued for each drain contestant.
    drain_tasks: int = 50_000
    #: Measured round trips (after the warm-up ones).
    roundtrip_count: int = 5_000
    roundtrip_warmup: int = 200
    #: Sleeping handlers, all running at once.
    sleepers: int = 2_000
    #: Seconds each of them sleeps.
    sleep: float = 1.0
    #: Tasks through one worker in the long run.
    longrun_tasks: int = 1_000_000
    #: Where the long run's RSS growth is measured from, as a fraction of its tasks.
    growth_from: float = 0.1
    #: Fetch batch, pull window or worker concurrency of the drain and long-run workers.
    window: int = 256
    #: Tasks kept queued while the long run's worker drains them.
    longrun_backlog: int = 100_000
    #: Tasks each contestant of the loss scenario is given (with no events stream).
    loss_tasks: int = 2_000
    #: Seconds each of them runs before it is stopped and the task stream counted.
    loss_seconds: float = 5.0

    @property
    def growth_from_task(self) -> int:
        """The task count the long run's RSS growth is measured from."""
        return max(1, round(self.longrun_tasks * self.growth_from))


#: The sizes of the issue's targets.
FULL = Sizes()
#: A run that takes well under a minute on two cores.
QUICK = Sizes(
    drain_tasks=3_000,
    roundtrip_count=300,
    roundtrip_warmup=50,
    sleepers=200,
    longrun_tasks=20_000,
    loss_tasks=500,
    loss_seconds=3.0,
)


@attrs.frozen
class BenchConfig:
    """What to run: which scenarios, how big, how many rounds, where stores live."""

    scenarios: tuple[str, ...] = SCENARIOS
    sizes: Sizes = FULL
    #: Rounds of the drain, round-trip and concurrency scenarios (the long run runs once).
    rounds: int = 1
    #: Directory the scenarios' JetStream stores are made in (default: the system's temp).
    store_dir: str | None = None
    #: A contestant that finishes no task for this long has failed.
    stall_timeout: float = 60.0
    #: Keys of the drain and loss contestants to run (None: all); see :data:`DRAIN_KEYS`.
    contestants: frozenset[str] | None = None
    #: Worker process counts natrio's drain also runs with, a contestant ``natrio-<N>p``
    #: each (see :func:`natrio_process_contestants`); not in the loss scenario.
    natrio_processes: tuple[int, ...] = ()


class Bar(Protocol):
    """One contestant's line in the progress display."""

    def update(self, done: int | None = None, status: str | None = None) -> None:
        """Show ``done`` tasks finished and/or a short status."""

    def finish(self, status: str) -> None:
        """Mark it complete, with its headline figure."""


class Progress(Protocol):
    """Where the bench shows what it is doing (see ``report.RichProgress``)."""

    def bar(self, description: str, total: int | None) -> Bar:
        """A new line for one contestant; ``total`` None when there is no count to show."""


# -- contestant processes ------------------------------------------------------------------


class Contestant:
    """A contestant's process: its figures, its ready line, the tail of its stderr."""

    def __init__(self, label: str, argv: Sequence[str]) -> None:
        self.label = label
        self.argv = list(argv)
        self.process: trio.Process | None = None
        self.figures: dict[str, Any] | None = None
        self.ready = False
        self._ready_or_gone = trio.Event()
        self._stdout_done = trio.Event()
        self._stderr_done = trio.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)

    async def wait_ready(self) -> None:
        """Return once a server contestant printed its ready line; fail if it exited first."""
        await self._ready_or_gone.wait()
        if not self.ready:
            await self._exited()
            raise self.failure("exited before it was ready")

    async def result(self) -> dict[str, Any]:
        """Wait for the process to exit and return its figures; fail unless it succeeded."""
        await self._exited()
        assert self.process is not None
        if self.process.returncode != 0:
            raise self.failure("failed")
        if self.figures is None:
            raise self.failure("exited without reporting its figures")
        return self.figures

    async def stop(self) -> dict[str, Any]:
        """Stop a server contestant by closing its stdin; return its final figures."""
        assert self.process is not None
        assert self.process.stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.process.stdin.aclose()
        with trio.move_on_after(_STOP_TIMEOUT) as waited:
            await self._exited()
        if waited.cancelled_caught:
            self.process.kill()
            await self._exited()
            raise self.failure(f"did not stop within {_STOP_TIMEOUT:g} s of its stdin closing")
        return await self.result()

    def failure(self, reason: str) -> ContestantFailed:
        """The error for this contestant, with its exit status, command and stderr tail."""
        returncode = self.process.returncode if self.process is not None else None
        if returncode is None:
            status = "still running"
        elif returncode < 0:
            status = f"killed by signal {-returncode}"
        else:
            status = f"exit status {returncode}"
        tail = "\n".join(f"  {line}" for line in self._tail) or "  (nothing)"
        return ContestantFailed(
            f"contestant {self.label} {reason} ({status})\n"
            f"command: {subprocess.list2cmdline(self.argv)}\n"
            f"last lines of its output:\n{tail}"
        )

    async def _exited(self) -> None:
        assert self.process is not None
        await self.process.wait()
        # Its pipes reach EOF once it has exited; reading them out keeps the last lines.
        await self._stdout_done.wait()
        await self._stderr_done.wait()

    async def _read(self, stream: trio.abc.ReceiveStream, stdout: bool) -> None:
        pending = b""
        try:
            async for chunk in stream:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._line(line.decode("utf-8", "replace"), stdout)
            if pending:
                self._line(pending.decode("utf-8", "replace"), stdout)
        finally:
            if stdout:
                self._stdout_done.set()
                self._ready_or_gone.set()
            else:
                self._stderr_done.set()

    def _line(self, line: str, stdout: bool) -> None:
        prefix = "NATRIO-BENCH "
        if stdout and line.startswith(prefix):
            try:
                figures = json.loads(line[len(prefix) :])
            except ValueError:
                self._tail.append(f"(unreadable figures) {line}")
                return
            if figures.get("ready"):
                self.ready = True
                self._ready_or_gone.set()
            else:
                self.figures = figures
            return
        self._tail.append(line)


@contextlib.asynccontextmanager
async def spawn(label: str, argv: Sequence[str]) -> AsyncIterator[Contestant]:
    """Run a contestant for the duration of the block.

    Leave the block after :meth:`Contestant.result` or :meth:`Contestant.stop`; on any
    other way out (an error, a cancellation) the process is terminated, then killed.
    """
    contestant = Contestant(label, argv)
    with _unwrapped():
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    contestant.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            contestant.process = process
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(contestant._read, process.stdout, True)
            nursery.start_soon(contestant._read, process.stderr, False)
            try:
                yield contestant
            finally:
                if process.returncode is None:
                    # run_process answers the cancellation by terminating, then killing it.
                    nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """Let a lone exception out of the nurseries inside as itself, not in nested groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        sole: BaseException = group
        while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
            sole = sole.exceptions[0]
        if sole is group:
            raise
        raise sole from None


def _python(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *(str(arg) for arg in args)]


# -- one scenario's server -----------------------------------------------------------------


class Session:
    """One scenario's server and connection, and what every contestant run needs from them."""

    def __init__(
        self,
        name: str,
        url: str,
        nc: natrio.Connection,
        config: BenchConfig,
        progress: Progress,
        server_pid: int | None = None,
        monitor_url: str | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.server_pid = server_pid
        self.monitor_url = monitor_url
        self.nc = nc
        self.js = JetStream(nc)
        self.config = config
        self.sizes = config.sizes
        self.progress = progress
        self._token = secrets.token_hex(3)
        self._base_seq = 0

    def round_id(self, name: str) -> str:
        """A run-id prefix no other contestant run of this bench uses."""
        return f"{self._token}-{name}"

    def label(self, contestant: str, round_: int, rounds: int) -> str:
        """The progress line's description of one contestant run."""
        suffix = f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""
        return f"{self.name} · {contestant}{suffix}"

    async def reset(self) -> None:
        """Empty the task and event streams and recreate the consumer every contestant pulls."""
        names = (await self.js.api(f"CONSUMER.NAMES.{wire.TASK_STREAM}")).get("consumers") or []
        for consumer in names:
            await self.js.delete_consumer(wire.TASK_STREAM, consumer)
        await self.js.api(f"STREAM.PURGE.{wire.TASK_STREAM}")
        await self.js.api(f"STREAM.PURGE.{wire.EVENT_STREAM}")
        await self.js.ensure_consumer(wire.TASK_STREAM, workload.consumer_config())
        self._base_seq = (await self._task_stream())["last_seq"]

    async def prefill(
        self,
        round_: str,
        start: int,
        stop: int,
        message: workload.TaskMessage = workload.task_message,
    ) -> None:
        """Publish tasks ``start`` to ``stop - 1`` of ``round_`` and wait until all are stored.

        ``message`` makes each task's subject, payload and headers (a peer whose library
        has its own message format brings its own).
        """
        for low in range(start, stop, _CHUNK):
            high = min(stop, low + _CHUNK)
            for n in range(low, high - 1):
                subject, payload, headers = message(round_, n)
                self.nc.publish_nowait(subject, payload, headers=headers)
            await self.nc.flush()
            # A stream stores what it receives in order, so the ack of each chunk's last
            # task says the whole chunk is stored; it also paces the publishing.
            last = high - 1
            subject, payload, headers = message(round_, last)
            ack = await self.js.publish(subject, payload, headers=headers)
            if ack.get("duplicate"):
                raise BenchError(f"task {last} of round {round_} was dropped as a duplicate")

    async def tasks_done(self) -> tuple[int, int]:
        """(tasks published since the reset, of which acknowledged, hence removed)."""
        state = await self._task_stream()
        published = state["last_seq"] - self._base_seq
        return published, published - state["messages"]

    async def _task_stream(self) -> dict[str, Any]:
        state: dict[str, Any] = (await self.js.stream_info(wire.TASK_STREAM))["state"]
        return state

    async def completed_events(self) -> int:
        """How many completion events of the bench's task type the events stream holds."""
        name = "bench-count"
        config = {
            "durable_name": name,
            "filter_subject": wire.event_subject(workload.TASK_TYPE, "*", "*", wire.COMPLETED),
            "ack_policy": "none",
            "deliver_policy": "all",
        }
        # A consumer's pending count is the number of messages its filter matches, which
        # a stream-info with a subjects filter would list one subject at a time instead.
        info = await self.js.ensure_consumer(wire.EVENT_STREAM, config)
        await self.js.delete_consumer(wire.EVENT_STREAM, name)
        return int(info["num_pending"])

    async def check_acked(self, label: str, count: int) -> None:
        """Fail unless exactly ``count`` tasks were published and all were acknowledged."""
        # The server removes acked tasks from the work queue as it processes the acks, a
        # moment after the contestant exits; there is no event to wait on, so look again
        # for a bounded time.
        with trio.move_on_after(5.0):
            while (await self.tasks_done())[1] < count:  # noqa: ASYNC110
                await trio.sleep(0.05)
        published, done = await self.tasks_done()
        if done != count or published != count:
            raise BenchError(f"{label}: {done} of {published} tasks acknowledged, expected {count}")

    async def check_done(self, label: str, count: int) -> None:
        """Fail unless ``count`` tasks were acknowledged and each recorded a completion."""
        await self.check_acked(label, count)
        completed = await self.completed_events()
        if completed != count:
            raise BenchError(f"{label}: {completed} completion events recorded for {count} tasks")

    async def watch(self, label: str, bar: Bar, total: int) -> None:
        """Show the tasks acknowledged so far; fail the run when none finish for too long."""
        # Sleeping handlers finish nothing for as long as they sleep.
        timeout = self.config.stall_timeout + self.sizes.sleep
        last_done = -1
        last_change = trio.current_time()
        while True:
            _, done = await self.tasks_done()
            bar.update(min(done, total))
            now = trio.current_time()
            if done != last_done:
                last_done, last_change = done, now
            elif now - last_change > timeout:
                raise BenchError(
                    f"contestant {label} finished no task for {timeout:g} s ({done} of {total} done)"
                )
            await trio.sleep(_WATCH_INTERVAL)

    def server_cpu(self) -> float | None:
        """CPU seconds the scenario's nats-server has used so far (None off Linux)."""
        return workload.process_cpu_seconds(self.server_pid) if self.server_pid else None

    async def server_messages(self) -> tuple[int, int] | None:
        """(messages the server received, messages it sent) so far, from its monitoring port."""
        if self.monitor_url is None:
            return None
        url = self.monitor_url + "/varz"

        def read() -> dict[str, Any]:
            with urllib.request.urlopen(url, timeout=5) as answer:
                varz: dict[str, Any] = json.load(answer)
                return varz

        varz = await trio.to_thread.run_sync(read)
        return int(varz["in_msgs"]), int(varz["out_msgs"])

    async def run_watched(
        self, label: str, argv: Sequence[str], bar: Bar, total: int
    ) -> dict[str, Any]:
        """Run a contestant to its end while its progress line follows the task stream.

        The figures gain what the server did meanwhile: ``server_cpu_seconds`` and
        ``server_msgs_in`` / ``server_msgs_out`` (the bench's own requests included, a
        few per second).
        """
        cpu_before, msgs_before = self.server_cpu(), await self.server_messages()
        async with spawn(label, argv) as contestant, trio.open_nursery() as nursery:
            nursery.start_soon(self.watch, label, bar, total)
            figures = await contestant.result()
            nursery.cancel_scope.cancel()
        cpu_after, msgs_after = self.server_cpu(), await self.server_messages()
        bar.update(total)
        if cpu_before is not None and cpu_after is not None:
            figures["server_cpu_seconds"] = cpu_after - cpu_before
        if msgs_before is not None and msgs_after is not None:
            figures["server_msgs_in"] = msgs_after[0] - msgs_before[0]
            figures["server_msgs_out"] = msgs_after[1] - msgs_before[1]
        return figures


@contextlib.asynccontextmanager
async def _session(name: str, config: BenchConfig, progress: Progress) -> AsyncIterator[Session]:
    with tempfile.TemporaryDirectory(
        prefix=f"natrio-bench-{name}-", dir=config.store_dir, ignore_cleanup_errors=True
    ) as store:
        monitor = _free_port()
        async with (
            natrio.embedded_server(store_dir=store, args=["--http_port", str(monitor)]) as server,
            natrio.connect(server.url, name=f"natrio bench {name}") as nc,
        ):
            await natrio.provision(nc, storage="file")
            yield Session(
                name,
                server.url,
                nc,
                config,
                progress,
                server.pid,
                f"http://127.0.0.1:{monitor}",
            )


def _free_port() -> int:
    # For the server's monitoring port (its client port it picks itself).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the scenarios ---------------------------------------------------------------------------


@attrs.frozen
class DrainContestant:
    """One program of the drain: its key in the figures, its name, how to run it."""

    key: str
    name: str
    argv: list[str]
    #: Makes its tasks (a peer library may have a message format of its own).
    message: workload.TaskMessage = workload.task_message


#: The peer libraries and the module of the bridge that runs each.
PEERS = {"faststream": "natrio._asyncio.faststream_peer", "taskiq": "natrio._asyncio.taskiq_peer"}


def peer_available(peer: str) -> bool:
    """Whether the library of a peer contestant is installed (the ``natrio[bench]`` extra)."""
    return importlib.util.find_spec(peer) is not None


def drain_contestants(sizes: Sizes) -> tuple[list[DrainContestant], list[str]]:
    """The drain's contestants in the order they run, and the peers skipped (not installed)."""
    window = sizes.window
    ours = [
        DrainContestant("A", "baseline A", _python(_BASELINES, "drain-a", "--batch", window)),
        DrainContestant("B", "baseline B", _python(_BASELINES, "drain-b", "--batch", window)),
        DrainContestant(
            "B-same", "baseline B-same", _python(_BASELINES, "drain-b-same", "--batch", window)
        ),
        DrainContestant(
            "natrio", "natrio", _python(_CONTESTANTS, "drain", "--concurrency", window)
        ),
    ]
    peers: list[DrainContestant] = []
    skipped: list[str] = []
    for peer, module in PEERS.items():
        if not peer_available(peer):
            skipped.append(peer)
            continue
        message = importlib.import_module(module).task_message
        if peer == "faststream":
            peers.append(
                DrainContestant("faststream", "FastStream", _python(module, "drain"), message)
            )
            peers.append(
                DrainContestant(
                    "faststream-workers",
                    f"FastStream (max_workers={window})",
                    _python(module, "drain", "--max-workers", window),
                    message,
                )
            )
        else:
            peers.append(DrainContestant("taskiq", "taskiq", _python(module, "drain"), message))
    return ours + peers, skipped


#: Every drain contestant's key, in the order they run.
DRAIN_KEYS = ("A", "B", "B-same", "natrio", "faststream", "faststream-workers", "taskiq")


def natrio_process_contestants(processes: Sequence[int], window: int) -> list[DrainContestant]:
    """natrio's drain with its worker in N processes, run by natrio's supervisor as
    ``natrio worker --processes N`` runs them: a contestant ``natrio-<N>p`` for each N."""
    return [
        DrainContestant(
            f"natrio-{n}p",
            f"natrio, {n} process{'es' if n > 1 else ''}",
            _python(_CONTESTANTS, "drain-processes", "--processes", n, "--concurrency", window),
        )
        for n in processes
    ]


def _chosen(session: Session) -> tuple[list[DrainContestant], list[str]]:
    contestants, skipped = drain_contestants(session.sizes)
    wanted = session.config.contestants
    if wanted is not None:
        contestants = [c for c in contestants if c.key in wanted]
    return contestants, skipped


async def _drain(session: Session) -> dict[str, Any]:
    sizes, rounds = session.sizes, session.config.rounds
    count, url = sizes.drain_tasks, session.url
    contestants, skipped = _chosen(session)
    # Right after natrio's own (in-process) contestant, whatever --contestant picked.
    after = next((i + 1 for i, c in enumerate(contestants) if c.key == "natrio"), len(contestants))
    contestants[after:after] = natrio_process_contestants(
        session.config.natrio_processes, sizes.window
    )
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in contestants}
    order: list[str] = []
    # Interleaved (A, B, ..., natrio, A, B, ...) so a drift of the machine's speed during
    # the run touches every contestant alike.
    for round_ in range(rounds):
        for contestant in contestants:
            label = session.label(contestant.name, round_, rounds)
            bar = session.progress.bar(label, count)
            bar.update(0, "prefilling")
            await session.reset()
            round_id = session.round_id(f"d{round_}{contestant.key}")
            await session.prefill(round_id, 0, count, contestant.message)
            bar.update(0, "running")
            figures = await session.run_watched(
                label, [*contestant.argv, "--url", url, "--count", str(count)], bar, count
            )
            await session.check_done(label, count)
            bar.finish(f"{figures['rate']:,.0f} tasks/s")
            runs[contestant.key].append(figures)
            order.append(contestant.key)
    return {
        "tasks": count,
        "window": sizes.window,
        "rounds": rounds,
        "order": order,
        "names": {c.key: c.name for c in contestants},
        "skipped": skipped,
        "runs": runs,
    }


@attrs.frozen
class RoundTripContestant:
    """One task system of the round trip: its worker and its client program."""

    key: str
    name: str
    module: str


def roundtrip_contestants() -> tuple[list[RoundTripContestant], list[str]]:
    """The round trip's task systems (natrio first), and the peers skipped."""
    systems = [RoundTripContestant("natrio", "natrio", _CONTESTANTS)]
    skipped: list[str] = []
    for peer, module in PEERS.items():
        if peer_available(peer):
            name = "FastStream" if peer == "faststream" else "taskiq"
            systems.append(RoundTripContestant(peer, name, module))
        else:
            skipped.append(peer)
    return systems, skipped


async def _roundtrip(session: Session) -> dict[str, Any]:
    sizes, rounds, url = session.sizes, session.config.rounds, session.url
    count, warmup = sizes.roundtrip_count, sizes.roundtrip_warmup
    systems, skipped = roundtrip_contestants()
    wanted = session.config.contestants
    if wanted is not None:
        systems = [s for s in systems if s.key in wanted or s.key == "natrio"]
    runs: dict[str, list[dict[str, Any]]] = {"floor": [], **{s.key: [] for s in systems}}
    for round_ in range(rounds):
        label = session.label("floor (nats-py request/reply)", round_, rounds)
        bar = session.progress.bar(label, None)
        bar.update(status="running")
        echo_argv = _python(_BASELINES, "echo", "--url", url)
        request_argv = _python(
            _BASELINES, "request", "--url", url, "--count", count, "--warmup", warmup
        )
        async with spawn(f"{label}: echo", echo_argv) as echo:
            await echo.wait_ready()
            async with spawn(f"{label}: request", request_argv) as requester:
                figures = await requester.result()
            await echo.stop()
        runs["floor"].append(figures)
        bar.finish(f"p50 {_median_ms(figures['latencies'])}")

        for system in systems:
            label = session.label(system.name, round_, rounds)
            total = warmup + count
            bar = session.progress.bar(label, total)
            await session.reset()
            worker_argv = _python(system.module, "roundtrip-worker", "--url", url)
            client_argv = _python(
                system.module,
                "roundtrip-client",
                "--url",
                url,
                "--count",
                count,
                "--warmup",
                warmup,
                "--round",
                session.round_id(f"r{round_}{system.key}"),
            )
            async with spawn(f"{label}: worker", worker_argv) as worker:
                await worker.wait_ready()
                bar.update(0, "running")
                figures = await session.run_watched(f"{label}: client", client_argv, bar, total)
                worker_figures = await worker.stop()
            await session.check_done(label, total)
            runs[system.key].append(figures | {"worker": worker_figures})
            bar.finish(f"p50 {_median_ms(figures['latencies'])}")
    return {
        "count": count,
        "warmup": warmup,
        "rounds": rounds,
        "names": {"floor": "floor", **{s.key: s.name for s in systems}},
        "skipped": skipped,
        "runs": runs,
    }


def _median_ms(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    return f"{ordered[len(ordered) // 2] * 1000:.3f} ms" if ordered else "-"


async def _concurrency(session: Session) -> dict[str, Any]:
    sizes, rounds = session.sizes, session.config.rounds
    count, sleep = sizes.sleepers, sizes.sleep
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        label = session.label(f"natrio ({count:,} x {sleep:g} s)", round_, rounds)
        bar = session.progress.bar(label, count)
        bar.update(0, "prefilling")
        await session.reset()
        await session.prefill(session.round_id(f"c{round_}"), 0, count)
        bar.update(0, "running")
        argv = _python(
            _CONTESTANTS,
            "concurrency",
            "--url",
            session.url,
            "--count",
            count,
            "--concurrency",
            count,
            "--sleep",
            sleep,
        )
        figures = await session.run_watched(label, argv, bar, count)
        await session.check_done(label, count)
        bar.finish(f"{figures['seconds']:.2f} s")
        runs.append(figures)
    return {"tasks": count, "sleep": sleep, "rounds": rounds, "runs": runs}


async def _longrun(session: Session) -> dict[str, Any]:
    sizes = session.sizes
    count = sizes.longrun_tasks
    backlog = max(1, min(count, sizes.longrun_backlog))
    marks = [sizes.growth_from_task, count // 2, count]
    sample_every = max(1, count // 20)
    label = session.label("natrio", 0, 1)
    bar = session.progress.bar(label, count)
    round_ = session.round_id("l")
    bar.update(0, "prefilling")
    await session.reset()
    await session.prefill(round_, 0, backlog)
    fed = backlog
    refills = 0

    async def feed() -> None:
        # Keeps at most ``backlog`` tasks queued instead of publishing them all first: a
        # million queued tasks and their events would take minutes and gigabytes of disk.
        nonlocal fed, refills
        while fed < count:
            published, done = await session.tasks_done()
            queued = published - done
            if queued < backlog // 2:
                top_up = min(count, fed + backlog - queued)
                # The worker's events are not read by anyone here; dropping them keeps
                # the store's size flat however long the run.
                await session.js.api(f"STREAM.PURGE.{wire.EVENT_STREAM}")
                await session.prefill(round_, fed, top_up)
                fed = top_up
                refills += 1
            await trio.sleep(_WATCH_INTERVAL)

    argv = _python(
        _CONTESTANTS,
        "longrun",
        "--url",
        session.url,
        "--count",
        count,
        "--concurrency",
        sizes.window,
        "--sample-every",
        sample_every,
        *(arg for mark in marks for arg in ("--mark", mark)),
    )
    bar.update(0, "running")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        figures = await session.run_watched(label, argv, bar, count)
        nursery.cancel_scope.cancel()
    await session.check_acked(label, count)
    bar.finish(f"{figures['rate']:,.0f} tasks/s")
    return {
        "tasks": count,
        "growth_from": sizes.growth_from_task,
        "backlog": backlog,
        "refills": refills,
        "sample_every": sample_every,
        "runs": [figures],
    }


async def _loss(session: Session) -> dict[str, Any]:
    """Each drain contestant against a server without the events stream, for a while.

    No completion event can be stored, so a task a contestant acknowledged (or
    terminated) is lost: it is gone from the work queue with no outcome anywhere. A task
    still in the task stream when the contestant is stopped is kept.
    """
    sizes = session.sizes
    count, seconds, url = sizes.loss_tasks, sizes.loss_seconds, session.url
    contestants, skipped = _chosen(session)
    runs: dict[str, dict[str, Any]] = {}
    for contestant in contestants:
        label = session.label(contestant.name, 0, 1)
        bar = session.progress.bar(label, count)
        bar.update(0, "prefilling")
        await session.reset()
        await session.js.api(f"STREAM.DELETE.{wire.EVENT_STREAM}")
        await session.prefill(session.round_id(f"x{contestant.key}"), 0, count, contestant.message)
        bar.update(0, f"running {seconds:g} s without an events stream")
        argv = [*contestant.argv, "--url", url, "--count", str(count)]
        async with spawn(label, argv) as process:
            with trio.move_on_after(seconds):
                await process._exited()
            returncode = process.process.returncode if process.process else None
            # Leaving the block stops it (SIGTERM, then SIGKILL): what it left unsettled
            # stays in the stream for redelivery.
        published, removed = await session.tasks_done()
        kept = published - removed
        # Put the events stream back for the next contestant.
        await natrio.provision(session.nc, storage="file")
        ended = "still running when stopped" if returncode is None else f"exited {returncode}"
        runs[contestant.key] = {
            "tasks": count,
            "published": published,
            "kept": kept,
            "lost": published - kept,
            "ended": ended,
        }
        bar.update(removed)
        bar.finish(f"{published - kept:,} lost, {kept:,} kept ({ended})")
    return {
        "tasks": count,
        "seconds": seconds,
        "names": {c.key: c.name for c in contestants},
        "skipped": skipped,
        "runs": runs,
    }


_RUNNERS = {
    "drain": _drain,
    "roundtrip": _roundtrip,
    "concurrency": _concurrency,
    "longrun": _longrun,
    "loss": _loss,
}


async def run_bench(config: BenchConfig, progress: Progress) -> dict[str, Any]:
    """Run the configured scenarios, each on a server of its own; their raw figures by name.

    Raises:
        BenchError: when a contestant fails (:class:`ContestantFailed`), stalls, or does
            not do all of its work.
    """
    unknown = set(config.scenarios) - set(SCENARIOS)
    if unknown:
        raise BenchError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    with _unwrapped():
        for name in config.scenarios:
            async with _session(name, config, progress) as session:
                results[name] = await _RUNNERS[name](session)
    return results
