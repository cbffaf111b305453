"""The command group, its shared options, and how commands report errors and log."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
import trio
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

import natrio

from .._util import unwrapped

DEFAULT_URL = "nats://127.0.0.1:4222"
URL_ENV_VAR = "NATRIO_URL"

P = ParamSpec("P")
R = TypeVar("R")


# -- output -------------------------------------------------------------------------------


def make_console(*, stderr: bool = False) -> Console:
    # Made per call, not at import, so it writes to whatever sys.stdout/sys.stderr are now
    # (CliRunner swaps them). Off a terminal the width is generous: rich would otherwise
    # wrap or truncate at 80 columns, breaking long worker ids for grep and scripts.
    console = Console(stderr=stderr, soft_wrap=True, highlight=False)
    if not console.is_terminal:
        console.width = 400
    return console


def say(message: str, style: str = "") -> None:
    """Chatter for humans goes to stderr, leaving stdout to what scripts read."""
    make_console(stderr=True).print(Text(message, style=style))


def fail(message: str, code: int = 1) -> NoReturn:
    make_console(stderr=True).print(Text(f"Error: {message}", style="bold red"))
    raise click.exceptions.Exit(code)


class CommandError(Exception):
    """A failure a command reports itself (not one of natrio's), with its exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn natrio's errors into a message and an exit status instead of a traceback."""
    try:
        yield
    except (natrio.NatrioError, CommandError, KeyboardInterrupt, BaseExceptionGroup) as raised:
        # Nurseries wrap even a lone failure in an ExceptionGroup: report the failure itself.
        exc = unwrapped(raised)
        if isinstance(exc, KeyboardInterrupt):
            raise click.exceptions.Exit(130) from None
        if isinstance(exc, CommandError):
            fail(str(exc), exc.code)
        if isinstance(exc, natrio.ConfigurationError):
            fail(headline(exc), 2)
        if isinstance(exc, natrio.JetStreamError) and exc.err_code == _STREAM_NOT_FOUND:
            fail(f"{exc} (is the server provisioned? run `natrio provision`)", 1)
        if isinstance(exc, natrio.NatrioError):
            fail(headline(exc), 1)
        raise


_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ ")
# JetStream's "stream not found" error number (documented on natrio.JetStreamError).
_STREAM_NOT_FOUND = 10059


def headline(exc: BaseException) -> str:
    """One line for an error whose message may run on (ServerError appends the server's log)."""
    first, *rest = (str(exc) or type(exc).__name__).splitlines()
    # nats-server's own fatal or error line says why better than anything else in the log.
    reasons = [line for line in rest if "[FTL]" in line or "[ERR]" in line]
    if reasons:
        first = f"{first}: {_LOG_PREFIX.sub('', reasons[-1])}"
    return first


def run(async_fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run one command's async body under Trio, reporting natrio's errors.

    Log records below ERROR are dropped unless logging is already set up (``natrio
    worker`` sets it up): a one-shot command's failure is its final message, and the
    connection's retry warnings before it would only repeat it.
    """
    with reported_errors(), logging_to_stderr("error", only_if_unset=True):
        return trio.run(functools.partial(async_fn, *args, **kwargs))


# -- shared options -----------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def seconds_option(
    *names: str, default: float | None, help: str, at_least: float | None = None
) -> Callable[[F], F]:
    """An option taking a number of seconds: more than 0, or ``at_least`` or more."""
    return click.option(
        *names,
        type=click.FloatRange(min=0, min_open=True)
        if at_least is None
        else click.FloatRange(min=at_least),
        default=default,
        show_default=None if default is None else True,
        help=help,
    )


def count_option(*names: str, default: int | None, help: str) -> Callable[[F], F]:
    """An option taking a whole number of 1 or more."""
    return click.option(
        *names,
        type=click.IntRange(min=1),
        default=default,
        show_default=None if default is None else True,
        help=help,
    )


def json_option(help: str = "Print JSON instead of a table.") -> Callable[[F], F]:
    """``--json`` (the flag ``as_json``): print JSON for scripts instead of what people read."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def connection_options(command: F) -> F:
    """``--url`` and ``--connect-timeout``, for every command that talks to NATS."""
    command = seconds_option(
        "--connect-timeout",
        default=5.0,
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


def urls(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


# -- the group ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(natrio.__version__, prog_name="natrio")
def cli() -> None:
    """natrio: run Trio workers for NATS JetStream tasks, submit tasks, send signals,
    follow streamed output, inspect workers, replay dead letters.

    Commands that talk to NATS take --url (default: $NATRIO_URL, else
    nats://127.0.0.1:4222). Errors exit with status 1, usage and configuration
    errors with status 2.
    """


def main() -> None:
    """Entry point of the ``natrio`` console script and of ``python -m natrio``."""
    cli(prog_name="natrio")


@contextmanager
def logging_to_stderr(level: str, *, only_if_unset: bool = False) -> Iterator[None]:
    """Send log records to stderr for the duration; undone after, for in-process callers."""
    root = logging.getLogger()
    if only_if_unset and root.handlers:
        yield
        return
    console = make_console(stderr=True)
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
