"""``natrio events``, ``natrio stats`` and ``natrio top``: seeing what runs.

The reading and checking is the library's (:meth:`natrio.Client.history` and
:meth:`natrio.Client.overview`); these commands only format what it returns.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime

import click
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import natrio

from ._app import (
    cli,
    connection_options,
    count_option,
    fail,
    json_option,
    make_console,
    run,
    say,
    seconds_option,
    urls,
)

_KIND_STYLES = {
    "completed": "green",
    "continued": "cyan",
    "failed": "yellow",
    "paused": "blue",
    "dead": "bold red",
}


def shown(text: str) -> Text:
    """``text`` (which may come from anyone who can publish) as a Text whose control
    characters are escaped, so that none reaches the terminal."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return Text(text)


def _time(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# -- natrio events ------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("step_id", metavar="[STEP]", required=False)
@connection_options
@json_option()
@count_option("--limit", default=10_000, help="Read at most this many events.")
def events(
    run_id: str,
    step_id: str | None,
    url: str,
    connect_timeout: float,
    as_json: bool,
    limit: int,
) -> None:
    """Print the history of run RUN (or of its step STEP) from the events stream.

    One row per event, oldest first: when the stream stored it (UTC), the step and task
    type, the kind (started, failed, paused, continued, completed, dead), the attempt and
    agent-loop iteration, the worker, and why (the error of a failed or dead attempt, a
    pause's delay). With --json, an object with the run id, step id, the events, and how
    many messages were skipped as not natrio's. Exits with status 1 when the run has no
    events (never submitted, not run yet, or older than the events stream keeps).
    """
    history = run(_events, urls(url), connect_timeout, run_id, step_id, limit)
    if history.skipped:
        say(
            f"skipped {history.skipped} message(s) under the run's event subjects that are "
            "not valid natrio events",
            "yellow",
        )
    if history.truncated:
        say(f"showing the first {limit} events only (--limit)", "yellow")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": history.run_id,
                    "step_id": history.step_id,
                    "events": [event.to_dict() for event in history.events],
                    "skipped": history.skipped,
                    "truncated": history.truncated,
                },
                indent=2,
            )
        )
    else:
        _events_table(history)
    if not history.events:
        which = f"run {run_id}" + (f" step {step_id}" if step_id else "")
        fail(f"no events for {which}")


def _events_table(history: natrio.RunHistory) -> None:
    if not history.events:
        return
    title = f"run {history.run_id}" + (f" step {history.step_id}" if history.step_id else "")
    table = Table(title=f"{title} ({len(history.events)} events)", title_justify="left")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("attempt", justify="right")
    table.add_column("iteration", justify="right")
    table.add_column("worker", no_wrap=True)
    table.add_column("reason")
    for event in history.events:
        table.add_row(
            _time(event.time),
            Text(event.step_id),
            Text(event.task_type),
            Text(event.kind, style=_KIND_STYLES.get(event.kind, "")),
            str(event.attempt),
            str(event.iteration),
            shown(event.worker),
            shown(event.reason),
        )
    make_console().print(table)


async def _events(
    urls: list[str], connect_timeout: float, run_id: str, step_id: str | None, limit: int
) -> natrio.RunHistory:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio events") as nc:
        return await natrio.Client(nc).history(run_id, step_id, limit=limit)


# -- natrio stats -------------------------------------------------------------------------

_window_option = seconds_option(
    "--window", default=60.0, help="Seconds of events the rates count (on the server's clock)."
)


@cli.command()
@connection_options
@json_option("Print JSON instead of tables.")
@_window_option
def stats(url: str, connect_timeout: float, as_json: bool, window: float) -> None:
    """Print what the deployment is doing, as the server sees it.

    Per task type and group: tasks pending (stored, not yet delivered), in flight
    (delivered, not yet acknowledged: running, queued in a worker, or waiting out a retry
    delay), redelivered (of those in flight, delivered more than once), and dead letters
    in NATRIO_DLQ. Per task type: completed steps, failed attempts that will be retried,
    and dead-lettered steps in the last --window seconds, shown per minute. Only task
    types and groups some worker has served (or that have dead letters) are listed;
    tasks of others are counted as matching no consumer.
    """
    overview = run(_overview, urls(url), connect_timeout, window)
    if as_json:
        click.echo(json.dumps(overview.to_dict(), indent=2))
        return
    make_console().print(render_overview(overview))


def render_overview(overview: natrio.Overview) -> RenderableType:
    """The tables of ``natrio stats`` and of each frame of ``natrio top``."""
    queues = Table(title="tasks by type and group", title_justify="left", expand=False)
    queues.add_column("type", no_wrap=True)
    queues.add_column("group", no_wrap=True)
    queues.add_column("pending", justify="right")
    queues.add_column("in flight", justify="right")
    queues.add_column("redelivered", justify="right")
    queues.add_column("dead letters", justify="right")
    queues.add_column("consumers", justify="right")
    for queue in overview.queues:
        queues.add_row(
            Text(queue.task_type),
            Text(queue.group),
            str(queue.pending),
            str(queue.in_flight),
            Text(str(queue.redelivered), style="yellow" if queue.redelivered else ""),
            Text(str(queue.dead_letters), style="red" if queue.dead_letters else ""),
            str(queue.consumers),
        )
    window = f"{overview.window:g} s"
    rates = Table(
        title=f"outcomes per minute, over the last {window}", title_justify="left", expand=False
    )
    rates.add_column("type", no_wrap=True)
    rates.add_column("completed/min", justify="right")
    rates.add_column("failed/min", justify="right")
    rates.add_column("dead/min", justify="right")
    for rate in overview.rates:
        rates.add_row(
            Text(rate.task_type),
            f"{overview.per_minute(rate.completed):.1f}",
            Text(f"{overview.per_minute(rate.failed):.1f}", style="yellow" if rate.failed else ""),
            Text(f"{overview.per_minute(rate.dead):.1f}", style="red" if rate.dead else ""),
        )
    parts: list[RenderableType] = [queues, rates]
    summary = f"{overview.stored_tasks} task(s) stored"
    if overview.unserved:
        summary += f", {overview.unserved} of them for a type or group no worker has served yet"
    parts.append(Text(summary, style="yellow" if overview.unserved else "dim"))
    return Group(*parts)


