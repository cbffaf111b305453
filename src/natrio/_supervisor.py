"""Several worker processes from one command (``natrio worker --processes N``).

Two layers:

- :class:`RestartPolicy` decides, free of I/O and of clocks, what happens when a process
  exits: wait this long and start it again (exponential backoff with a cap), or give up
  on it because it keeps dying before it is ready.
- :class:`Supervisor` runs the processes under Trio: starts them, passes their output
  through (each line prefixed with the process's index), restarts those that exit as the
  policy says, and on :meth:`Supervisor.stop` sends every process the signal and kills
  those still running after their grace and a margin. :func:`run_supervisor` runs one
  until SIGINT or SIGTERM, which it passes on.

The protocol between the supervisor and a process it runs (the child):

- the child gets its index (0 to N-1) in ``$NATRIO_WORKER_INDEX``;
- once it serves, it prints one line on stdout, :data:`READY_PREFIX` and a JSON object
  with its ``worker_id`` and ``grace`` (:func:`report_ready`); the supervisor reads that
  line instead of passing it through. Exiting before that line is a failure at start-up;
- its stdin is a pipe the supervisor never writes to: end of file there means the
  supervisor is gone, and the child stops gracefully (:func:`stop_when_supervisor_gone`),
  so no worker outlives a supervisor that was killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import attrs
import trio

from ._errors import ConfigurationError, SupervisorError
from ._util import single_error

__all__ = [
    "INDEX_ENV",
    "READY_PREFIX",
    "ChildStatistics",
    "RestartPolicy",
    "SlotHistory",
    "Supervisor",
    "cpu_count",
    "describe_exit",
    "report_ready",
    "run_supervisor",
    "stop_when_supervisor_gone",
]

log = logging.getLogger("natrio.supervisor")

#: The environment variable that gives each child its index, ``0`` to ``N-1``.
INDEX_ENV = "NATRIO_WORKER_INDEX"
#: What a child's ready line on stdout starts with; a JSON object follows.
READY_PREFIX = "NATRIO-SUPERVISED-READY "

#: Seconds a child's shutdown may take beyond its grace before it is killed: a worker's
#: ``run()`` returns within grace + 1 s, then the connection closes and Python exits.
KILL_MARGIN = 5.0
# Seconds the output of a child that exited is still read: a process it started may
# hold its pipes open after it is gone.
_DRAIN_AFTER_EXIT = 2.0
# A line longer than this is passed on in pieces rather than buffered without bound.
_MAX_LINE = 64 * 1024


def cpu_count() -> int:
    """The CPUs this process may run on (``--processes auto``).

    ``os.process_cpu_count()`` where Python has it (3.13), else the scheduler's affinity
    mask, else ``os.cpu_count()``; at least 1.
    """
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        counted: int | None = counter()
        return max(1, counted or 1)
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


# -- the decision ------------------------------------------------------------------------


@attrs.frozen
class SlotHistory:
    """What the policy remembers about one process slot between its exits."""

    #: Exits in a row since the slot last ran long enough to count as healthy: the
    #: backoff's exponent.
    exits: int = 0
    #: Exits in a row before the process reported ready.
    start_failures: int = 0


def _positive(name: str) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < math.inf
        ):
            raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")

    return check


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen
class RestartPolicy:
    """When to restart a worker process that exited, and when to give up on it.

    A process that exits is started again after ``first_delay`` seconds, then twice as
    long (``factor``) after each further exit in a row, at most ``max_delay``. A process
    that had been ready for ``healthy_after`` seconds when it exited starts the backoff
    over. One that exits before it reports ready ``max_start_failures`` times in a row
    (a factory that raises, a server that cannot be reached) is given up on: it would
    only keep failing. Raises ConfigurationError for invalid values.
    """

    first_delay: float = attrs.field(default=0.5, validator=_positive("first_delay"))
    max_delay: float = attrs.field(default=30.0, validator=_positive("max_delay"))
    factor: float = attrs.field(default=2.0)
    max_start_failures: int = attrs.field(default=3, validator=_at_least_one)
    healthy_after: float = attrs.field(default=60.0, validator=_positive("healthy_after"))

    @factor.validator
    def _check_factor(self, attribute: attrs.Attribute[float], value: float) -> None:
        _positive("factor")(self, attribute, value)
        if value < 1:
            raise ConfigurationError(f"factor must be >= 1, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.first_delay:
            raise ConfigurationError(
                f"max_delay ({self.max_delay!r}) must be >= first_delay ({self.first_delay!r})"
            )

    def delay(self, exits: int) -> float:
        """Seconds to wait before the restart that follows ``exits`` exits in a row."""
        if exits < 1:
            return 0.0
        # Capped before it is raised to a power so that long runs of exits cannot overflow.
        exponent = min(exits - 1, 64)
        return min(self.max_delay, self.first_delay * self.factor**exponent)

    def after_exit(
        self, history: SlotHistory, ready_for: float | None
    ) -> tuple[SlotHistory, float | None]:
        """A process exited: the slot's new history, and the seconds to wait before
        starting it again, or None to give up.

        ``ready_for`` is how long it had been ready when it exited; None if it never
        reported ready.
        """
        if ready_for is None:
            failures = history.start_failures + 1
            updated = SlotHistory(history.exits + 1, failures)
            if failures >= self.max_start_failures:
                return updated, None
            return updated, self.delay(updated.exits)
        exits = 1 if ready_for >= self.healthy_after else history.exits + 1
        updated = SlotHistory(exits, 0)
        return updated, self.delay(exits)


# -- the processes -----------------------------------------------------------------------

#: Receives each line a child prints: (its index, the line without its newline, whether
#: it came from stderr).
Output = Callable[[int, str, bool], None]


def _pass_through(index: int, line: str, stderr: bool) -> None:
    stream = sys.stderr if stderr else sys.stdout
    stream.write(f"[{index}] {line}\n")
    stream.flush()


def _tell(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def describe_exit(returncode: int) -> str:
    """``exited with status 1``, or ``was killed by SIGKILL`` for a negative status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@attrs.frozen
