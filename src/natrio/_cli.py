"""The ``natrio`` command line: a development server, a worker runner, task submission,
signals and streamed output, and the worker directory.

Built only on natrio's public API, so it is also an example of using it from Trio: each
command that talks to NATS runs its async body with :func:`trio.run`. Errors natrio raises
become a one-line message on stderr and exit status 1 (2 for configuration and usage
errors) instead of a traceback.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import click
import trio
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

import natrio

from ._routing.claims import unheld_claims

__all__ = ["WorkerFactory", "cli", "load_worker_factory", "main", "make_worker"]

DEFAULT_URL = "nats://127.0.0.1:4222"
URL_ENV_VAR = "NATRIO_URL"

P = ParamSpec("P")
R = TypeVar("R")

#: What ``natrio worker MODULE:ATTRIBUTE`` expects ``ATTRIBUTE`` to be.
WorkerFactory = Callable[[natrio.Connection], natrio.Worker | Awaitable[natrio.Worker]]

_FACTORY_CONTRACT = (
    "it must be a function taking a natrio.Connection and returning a natrio.Worker "
    "(or an async function returning one)"
)


# -- output -------------------------------------------------------------------------------


def _console(*, stderr: bool = False) -> Console:
    # Made per call, not at import, so it writes to whatever sys.stdout/sys.stderr are now
    # (CliRunner swaps them). Off a terminal the width is generous: rich would otherwise
    # wrap or truncate at 80 columns, breaking long worker ids for grep and scripts.
    console = Console(stderr=stderr, soft_wrap=True, highlight=False)
    if not console.is_terminal:
        console.width = 400
    return console


def _say(message: str, style: str = "") -> None:
    """Chatter for humans goes to stderr, leaving stdout to what scripts read."""
    _console(stderr=True).print(Text(message, style=style))


def _fail(message: str, code: int = 1) -> NoReturn:
    _console(stderr=True).print(Text(f"Error: {message}", style="bold red"))
    raise click.exceptions.Exit(code)


class _CommandError(Exception):
    """A failure a command reports itself (not one of natrio's), with its exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _single(exc: BaseException) -> BaseException:
    # Nurseries wrap even a lone failure in an ExceptionGroup; report the failure itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn natrio's errors into a message and an exit status instead of a traceback."""
    try:
        yield
    except (natrio.NatrioError, _CommandError, KeyboardInterrupt, BaseExceptionGroup) as raised:
        exc = _single(raised)
        if isinstance(exc, KeyboardInterrupt):
            raise click.exceptions.Exit(130) from None
        if isinstance(exc, _CommandError):
            _fail(str(exc), exc.code)
        if isinstance(exc, natrio.ConfigurationError):
            _fail(_headline(exc), 2)
        if isinstance(exc, natrio.JetStreamError) and exc.err_code == _STREAM_NOT_FOUND:
            _fail(f"{exc} (is the server provisioned? run `natrio provision`)", 1)
        if isinstance(exc, natrio.NatrioError):
            _fail(_headline(exc), 1)
        raise


_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ ")
# JetStream's "stream not found" error number (documented on natrio.JetStreamError).
_STREAM_NOT_FOUND = 10059


def _headline(exc: BaseException) -> str:
    """One line for an error whose message may run on (ServerError appends the server's log)."""
    first, *rest = (str(exc) or type(exc).__name__).splitlines()
    # nats-server's own fatal or error line says why better than anything else in the log.
    reasons = [line for line in rest if "[FTL]" in line or "[ERR]" in line]
    if reasons:
        first = f"{first}: {_LOG_PREFIX.sub('', reasons[-1])}"
    return first


def _run(async_fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run one command's async body under Trio, reporting natrio's errors.

    Log records below ERROR are dropped unless logging is already set up (``natrio
    worker`` sets it up): a one-shot command's failure is its final message, and the
    connection's retry warnings before it would only repeat it.
    """
    with _reported_errors(), _logging_to_stderr("error", only_if_unset=True):
        return trio.run(functools.partial(async_fn, *args, **kwargs))


# -- shared options -----------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _connection_options(command: F) -> F:
    """``--url`` and ``--connect-timeout``, for every command that talks to NATS."""
    command = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=5.0,
        show_default=True,
        help="Seconds to wait for the first connection before giving up.",
    )(command)
    command = click.option(
        "--url",
        envvar=URL_ENV_VAR,
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="NATS server URL (several may be given, comma-separated).",
    )(command)
    return command


def _urls(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


# -- the group ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(natrio.__version__, prog_name="natrio")
def cli() -> None:
    """natrio: run Trio workers for NATS JetStream tasks, submit tasks, send signals,
    follow streamed output, inspect workers.

    Commands that talk to NATS take --url (default: $NATRIO_URL, else
    nats://127.0.0.1:4222). Errors exit with status 1, usage and configuration
    errors with status 2.
    """


def main() -> None:
    """Entry point of the ``natrio`` console script and of ``python -m natrio``."""
    cli(prog_name="natrio")


# -- natrio server ------------------------------------------------------------------------


@cli.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=4222,
    show_default=True,
    help="Client port on 127.0.0.1; 0 picks a free one (the URL printed says which).",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="JetStream storage directory (kept). Default: a temporary directory, removed on exit.",
)
@click.option(
    "--provision/--no-provision",
    default=True,
    show_default=True,
    help="Create natrio's streams and buckets once the server is up.",
)
def server(port: int, store_dir: str | None, provision: bool) -> None:
    """Run a local nats-server with JetStream, for development.

    Listens on 127.0.0.1 only. Once the server is ready (and provisioned, unless
    --no-provision), its URL is printed on stdout as a line of its own, so scripts
    can read it; everything else goes to stderr. Runs until SIGINT or SIGTERM, then
    stops the server.
    """
    _run(_serve, port, store_dir, provision)


async def _serve(port: int, store_dir: str | None, provision: bool) -> None:
    # Opened first so that a signal arriving during start-up stops the server once it is
    # up, instead of killing this process and orphaning nats-server.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with natrio.embedded_server(port=port, store_dir=store_dir) as srv:
            if provision:
                async with natrio.connect(srv.url, name="natrio server") as nc:
                    await natrio.provision(nc)
            _say(
                f"nats-server {srv.pid} listening on {srv.url} "
                f"(JetStream store {srv.store_dir}"
                f"{'' if provision else ', not provisioned'}); Ctrl-C to stop",
                "green",
            )
            click.echo(srv.url)
            async for signum in signals:
                _say(f"received {signal.Signals(signum).name}; stopping nats-server")
                break
    _say("nats-server stopped")


# -- natrio provision ---------------------------------------------------------------------


@cli.command()
@_connection_options
def provision(url: str, connect_timeout: float) -> None:
    """Create or update natrio's streams and KV buckets on a server (idempotent).

    Needed once per server before workers and clients use it; `natrio server` does it
    for you.
    """
    _run(_provision, url, connect_timeout)


async def _provision(url: str, connect_timeout: float) -> None:
    async with natrio.connect(
        _urls(url), connect_timeout=connect_timeout, name="natrio provision"
    ) as nc:
        await natrio.provision(nc)
        _say(f"provisioned {nc.url}", "green")


# -- natrio worker ------------------------------------------------------------------------


def load_worker_factory(spec: str, app_dir: str | None = None) -> WorkerFactory:
    """Import ``MODULE:ATTRIBUTE`` and return the worker factory it names.

    ``app_dir`` (default: the current directory) is put first on ``sys.path``, so
    modules next to where the command runs are found, as uvicorn does. ``ATTRIBUTE`` may
    be dotted (``module:obj.factory``). Only checks that it is callable; what it returns
    is checked by :func:`make_worker`.

    Raises:
        ConfigurationError: for a malformed spec, a module that cannot be imported (or
            raises while importing), a missing attribute or one that is not callable.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise natrio.ConfigurationError(
            f"{spec!r} is not MODULE:ATTRIBUTE (for example myapp.tasks:make_worker)"
        )
    directory = os.path.abspath(app_dir if app_dir is not None else os.curdir)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing module named by the spec is the spec's fault; a missing import
        # inside the user's module is a bug there, reported with its location.
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise natrio.ConfigurationError(
                f"could not import module {module_name!r}: {exc} (looked in {directory} and sys.path)"
            ) from None
        raise natrio.ConfigurationError(_import_failure(module_name, exc)) from None
    except Exception as exc:
        raise natrio.ConfigurationError(_import_failure(module_name, exc)) from None
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise natrio.ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if isinstance(target, natrio.Worker) or not callable(target):
        raise natrio.ConfigurationError(
            f"{spec} is not a worker factory (it is {type(target).__name__} {target!r}): "
            f"{_FACTORY_CONTRACT}"
        )
    return cast(WorkerFactory, target)


def _import_failure(module_name: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"error while importing {module_name!r}: {type(exc).__name__}: {exc}{where}"


async def make_worker(
    factory: WorkerFactory, nc: natrio.Connection, spec: str = ""
) -> natrio.Worker:
    """Call a worker factory with ``nc`` (awaiting it if it is async) and check the result.

    Raises:
        ConfigurationError: if it does not produce a :class:`natrio.Worker`.
    """
    name = spec or getattr(factory, "__qualname__", repr(factory))
    produced: object = factory(nc)
    if inspect.isawaitable(produced):
        produced = await produced
    if not isinstance(produced, natrio.Worker):
        raise natrio.ConfigurationError(
            f"{name} returned {type(produced).__name__}, not a natrio.Worker: {_FACTORY_CONTRACT}"
        )
    return produced


@cli.command()
@click.argument("spec", metavar="MODULE:ATTRIBUTE")
@_connection_options
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds running tasks get to finish on SIGINT/SIGTERM. "
    "Default: the worker's shutdown_grace.",
)
@click.option(
    "--app-dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory put first on sys.path to import MODULE from. Default: the current directory.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Level of the log written to stderr.",
)
def worker(
    spec: str,
    url: str,
    connect_timeout: float,
    grace: float | None,
    app_dir: str | None,
    log_level: str,
) -> None:
    """Run a worker until SIGINT or SIGTERM.

    MODULE:ATTRIBUTE names a worker factory: a function taking a natrio.Connection
    and returning a natrio.Worker with its handlers registered (it may be async).
    The command imports MODULE (the current directory comes first on sys.path),
    connects, calls the factory and runs the worker. For example, in myapp.py:

    \b
        def make_worker(nc: natrio.Connection) -> natrio.Worker:
            worker = natrio.Worker(nc, concurrency=8)
            @worker.handle("echo")
            async def echo(ctx: natrio.TaskContext) -> bytes:
                return ctx.input
            return worker

    then `natrio worker myapp:make_worker`. The worker id is printed to stderr once
    the worker is pulling tasks and registered. On SIGINT or SIGTERM it stops taking
    tasks, gives running ones --grace seconds, and exits with status 0.
    """
    with _reported_errors():
        factory = load_worker_factory(spec, app_dir)
    with _logging_to_stderr(log_level):
        _run(_work, spec, factory, _urls(url), connect_timeout, grace)


@contextmanager
def _logging_to_stderr(level: str, *, only_if_unset: bool = False) -> Iterator[None]:
    """Send log records to stderr for the duration; undone after, for in-process callers."""
    root = logging.getLogger()
    if only_if_unset and root.handlers:
        yield
        return
    console = _console(stderr=True)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        # RichHandler pads every line to the console width: plain lines suit files and pipes.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def _work(
    spec: str, factory: WorkerFactory, urls: list[str], connect_timeout: float, grace: float | None
) -> None:
    # Until run_worker installs its own handlers, a signal means "give up": there is
    # nothing to drain yet, and waiting out a connect timeout would feel like a hang.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def give_up_on_signal() -> None:
                async for signum in signals:
                    _say(f"received {signal.Signals(signum).name} before the worker started")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(give_up_on_signal)
            async with natrio.connect(
                urls, connect_timeout=connect_timeout, name=f"natrio worker {spec}"
            ) as nc:
                built = await make_worker(factory, nc, spec)
                async with trio.open_nursery() as inner:
                    await inner.start(functools.partial(natrio.run_worker, built, grace=grace))
                    # Printed only now, so it means "pulling and registered" to whoever waits
                    # for it (scripts, tests).
                    _say(
                        f"worker {built.worker_id} started: task types "
                        f"{', '.join(built.task_types)}; groups {', '.join(built.groups)}; "
                        f"connected to {nc.url}",
                        "green",
                    )
            _say(f"worker {built.worker_id} stopped")
            nursery.cancel_scope.cancel()


# -- natrio submit ------------------------------------------------------------------------


def _json_payload(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes:
    if value is None:
        return b""
    if value == "-":
        value = sys.stdin.read()
    try:
        json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    return value.encode("utf-8")


@cli.command()
@click.argument("task_type", metavar="TYPE")
@click.argument("payload", metavar="[JSON]", required=False, callback=_json_payload)
@_connection_options
@click.option("--group", default=None, help="Worker group to send the task to. Default: default.")
@click.option("--run-id", default=None, help="Run id. Default: a random one.")
@click.option("--step-id", default=None, help="Step id. Default: the task type.")
@click.option("--key", default=None, help="Partition key (partitioned types). Default: the run id.")
@click.option("--target", default=None, help="Run only on a worker holding this claim.")
@click.option(
    "--soft", is_flag=True, help="With --target: any worker may run it while no holder is alive."
)
@click.option("--wait", is_flag=True, help="Wait for the task's outcome and print its output.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --wait: give up after this many seconds (exit status 1). Default: wait forever.",
)
def submit(
    task_type: str,
    payload: bytes,
    url: str,
    connect_timeout: float,
    group: str | None,
    run_id: str | None,
    step_id: str | None,
    key: str | None,
    target: str | None,
    soft: bool,
    wait: bool,
    timeout: float | None,
) -> None:
    """Submit a task of type TYPE with a JSON payload.

    JSON (default: an empty payload; `-` reads it from stdin) must be valid JSON and is
    sent as its UTF-8 bytes, so typed handlers decode it. Prints a line
    `RUN_ID STEP_ID SEQ` (SEQ is the task's sequence number in the task stream). With
    --wait, then prints the task's output (as text if it is UTF-8, else as a bytes
    literal); a task that ends dead-lettered prints its error and exits with status 1.
    """
    _run(
        _submit,
        _urls(url),
        connect_timeout,
        task_type,
        payload,
        group=group,
        run_id=run_id,
        step_id=step_id,
        key=key,
        target=target,
        soft=soft,
        wait=wait,
        wait_timeout=timeout,
    )


async def _submit(
    urls: list[str],
    connect_timeout: float,
    task_type: str,
    payload: bytes,
    *,
    group: str | None,
    run_id: str | None,
    step_id: str | None,
    key: str | None,
    target: str | None,
    soft: bool,
    wait: bool,
    wait_timeout: float | None,
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio submit") as nc:
        client = natrio.Client(nc)
        handle = await client.submit(
            task_type,
            payload,
            run_id=run_id,
            step_id=step_id,
            group=group,
            key=key,
            target=target,
            soft=soft,
        )
        click.echo(f"{handle.run_id} {handle.step_id} {handle.seq}")
        if handle.duplicate:
            _say(
                "duplicate: this run id and step id were submitted within the duplicate "
                "window, so no new task was queued",
                "yellow",
            )
        if not wait:
            return
        output = None
        with trio.move_on_after(math.inf if wait_timeout is None else wait_timeout):
            output = await handle.result()
        if output is None:
            raise _CommandError(
                f"no outcome for {task_type} {handle.run_id}/{handle.step_id} "
                f"within {wait_timeout:g} s (the task stays queued)"
            )
    click.echo(_show_output(output))


def _show_output(output: bytes) -> str:
    try:
        return output.decode("utf-8")
    except UnicodeDecodeError:
        return repr(output)


# -- natrio signal ------------------------------------------------------------------------


def _text_data(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes:
    if value is None:
        return b""
    if value == "-":
        # Bytes as they come: nothing is decoded, and no trailing newline is stripped.
        stdin = getattr(sys.stdin, "buffer", None)
        return stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
    return value.encode("utf-8")


@cli.command("signal")
@click.argument("run_id", metavar="RUN")
@click.argument("name", metavar="NAME")
@click.argument("data", metavar="[DATA]", required=False, callback=_text_data)
@_connection_options
def signal_command(run_id: str, name: str, data: bytes, url: str, connect_timeout: float) -> None:
    """Send signal NAME with DATA to run RUN.

    A step of the run waiting in `ctx.wait_for_signal(NAME, ...)` wakes with DATA; one
    that starts waiting later gets it at once. DATA (default: empty) is sent as its
    UTF-8 bytes; `-` reads it from stdin, sent as is (a trailing newline included).
    Prints a confirmation on stderr, nothing on stdout.
    """
    _run(_send_signal, _urls(url), connect_timeout, run_id, name, data)


async def _send_signal(
    urls: list[str], connect_timeout: float, run_id: str, name: str, data: bytes
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio signal") as nc:
        await natrio.Client(nc).send_signal(run_id, name, data)
    _say(f"signal {name} sent to run {run_id}", "green")


# -- natrio stream ------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("step_id", metavar="STEP")
@_connection_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up after this many seconds (exit status 1). Default: wait forever.",
)
def stream(
    run_id: str, step_id: str, url: str, connect_timeout: float, timeout: float | None
) -> None:
    """Print the streamed output (`ctx.put_stream`) of step STEP of run RUN as it comes.

    One chunk per line on stdout (as text if it is UTF-8, else as a bytes literal), until
    the step ends; then its outcome goes to stderr and the exit status is 0 if it
    completed, 1 if it was dead-lettered. Only chunks published after the command
    subscribed are seen: it prints `listening` on stderr once they will be. A step that
    had already ended prints no chunks and exits at once.
    """
    _run(_stream, _urls(url), connect_timeout, run_id, step_id, wait_timeout=timeout)


async def _stream(
    urls: list[str],
    connect_timeout: float,
    run_id: str,
    step_id: str,
    *,
    wait_timeout: float | None,
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio stream") as nc:
        chunks = natrio.Client(nc).stream(run_id, step_id)
        with trio.move_on_after(math.inf if wait_timeout is None else wait_timeout) as scope:
            async with chunks:
                if chunks.outcome is None:
                    # Entering subscribed, then looked the step up over the same
                    # connection, so the server has the subscription: any chunk published
                    # from now on is seen. Scripts and tests wait for this line.
                    _say(f"listening to the stream of run {run_id} step {step_id}")
                async for data in chunks:
                    # click.echo flushes, so a pipe sees each chunk as it arrives.
                    click.echo(_show_output(data))
    if scope.cancelled_caught:
        raise _CommandError(f"run {run_id} step {step_id} did not end within {wait_timeout:g} s")
    if chunks.outcome == "completed":
        _say(f"run {run_id} step {step_id} completed", "green")
        return
    if chunks.outcome == "dead":
        raise _CommandError(f"run {run_id} step {step_id} dead (dead-lettered)")
    raise _CommandError(  # pragma: no cover - StepStream ends only with an outcome
        f"the stream of run {run_id} step {step_id} ended without an outcome"
    )


# -- natrio workers -----------------------------------------------------------------------


@cli.command()
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def workers(url: str, connect_timeout: float, as_json: bool) -> None:
    """List the workers registered in the worker directory.

    A worker that died without deregistering disappears once its entry's TTL passes.
    """
    found, waiting = _run(_workers, _urls(url), connect_timeout)
    if as_json:
        click.echo(json.dumps([json.loads(info.to_json()) for info in found], indent=2))
        return
    if not found:
        _say("no workers registered")
    else:
        _workers_table(found)
    if waiting:
        table = Table(title="tasks waiting for a claim no live worker holds", title_justify="left")
        table.add_column("consumer", no_wrap=True)
        table.add_column("claim")
        table.add_column("waiting", justify="right")
        for name, claim, count in waiting:
            table.add_row(Text(name), Text(claim), str(count))
        _console().print(table)


def _workers_table(found: list[natrio.WorkerInfo]) -> None:
    table = Table(title=f"natrio workers ({len(found)})", title_justify="left")
    table.add_column("worker id", no_wrap=True)
    table.add_column("task types")
    table.add_column("groups")
    table.add_column("host")
    table.add_column("pid", justify="right")
    table.add_column("partitions")
    table.add_column("claims")
    table.add_column("in flight", justify="right")
    table.add_column("processed", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("last seen", no_wrap=True)
    for info in found:
        held = "; ".join(
            f"{label}: {','.join(map(str, parts)) or '-'}"
            for label, parts in sorted(info.partitions.items())
        )
        table.add_row(
            Text(info.worker_id + (" (stopping)" if info.stopping else "")),
            Text(", ".join(info.task_types)),
            Text(", ".join(info.groups)),
            Text(held),
            Text(", ".join(info.claims)),
            Text(info.hostname),
            str(info.pid),
            str(info.in_flight),
            str(info.processed),
            Text(str(info.failed), style="red" if info.failed else ""),
            Text(info.last_seen),
        )
    _console().print(table)


async def _workers(
    urls: list[str], connect_timeout: float
) -> tuple[list[natrio.WorkerInfo], list[tuple[str, str, int]]]:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio workers") as nc:
        found = await natrio.list_workers(nc)
        return found, await unheld_claims(nc, found)


# -- natrio bench -------------------------------------------------------------------------


def _scenario_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    from ._bench.scenarios import SCENARIOS

    names = [part.strip() for item in value for part in item.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})"
        )
    # In the bench's own order whatever order they were given in, each once.
    return tuple(name for name in SCENARIOS if name in names) if names else SCENARIOS


def _contestant_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> frozenset[str] | None:
    from ._bench.scenarios import DRAIN_KEYS

    names = {part.strip() for item in value for part in item.split(",") if part.strip()}
    unknown = sorted(names - set(DRAIN_KEYS))
    if unknown:
        raise click.BadParameter(
            f"unknown contestant {', '.join(unknown)} (choose from {', '.join(DRAIN_KEYS)})"
        )
    return frozenset(names) or None


def _count_option(name: str, full: int, quick: int, what: str) -> Callable[[F], F]:
    return click.option(
        name,
        type=click.IntRange(min=1),
        default=None,
        help=f"{what}. Default: {full:,} ({quick:,} with --quick).",
    )


@cli.command()
@click.option("--quick", is_flag=True, help="Small sizes: a run of well under a minute.")
@click.option(
    "--contestant",
    "contestants",
    multiple=True,
    callback=_contestant_names,
    metavar="KEY[,KEY...]",
    help="Only these drain contestants: A, B, B-same, natrio, faststream, faststream-workers, "
    "taskiq; repeat or comma-separate. Default: all that are installed.",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    callback=_scenario_names,
    metavar="NAME[,NAME...]",
    help="Scenario(s) to run: drain, roundtrip, concurrency, longrun, loss; repeat or "
    "comma-separate. "
    "Default: all.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Rounds of drain, roundtrip and concurrency (interleaved; medians are reported). "
    "The long run runs once.",
)
@_count_option("--drain-tasks", 50_000, 3_000, "Tasks each drain contestant works")
@_count_option("--roundtrip-count", 5_000, 300, "Measured round trips per contestant")
@click.option(
    "--roundtrip-warmup",
    type=click.IntRange(min=0),
    default=None,
    help="Round trips before measuring. Default: 200 (50 with --quick).",
)
@_count_option("--sleepers", 2_000, 200, "Sleeping handlers, all at once (the concurrency)")
@click.option(
    "--sleep",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds each sleeping handler sleeps.",
)
@_count_option("--longrun-tasks", 1_000_000, 20_000, "Tasks through one worker in the long run")
@_count_option("--loss-tasks", 2_000, 500, "Tasks each loss contestant is given")
@click.option(
    "--loss-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds each loss contestant runs without an events stream. Default: 5 (3 with --quick).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, writable=True),
    default="bench-results",
    show_default=True,
    help="Directory for bench.json and bench.png (created if missing).",
)
@click.option(
    "--store-dir",
    type=click.Path(exists=True, file_okay=False, writable=True),
    default=None,
    help="Directory the scenarios' JetStream file stores are made in. Default: the system's "
    "temporary directory (mind a tmpfs there: then the store is in memory).",
)
def bench(
    quick: bool,
    contestants: frozenset[str] | None,
    scenarios: tuple[str, ...],
    rounds: int,
    drain_tasks: int | None,
    roundtrip_count: int | None,
    roundtrip_warmup: int | None,
    sleepers: int | None,
    sleep: float,
    longrun_tasks: int | None,
    loss_tasks: int | None,
    loss_seconds: float | None,
    output: str,
    store_dir: str | None,
) -> None:
    """Measure natrio side by side with nats-py loops, FastStream and taskiq.

    Each scenario starts its own nats-server (file store) and runs its contestants, each
    in its own process, against it with the same tasks: drain (tasks/s, CPU per task,
    peak RSS and the server's CPU of a worker draining a queue; baselines A, a nats-py
    fetch() worker, B, the leanest hand-written nats-py loop, and B-same, that loop
    sending natrio's messages; FastStream and taskiq when installed), roundtrip (latency
    of a submit and its result; floor: nats-py request/reply), concurrency (handlers
    sleeping at once: wall time, memory per task), longrun (RSS of one worker over many
    tasks), loss (tasks each contestant loses when no completion event can be stored).
    Prints a table with natrio's ratios and the targets met or missed, and writes
    bench.json and bench.png to --output. Exits 0 even when a target is missed: it
    measures, it does not test.
    """
    import attrs as _attrs

    from ._bench import scenarios as bench_scenarios

    base = bench_scenarios.QUICK if quick else bench_scenarios.FULL
    overrides: dict[str, float | None] = {
        "drain_tasks": drain_tasks,
        "roundtrip_count": roundtrip_count,
        "roundtrip_warmup": roundtrip_warmup,
        "sleepers": sleepers,
        "longrun_tasks": longrun_tasks,
        "loss_tasks": loss_tasks,
        "loss_seconds": loss_seconds,
    }
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    sizes = _attrs.evolve(base, sleep=sleep, **given)
    customised = any(value is not None for value in overrides.values()) or sleep != base.sleep
    mode = ("quick" if quick else "full") + (", custom sizes" if customised else "")
    config = bench_scenarios.BenchConfig(
        scenarios=scenarios,
        sizes=sizes,
        rounds=rounds,
        store_dir=store_dir,
        contestants=contestants,
    )
    command = " ".join([os.path.basename(sys.argv[0]) or "natrio", *sys.argv[1:]])
    doc = _run(_bench, config, mode, command)
    _report_bench(doc, Path(output))


async def _bench(config: Any, mode: str, command: str) -> dict[str, Any]:
    from ._bench import report
    from ._bench.scenarios import BenchError, run_bench

    started = time.time()
    clock = time.perf_counter()
    env = await report.environment()
    stopped_by: list[str] = []
    raw: dict[str, Any] = {}
    # A signal cancels the run, so its contestants and servers are stopped on the way out
    # rather than left running (SIGTERM would otherwise end this process on the spot).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped_by.append(signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            with report.RichProgress(_console(stderr=True)) as progress:
                try:
                    raw = await run_bench(config, progress)
                except BenchError as exc:
                    raise _CommandError(f"natrio bench: {exc}") from None
            nursery.cancel_scope.cancel()
    if stopped_by:
        raise _CommandError(
            f"natrio bench: stopped by {stopped_by[0]}; nothing written",
            130 if stopped_by[0] == "SIGINT" else 143,
        )
    return report.document(
        raw=raw,
        summary=report.summarize(raw, config.sizes),
        sizes=config.sizes,
        rounds=config.rounds,
        mode=mode,
        command=command,
        env=env,
        started=started,
        seconds=time.perf_counter() - clock,
    )


def _report_bench(doc: dict[str, Any], directory: Path) -> None:
    from ._bench import report

    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    console = _console()
    console.print(report.table(doc))
    ratios = doc["ratios"]
    shown = [
        f"{what} "
        + ", ".join(
            f"natrio/{name[len(prefix) :]} {value:.2f}x"
            for name, value in ratios.items()
            if name.startswith(prefix)
        )
        for what, prefix in (
            ("drain", "drain_natrio_vs_"),
            ("round-trip p50", "roundtrip_p50_natrio_vs_"),
        )
        if any(name.startswith(prefix) for name in ratios)
    ]
    skipped = doc.get("skipped") or []
    if skipped:
        console.print(
            Text(
                f"skipped (not installed): {', '.join(skipped)}; "
                "pip install 'natrio[bench]' adds them",
                style="yellow",
            )
        )
    if shown:
        console.print(Text("ratios: " + "; ".join(shown)))
    missed = [target for target in doc["targets"] if not target["passed"]]
    if missed:
        console.print(
            Text(
                f"targets missed ({len(missed)} of {len(doc['targets'])}): "
                + "; ".join(f"{t['scenario']} {t['figure']} {t['target']}" for t in missed),
                style="bold red",
            )
        )
    elif doc["targets"]:
        met = len(doc["targets"])
        console.print(Text(f"all {met} target{'s' if met > 1 else ''} met", style="green"))
    plot_path = directory / "bench.png"
    if report.write_plot(doc, plot_path):
        _say(f"wrote {json_path} and {plot_path}")
    else:
        _say(f"wrote {json_path}; {report.PLOT_HINT}")