async def _overview(urls: list[str], connect_timeout: float, window: float) -> natrio.Overview:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio stats") as nc:
        return await natrio.Client(nc).overview(window=window)


# -- natrio top ---------------------------------------------------------------------------


@cli.command()
@connection_options
@_window_option
@seconds_option("--interval", default=1.0, at_least=0.1, help="Seconds between refreshes.")
@count_option(
    "-n",
    "--iterations",
    default=None,
    help="Refresh this many times, then exit. Default: until q or Ctrl-C.",
)
def top(
    url: str, connect_timeout: float, window: float, interval: float, iterations: int | None
) -> None:
    """Show `natrio stats` live, refreshed every --interval seconds, full-screen.

    Quit with q or Ctrl-C. A refresh that fails (the server restarting, say) is shown
    above the last figures read, and the view goes on.
    """
    console = make_console()
    run(_top, urls(url), connect_timeout, window, interval, iterations, console)


class Frames:
    """The frames of ``natrio top``: each refresh reads the overview and renders it, with
    the last one read kept on screen (and the error shown) when a refresh fails."""

    def __init__(self, client: natrio.Client, *, window: float, interval: float) -> None:
        self.client = client
        self.window = window
        self.interval = interval
        self.last: natrio.Overview | None = None
        self.error: str | None = None

    async def refresh(self) -> RenderableType:
        """Read the overview again and return the frame to show."""
        try:
            self.last = await self.client.overview(window=self.window)
            self.error = None
        except natrio.NatrioError as exc:
            self.error = f"refresh failed: {exc}"
        return self.render()

    def render(self) -> RenderableType:
        """The current frame."""
        when = _time(self.last.time) if self.last is not None else "-"
        header = Text.assemble(
            ("natrio top", "bold"),
            f"  {self.client.nc.url}  {when} UTC (server)  every {self.interval:g} s  ",
            ("q to quit", "dim"),
        )
        parts: list[RenderableType] = [header]
        if self.error is not None:
            error = shown(self.error)
            error.stylize("red")
            parts.append(error)
        if self.last is not None:
            parts.append(render_overview(self.last))
        return Group(*parts)


async def _top(
    urls: list[str],
    connect_timeout: float,
    window: float,
    interval: float,
    iterations: int | None,
    console: Console,
) -> None:
    interactive = console.is_terminal and sys.stdin.isatty()
    # Ctrl-C is the other way out, a normal end (status 0) rather than an interruption,
    # from the start: it is caught before the first connection is made.
    with _interrupts() as interrupts:
        async with trio.open_nursery() as nursery:
            if interrupts is not None:
                nursery.start_soon(_quit_on_interrupt, interrupts, nursery.cancel_scope)
            await _show(urls, connect_timeout, window, interval, iterations, console, interactive)
            nursery.cancel_scope.cancel()


async def _show(
    urls: list[str],
    connect_timeout: float,
    window: float,
    interval: float,
    iterations: int | None,
    console: Console,
    interactive: bool,
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio top") as nc:
        frames = Frames(natrio.Client(nc), window=window, interval=interval)
        first = await frames.refresh()
        with (
            _keys_read_one_by_one(interactive),
            Live(first, console=console, screen=interactive, auto_refresh=False) as live,
        ):
            async with trio.open_nursery() as nursery:
                if interactive:
                    nursery.start_soon(_quit_on_key, nursery.cancel_scope)
                shown_frames = 1
                while iterations is None or shown_frames < iterations:
                    await trio.sleep(interval)
                    live.update(await frames.refresh(), refresh=True)
                    shown_frames += 1
                nursery.cancel_scope.cancel()


@contextmanager
def _keys_read_one_by_one(interactive: bool) -> Iterator[None]:
    # The terminal hands over each key as it is pressed, unechoed (cbreak mode; Ctrl-C
    # still interrupts), and is put back as it was however the view ends.
    if not interactive or sys.platform == "win32":
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _quit_on_key(scope: trio.CancelScope) -> None:
    fd = sys.stdin.fileno()
    while True:
        # Waited for, then read: stdin stays blocking, as the shell expects it after.
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, 64)
        if not data or b"q" in data.lower():
            scope.cancel()
            return


@contextmanager
def _interrupts() -> Iterator[AsyncIterator[int] | None]:
    # Signals can be received in the main thread only; elsewhere Ctrl-C stays an
    # interruption.
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(signal.SIGINT) as received:
        yield received


async def _quit_on_interrupt(received: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in received:
        scope.cancel()
        return
