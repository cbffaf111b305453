"""``natrio worker``: load the application's worker factory and run its worker."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import cast

import click
import trio

import natrio

from .._supervisor import (
    Supervisor,
    cpu_count,
    report_ready,
    run_supervisor,
    stop_when_supervisor_gone,
)
from .._util import single_error
from ._app import (
    URL_ENV_VAR,
    cli,
    connection_options,
    logging_to_stderr,
    reported_errors,
    run,
    say,
    seconds_option,
    urls,
)

#: What ``natrio worker MODULE:ATTRIBUTE`` expects ``ATTRIBUTE`` to be.
WorkerFactory = Callable[[natrio.Connection], natrio.Worker | Awaitable[natrio.Worker]]

FACTORY_CONTRACT = (
    "it must be a function taking a natrio.Connection and returning a natrio.Worker "
    "(or an async function returning one)"
)


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
            f"{FACTORY_CONTRACT}"
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
            f"{name} returned {type(produced).__name__}, not a natrio.Worker: {FACTORY_CONTRACT}"
        )
    return produced


def _process_count(ctx: click.Context, param: click.Parameter, value: str) -> int:
    if value.strip().lower() == "auto":
        return cpu_count()
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto") from None
    if count < 1:
        raise click.BadParameter(f"must be at least 1, got {count}")
    return count


@cli.command()
@click.argument("spec", metavar="MODULE:ATTRIBUTE")
@connection_options
@seconds_option(
    "--grace",
    default=None,
    at_least=0,
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
@click.option(
    "--processes",
    default="1",
    show_default=True,
    callback=_process_count,
    metavar="N|auto",
    help="Worker processes to run, each with the factory's worker; auto: one per CPU. "
    "With more than 1, this process supervises them: restarts one that dies, passes "
    "SIGINT/SIGTERM on to all.",
)
# Internal: set on the processes a supervisor starts (see natrio._supervisor).
@click.option("--supervised", is_flag=True, hidden=True)
def worker(
    spec: str,
    url: str,
    connect_timeout: float,
    grace: float | None,
    app_dir: str | None,
    log_level: str,
    processes: int,
    supervised: bool,
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

    With --processes N (or auto, one per CPU) it starts N worker processes instead, each
    running the factory's worker (child i finds i in $NATRIO_WORKER_INDEX), prefixes
    their output lines with [i], starts one that dies again (backing off; it gives up
    with exit status 1 when one dies before it is ready 3 times in a row) and passes
    SIGINT and SIGTERM on to all of them.
    """
    with reported_errors():
        # Checked here even when processes run it, so that a wrong spec fails at once.
        factory = load_worker_factory(spec, app_dir)
    with logging_to_stderr(log_level):
        if processes > 1:
            argv = _child_argv(spec, connect_timeout, grace, app_dir, log_level)
            # The URL goes to the processes in the environment: on their command lines,
            # credentials in it would be visible to everyone on the host.
            env = {**os.environ, URL_ENV_VAR: url}
            run(_supervise, argv, processes, grace, env)
        else:
            run(_work, spec, factory, urls(url), connect_timeout, grace, supervised)


def _child_argv(
    spec: str, connect_timeout: float, grace: float | None, app_dir: str | None, log_level: str
) -> list[str]:
    argv = [sys.executable, "-m", "natrio", "worker", spec, "--processes", "1", "--supervised"]
    argv += ["--connect-timeout", repr(connect_timeout), "--log-level", log_level]
    if grace is not None:
        argv += ["--grace", repr(grace)]
    if app_dir is not None:
        argv += ["--app-dir", os.path.abspath(app_dir)]
    return argv


async def _supervise(
    argv: list[str], processes: int, grace: float | None, env: dict[str, str]
) -> None:
    supervisor = Supervisor(lambda index: argv, processes, grace=grace, env=env, tell=say)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_supervisor, supervisor)
        # Started also means "stopped before all were ready" (a signal came first).
        if all(process.ready for process in supervisor.statistics()):
            say(f"{processes} worker processes started; SIGINT or SIGTERM stops them", "green")
    say(f"{processes} worker processes stopped")


async def _work(
    spec: str,
    factory: WorkerFactory,
    urls: list[str],
    connect_timeout: float,
    grace: float | None,
    supervised: bool = False,
) -> None:
    # A factory's own bug (or any lone failure) is shown as itself, its traceback
    # ending where it was raised, rather than inside the nurseries' groups.
    with single_error():
        await _serve(spec, factory, urls, connect_timeout, grace, supervised)


async def _serve(
    spec: str,
    factory: WorkerFactory,
    urls: list[str],
    connect_timeout: float,
    grace: float | None,
    supervised: bool,
) -> None:
    # Until run_worker installs its own handlers, a signal means "give up": there is
    # nothing to drain yet, and waiting out a connect timeout would feel like a hang.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def give_up_on_signal() -> None:
                async for signum in signals:
                    say(f"received {signal.Signals(signum).name} before the worker started")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(give_up_on_signal)
            async with natrio.connect(
                urls, connect_timeout=connect_timeout, name=f"natrio worker {spec}"
            ) as nc:
                built = await make_worker(factory, nc, spec)
                async with trio.open_nursery() as inner:

                    async def serve(task_status: trio.TaskStatus[None]) -> None:
                        await natrio.run_worker(built, grace=grace, task_status=task_status)
                        inner.cancel_scope.cancel()  # ends the supervisor watch too

                    await inner.start(serve)
                    # Printed only now, so it means "pulling and registered" to whoever waits
                    # for it (scripts, tests).
                    say(
                        f"worker {built.worker_id} started: task types "
                        f"{', '.join(built.task_types)}; groups {', '.join(built.groups)}; "
                        f"connected to {nc.url}",
                        "green",
                    )
                    if supervised:
                        report_ready(
                            built.worker_id, built.shutdown_grace if grace is None else grace
                        )
                        inner.start_soon(
                            stop_when_supervisor_gone, functools.partial(built.stop, grace)
                        )
            say(f"worker {built.worker_id} stopped")
            nursery.cancel_scope.cancel()