class ChildStatistics:
    """A snapshot of one process slot."""

    index: int
    #: The running process's pid; None between a death and its restart.
    pid: int | None
    ready: bool
    #: The worker id its ready line reported (the last one, after a restart).
    worker_id: str | None
    #: How often the slot's process was started again.
    restarts: int


@attrs.define(eq=False)
class _Child:
    index: int
    process: trio.Process
    ready_at: float | None = None  # trio clock
    worker_id: str | None = None
    grace: float | None = None
    killed: bool = False
    stdout_done: trio.Event = attrs.Factory(trio.Event)
    stderr_done: trio.Event = attrs.Factory(trio.Event)


class Supervisor:
    """Runs ``processes`` copies of a command, restarting those that exit, until stopped.

    ``command(index)`` gives the argv of process ``index``; it runs with ``env`` (default:
    this process's environment) plus ``$NATRIO_WORKER_INDEX``, and must follow the
    protocol in this module's docstring. ``grace`` is how long a process may take to stop
    when it has not reported its own grace yet (default 30 s, a worker's default
    ``shutdown_grace``). Each line the processes print goes to ``output`` (default: this
    process's stdout or stderr, prefixed ``[index] ``), and the supervisor's own messages
    to ``tell`` (default: stderr).
    """

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        processes: int,
        *,
        policy: RestartPolicy | None = None,
        grace: float | None = None,
        kill_margin: float = KILL_MARGIN,
        env: Mapping[str, str] | None = None,
        output: Output | None = None,
        tell: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigurationError(f"processes must be an int >= 1, got {processes!r}")
        if grace is not None and not 0 <= grace < math.inf:
            raise ConfigurationError(f"grace must be a finite number >= 0, got {grace!r}")
        if not 0 <= kill_margin < math.inf:
            raise ConfigurationError(
                f"kill_margin must be a finite number >= 0, got {kill_margin!r}"
            )
        self.processes = processes
        self.policy = policy or RestartPolicy()
        self.grace = 30.0 if grace is None else float(grace)
        self.kill_margin = float(kill_margin)
        self._command = command
        self._env = dict(os.environ if env is None else env)
        self._output = output or _pass_through
        self._tell = tell or _tell
        self._children: dict[int, _Child] = {}
        self._restarts = [0] * processes
        self._ever_ready: set[int] = set()
        self._all_ready = trio.Event()
        self._stopping = trio.Event()
        self._signum: int = signal.SIGTERM
        self._gave_up: str | None = None
        self._unclean: list[str] = []
        self._started = False

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every process: send it ``signum``, kill it if it is still running after
        its grace and the margin. Safe to call more than once (the first signal is used)
        and before :meth:`run`."""
        if not self._stopping.is_set():
            self._signum = signum
            self._stopping.set()

    def statistics(self) -> tuple[ChildStatistics, ...]:
        """A snapshot of every process slot, by index."""
        shown = []
        for index in range(self.processes):
            child = self._children.get(index)
            pid, ready, worker_id = None, False, None
            if child is not None:
                worker_id = child.worker_id
                if child.process.returncode is None:
                    pid, ready = child.process.pid, child.ready_at is not None
            shown.append(ChildStatistics(index, pid, ready, worker_id, self._restarts[index]))
        return tuple(shown)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the processes until :meth:`stop` and until every one of them has exited.

        Works with ``nursery.start``: started once each process has reported ready once
        (or once stopped before that). Cancelling it kills the processes.

        Raises:
            SupervisorError: when a process kept dying before it was ready (the others
                are stopped first), could not be started, or did not stop cleanly when
                stopped (killed after its grace, or a status other than 0).
        """
        if self._started:
            raise RuntimeError("a Supervisor runs once")
        self._started = True
        with single_error():
            async with trio.open_nursery() as nursery:
                for index in range(self.processes):
                    nursery.start_soon(self._slot, index)
                async with trio.open_nursery() as waiting:
                    # Whichever comes first: every process ready, or a stop (a signal, or
                    # a process given up on).
                    async def until(event: trio.Event) -> None:
                        await event.wait()
                        waiting.cancel_scope.cancel()

                    waiting.start_soon(until, self._all_ready)
                    waiting.start_soon(until, self._stopping)
                if self._gave_up is None:
                    task_status.started()
        if self._gave_up is not None:
            raise SupervisorError(self._gave_up)
        if self._unclean:
            raise SupervisorError("; ".join(self._unclean))

    # -- one slot ------------------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        history = SlotHistory()
        while not self._stopping.is_set():
            child = await self._start(index)
            if child is None:
                return
            returncode = await self._watch(child)
            how = describe_exit(returncode)
            if self._stopping.is_set():
                if child.killed:
                    self._unclean.append(
                        f"worker process {index} (pid {child.process.pid}) did not stop within "
                        f"{self._grace_of(child) + self.kill_margin:g} s and was killed"
                    )
                elif returncode != 0 and child.ready_at is not None:
                    # One that was still starting may die of the signal before it could
                    # handle it: it served nothing, so nothing was cut short.
                    self._unclean.append(
                        f"worker process {index} (pid {child.process.pid}) {how} as it stopped"
                    )
                return
            ready_for = None if child.ready_at is None else trio.current_time() - child.ready_at
            history, delay = self.policy.after_exit(history, ready_for)
            if delay is None:
                self._give_up(
                    f"worker process {index} {how} before it was ready, "
                    f"{history.start_failures} times in a row; giving up "
                    f"(its output above says why)"
                )
                return
            self._say(
                f"worker process {index} (pid {child.process.pid}) {how}; "
                f"starting it again in {delay:g} s"
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if not self._stopping.is_set():
                self._restarts[index] += 1

    def _give_up(self, reason: str) -> None:
        if self._gave_up is None:
            self._gave_up = reason
        self.stop()

    def _grace_of(self, child: _Child) -> float:
        return child.grace if child.grace is not None else self.grace

    async def _start(self, index: int) -> _Child | None:
        argv = list(self._command(index))
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**self._env, INDEX_ENV: str(index)},
            )
        except OSError as exc:
            self._give_up(f"could not start worker process {index} ({argv[0]}): {exc}")
            return None
        child = _Child(index, process)
        self._children[index] = child
        self._say(f"worker process {index} started (pid {process.pid})")
        return child

    async def _watch(self, child: _Child) -> int:
        """Read the child's output until it exits; stop it when the supervisor stops."""
        process = child.process
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, child, process.stdout, False)
                nursery.start_soon(self._read, child, process.stderr, True)
                nursery.start_soon(self._stop_when_asked, child)
                returncode = await process.wait()
                with trio.move_on_after(_DRAIN_AFTER_EXIT):
                    await child.stdout_done.wait()
                    await child.stderr_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    # Cancelled from outside: nothing waits for it any more.
                    process.kill()
                    await process.wait()
                for stream in (process.stdin, process.stdout, process.stderr):
                    if stream is not None:
                        await stream.aclose()
        return returncode

    async def _stop_when_asked(self, child: _Child) -> None:
        await self._stopping.wait()
        process = child.process
        if process.returncode is None:
            process.send_signal(self._signum)
        limit = self._grace_of(child) + self.kill_margin
        with trio.move_on_after(limit):
            await process.wait()
        if process.returncode is None:
            self._say(
                f"worker process {child.index} (pid {process.pid}) still running "
                f"{limit:g} s after {signal.Signals(self._signum).name}; killing it"
            )
            child.killed = True
            process.kill()

    async def _read(self, child: _Child, stream: trio.abc.ReceiveStream, stderr: bool) -> None:
        buffer = bytearray()
        try:
            # Ends at EOF, once the process and whatever inherited its pipes are gone (or
            # is cancelled by _watch when that takes too long).
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                async for chunk in stream:
                    buffer += chunk
                    while (end := buffer.find(b"\n")) >= 0 or len(buffer) >= _MAX_LINE:
                        cut = end if end >= 0 else _MAX_LINE
                        line = bytes(buffer[:cut])
                        del buffer[: cut + 1 if end >= 0 else cut]
                        self._line(child, line.decode("utf-8", "replace"), stderr)
            if buffer:
                self._line(child, buffer.decode("utf-8", "replace"), stderr)
        finally:
            (child.stderr_done if stderr else child.stdout_done).set()

    def _line(self, child: _Child, line: str, stderr: bool) -> None:
        # Looked for anywhere in the line: output the process left without a newline
        # comes first.
        head, marker, ready = line.partition(READY_PREFIX)
        if not stderr and marker and child.ready_at is None:
            try:
                report = json.loads(ready)
                worker_id = str(report["worker_id"])
                grace = float(report["grace"])
            except (ValueError, KeyError, TypeError):
                self._pass(child.index, line, stderr)
                return
            if head:
                self._pass(child.index, head, stderr)
            child.ready_at = trio.current_time()
            child.worker_id = worker_id
            child.grace = grace if 0 <= grace < math.inf else None
            self._ever_ready.add(child.index)
            if len(self._ever_ready) == self.processes:
                self._all_ready.set()
            return
        self._pass(child.index, line, stderr)

    def _pass(self, index: int, line: str, stderr: bool) -> None:
        # Whoever read the output may be gone (a closed pipe), or unable to show it (a
        # locale without the characters): the workers keep running either way.
        with contextlib.suppress(OSError, UnicodeError):
            try:
                self._output(index, line, stderr)
            except UnicodeError:
                self._output(index, line.encode("ascii", "backslashreplace").decode(), stderr)

    def _say(self, message: str) -> None:
        with contextlib.suppress(OSError, UnicodeError):  # as in _pass
            self._tell(message)


