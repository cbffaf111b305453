"""Worker processes for the tests that run real ones: ``python -m <module> URL [args]``.

A :class:`WorkerPool` starts them (each prints ``READY <worker_id>`` once serving), reads
every line they print as it comes (so the pipe never fills), and kills and reaps them all
on the way out of :meth:`WorkerPool.running`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Self

import attrs
import trio

REPO_ROOT = Path(__file__).resolve().parents[1]

Line = tuple[float, str]  # when it was read (trio clock), and the line


class WorkerProcess:
    """One worker process and every line it printed, with when each was read."""

    def __init__(
        self, process: trio.Process, name: str, on_line: Callable[[str], None] | None = None
    ) -> None:
        self.process = process
        self.name = name
        self.on_line = on_line
        self.lines: list[str] = []
        self.read_at: list[float] = []  # trio clock, one for each line
        self.worker_id = ""
        self.ended = trio.Event()  # its stdout closed: every line it printed is in ``lines``
        self._new_line = trio.Event()
        self._next = 0  # where :meth:`expect` looks from

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def read(self) -> None:
        """Collect stdout line by line until it closes, passing each line to ``on_line``."""
        assert self.process.stdout is not None
        buffer = bytearray()
        try:
            with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                while chunk := await self.process.stdout.receive_some():
                    now = trio.current_time()
                    buffer.extend(chunk)
                    while (end := buffer.find(b"\n")) >= 0:
                        line = buffer[:end].decode("utf-8", errors="replace")
                        del buffer[: end + 1]
                        self.lines.append(line)
                        self.read_at.append(now)
                        if self.on_line is not None:
                            self.on_line(line)
                    self._new_line.set()
                    self._new_line = trio.Event()
        finally:
            self.ended.set()
            self._new_line.set()

    async def line(self, match: Callable[[str], bool] | str, *, after: int = 0) -> int:
        """The index of the first line from ``after`` on that ``match`` accepts (a str:
        that starts with it), waiting for it; fails if the process ends first."""
        accept = match if callable(match) else (lambda line: line.startswith(match))
        while True:
            for index in range(after, len(self.lines)):
                if accept(self.lines[index]):
                    return index
            after = len(self.lines)
            if self.ended.is_set():
                raise AssertionError(
                    f"worker process {self.name} ended (status {self.process.returncode}) "
                    f"without printing {match!r}; it printed {self.lines[-20:]}"
                )
            await self._new_line.wait()

    async def expect(self, prefix: str) -> Line:
        """The next line starting with ``prefix`` after the one ``expect`` last returned,
        and when it was read; fails if the process ends first."""
        index = await self.line(prefix, after=self._next)
        self._next = index + 1
        return self.read_at[index], self.lines[index]


@attrs.define(eq=False)
class WorkerPool:
    """Starts ``python -m <module> <url> [args]`` processes; see :meth:`running`.

    ``named``: the first argument is the worker's name (else its pid names it in
    failures); ``on_line`` gets every line of every process as it is read.
    """

    url: str
    module: str
    ready_within: float = 30.0  # a process this long to print READY is broken, not slow
    named: bool = False
    on_line: Callable[[str], None] | None = None
    processes: list[WorkerProcess] = attrs.field(factory=list, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    @property
    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.processes if w.alive]

    def by_id(self, worker_id: str) -> WorkerProcess:
        return next(w for w in self.processes if w.worker_id == worker_id)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """The pool, ready to start processes; all are killed and reaped on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    with trio.CancelScope(shield=True):
                        for worker in self.processes:
                            if worker.alive:
                                worker.process.kill()
                        for worker in self.processes:
                            await worker.process.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for worker in self.processes:
                    if worker.process.stdout is not None:
                        await worker.process.stdout.aclose()

    async def start(self, *args: str) -> WorkerProcess:
        """Start a worker process and return once it printed ``READY``."""
        assert self._nursery is not None, "start processes inside running()"
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", self.module, self.url, *args],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        worker = WorkerProcess(process, args[0] if self.named else str(process.pid), self.on_line)
        self.processes.append(worker)
        self._nursery.start_soon(worker.read)
        with trio.fail_after(self.ready_within):
            _, ready = await worker.expect("READY ")
        worker.worker_id = ready.split()[1]
        return worker

    async def start_all(self, *specs: tuple[str, ...]) -> list[WorkerProcess]:
        """Start several workers at once (each spec: the arguments of :meth:`start`), in
        that order."""
        started: dict[int, WorkerProcess] = {}

        async def one(index: int, spec: tuple[str, ...]) -> None:
            started[index] = await self.start(*spec)

        async with trio.open_nursery() as nursery:
            for index, spec in enumerate(specs):
                nursery.start_soon(one, index, spec)
        return [started[index] for index in range(len(specs))]

    async def kill(self, worker: WorkerProcess) -> float:
        """SIGKILL ``worker`` and reap it; the ``time.time()`` it was known dead. Returns
        once all it printed was read."""
        worker.process.send_signal(signal.SIGKILL)
        await worker.process.wait()
        dead_at = time.time()
        await worker.ended.wait()
        return dead_at

    async def terminate(self, worker: WorkerProcess, within: float) -> None:
        """SIGTERM ``worker``; it must exit with status 0 within ``within`` s, output read."""
        worker.process.send_signal(signal.SIGTERM)
        with trio.fail_after(within):
            status = await worker.process.wait()
            await worker.ended.wait()
        assert status == 0, f"worker {worker.worker_id} exited with status {status}"