async def run_supervisor(
    supervisor: Supervisor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``supervisor`` until SIGINT or SIGTERM, which it passes on to every process.

    Works with ``nursery.start`` (started once every process is ready). Must be called
    from the main thread. Raises what :meth:`Supervisor.run` raises.
    """
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        single_error(),
    ):
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("received %s; passing it on to the worker processes", name)
                    supervisor.stop(signum)

            nursery.start_soon(on_signals)
            try:
                await supervisor.run(task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()


# -- the child's side --------------------------------------------------------------------


def report_ready(worker_id: str, grace: float) -> None:
    """Tell the supervisor this child serves (a line on stdout), and how long its
    shutdown may take."""
    line = json.dumps({"worker_id": worker_id, "grace": grace})
    sys.stdout.write(f"{READY_PREFIX}{line}\n")
    sys.stdout.flush()


async def stop_when_supervisor_gone(stop: Callable[[], None]) -> None:
    """Call ``stop`` once stdin reaches its end: the supervisor that holds the other end
    of the pipe has exited (or was killed)."""
    # A duplicate of fd 0, so that closing the stream leaves sys.stdin's descriptor alone.
    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        while await stdin.receive_some():
            pass  # the supervisor never writes; anything that comes is ignored
    log.warning("the supervisor is gone (end of stdin); stopping")
    # Nobody reads the pipes to the supervisor any more: a write to them would raise
    # BrokenPipeError in the middle of the shutdown.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)
    stop()
