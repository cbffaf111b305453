"""``natrio dlq``: list, show, replay and purge dead letters.

Everything shown comes from the dead-letter stream, where anyone allowed to publish on
``natrio.dead.>`` can write: the client skips messages that are not entries, and every
text of an entry (error messages, inputs, ids) is printed with control characters
escaped, so an entry cannot drive the terminal.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

import natrio

from ._app import CommandError, cli, connection_options, fail, make_console, run, say, urls

#: Characters of an input `natrio dlq show` prints (--json has all of it).
SHOWN_INPUT = 4096


def shown(text: str, *, lines: bool = False) -> str:
    """``text`` with every character that is not printable escaped (newlines kept when
    ``lines``): no escape sequence from an entry reaches the terminal."""
    out = []
    for char in text:
        if char.isprintable() or (lines and char == "\n"):
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def _summary(entry: natrio.DeadLetter) -> dict[str, Any]:
    """An entry as `natrio dlq list --json` prints it (no input, no traceback)."""
    return {
        "seq": entry.seq,
        "task_type": entry.task_type,
        "group": entry.group,
        "run_id": entry.run_id,
        "step_id": entry.step_id,
        "time": entry.time,
        "attempts": entry.attempts,
        "worker_id": entry.worker_id,
        "task_seq": entry.task_seq,
        "subject": entry.subject,
        "error": {
            "type": entry.error.type,
            "message": entry.error.message,
            "kind": entry.error.kind,
            "attempts": entry.error.attempts,
        },
        "input_size": None if entry.input_ref is not None else len(entry.input),
        "input_ref": entry.input_ref,
    }


def _warn_skipped(skipped: list[tuple[int, str]]) -> None:
    if skipped:
        seqs = ", ".join(str(seq) for seq, _ in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        say(
            f"skipped {len(skipped)} message(s) of the dead-letter stream that are not "
            f"dead-letter entries (seq {seqs}{more})",
            "yellow",
        )


def _filters(task_type: str | None, group: str | None) -> str:
    parts = [f"of type {task_type}"] if task_type else []
    if group:
        parts.append(f"in group {group}")
    return (" " + " ".join(parts)) if parts else ""


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (the NATRIO_DLQ stream).

    Entries are named by SEQ, their sequence number in the dead-letter stream (the
    first column of `natrio dlq list`). Messages there that are not valid entries are
    skipped with a warning on stderr.
    """


_type_option = click.option(
    "--type", "task_type", default=None, metavar="TYPE", help="Only entries of this task type."
)
_group_option = click.option("--group", default=None, help="Only entries of this group.")


# -- natrio dlq list ----------------------------------------------------------------------


@dlq.command("list")
@connection_options
@_type_option
@_group_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_command(
    url: str, connect_timeout: float, task_type: str | None, group: str | None, as_json: bool
) -> None:
    """List dead letters, oldest first: seq, time, task, error.

    --json prints each entry's fields (without its input and traceback: see `natrio
    dlq show`); `input_size` is null for an input kept in the object store.
    """
    found, skipped = run(_list, urls(url), connect_timeout, task_type, group)
    _warn_skipped(skipped)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        say(f"no dead letters{_filters(task_type, group)}")
        return
    table = Table(title=f"dead letters ({len(found)})", title_justify="left")
    for name in ("seq", "time", "task type", "group", "run id", "step id", "kind", "attempts"):
        table.add_column(
            name, no_wrap=name != "step id", justify="right" if name == "seq" else "left"
        )
    table.add_column("error")
    for item in found:
        error = item["error"]
        message = error["message"].splitlines()[0] if error["message"] else ""
        table.add_row(
            str(item["seq"]),
            Text(shown(item["time"][:32])),
            Text(item["task_type"]),
            Text(item["group"]),
            Text(item["run_id"]),
            Text(item["step_id"]),
            Text(shown(error["kind"][:20]), style="red"),
            str(item["attempts"]),
            Text(shown(f"{error['type'][:60]}: {message[:160]}")),
        )
    make_console().print(table)


async def _list(
    urls: list[str], connect_timeout: float, task_type: str | None, group: str | None
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio dlq") as nc:
        reader = natrio.Client(nc).dead_letters(task_type, group)
        # Summaries only: the inputs are left behind page by page.
        found = [_summary(entry) async for entry in reader]
        return found, reader.skipped


# -- natrio dlq show ----------------------------------------------------------------------


@dlq.command()
@click.argument("seq", type=click.IntRange(min=1))
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def show(seq: int, url: str, connect_timeout: float, as_json: bool) -> None:
    """Show dead letter SEQ: the task, its error and traceback, its headers and input.

    The input is printed as text when it is UTF-8, else as a bytes literal, at most
    4096 characters of it, with control characters escaped. --json has it all:
    `input` (the text, or null when it is not UTF-8) and `input_base64`.
    """
    entry, data, problem = run(_show, urls(url), connect_timeout, seq)
    if as_json:
        item = _summary(entry)
        item["error"]["traceback"] = entry.error.traceback
        item["headers"] = dict(entry.headers)
        item["input"] = None
        item["input_base64"] = None if data is None else base64.b64encode(data).decode()
        if data is not None:
            item["input_size"] = len(data)
            with suppress(UnicodeDecodeError):
                item["input"] = data.decode("utf-8")
        if problem is not None:
            item["input_error"] = problem
        click.echo(json.dumps(item, indent=2))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows = [
        ("seq", str(entry.seq)),
        ("task", f"{entry.task_type} in {entry.group}: run {entry.run_id} step {entry.step_id}"),
        ("subject", entry.subject),
        ("time", entry.time),
        ("worker", entry.worker_id),
        ("attempts", str(entry.attempts)),
        ("task seq", str(entry.task_seq)),
        ("error", f"{entry.error.kind}: {entry.error.type}: {entry.error.message}"),
    ]
    for name, value in sorted(entry.headers.items()):
        rows.append((f"header {shown(name[:64])}", value))
    rows.append(("input", _shown_input(data, problem, entry.input_ref)))
    for name, value in rows:
        # Text, never a str: Rich would read markup in it ([link=...], or a [/x] that
        # raises), and the header names are the entry's.
        grid.add_row(Text(shown(name)), Text(shown(value, lines=True)))
    console = make_console()
    console.print(grid)
    if entry.error.traceback:
        console.print(Text("traceback", style="bold"))
        console.print(Text(shown(entry.error.traceback, lines=True)))


def _shown_input(data: bytes | None, problem: str | None, ref: str | None) -> str:
    where = f" (kept in the object store as {ref})" if ref is not None else ""
    if data is None:
        return f"unavailable{where}: {problem}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = repr(data[:SHOWN_INPUT])
    head = f"{len(data)} bytes{where}"
    if len(text) > SHOWN_INPUT:
        return f"{head}, the first {SHOWN_INPUT} characters:\n{text[:SHOWN_INPUT]}"
    return f"{head}:\n{text}" if data else f"empty{where}"


async def _show(
    urls: list[str], connect_timeout: float, seq: int
) -> tuple[natrio.DeadLetter, bytes | None, str | None]:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio dlq") as nc:
        client = natrio.Client(nc)
        entry = await client.dead_letter(seq)
        if entry is None:
            raise CommandError(f"no dead letter {seq} (replayed, purged or expired?)")
        try:
            return entry, await client.dead_letter_input(entry), None
        except natrio.NatrioError as exc:
            # The entry is still worth showing without its input.
            return entry, None, str(exc)


# -- natrio dlq replay --------------------------------------------------------------------


@dlq.command()
@click.argument("seq", type=click.IntRange(min=1), required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every entry (of --type, --group).")
@_type_option
@_group_option
@connection_options
def replay(
    seq: int | None,
    replay_all: bool,
    task_type: str | None,
    group: str | None,
    url: str,
    connect_timeout: float,
) -> None:
    """Submit dead letter SEQ (or --all of them) again, with a fresh attempt budget.

    Each replayed task keeps its task type, group, run id and step id, its headers and
    retry policy, but not its deadline; its entry is removed once it is stored. Prints
    `RUN_ID STEP_ID SEQ` for each (SEQ is the new task's sequence in the task stream); an
    entry replayed already queues no second task, and stays (`natrio dlq purge` removes
    it). --all shows a progress bar on stderr,
    replays the entries there when it starts, and exits with status 1 if any failed.
    """
    if (seq is None) == (not replay_all):
        raise click.UsageError("give SEQ or --all, not both")
    if seq is not None and (task_type or group):
        raise click.UsageError("--type and --group go with --all")
    run(_replay, urls(url), connect_timeout, seq, task_type, group)


async def _replay(
    urls: list[str],
    connect_timeout: float,
    seq: int | None,
    task_type: str | None,
    group: str | None,
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio dlq") as nc:
        client = natrio.Client(nc)
        if seq is not None:
            _replayed(await client.replay(seq), click.echo)
            return
        reader = client.dead_letters(task_type, group)
        # The sequences first: replays that die again join the stream behind them, and
        # must not be replayed once more by this run.
        seqs = [entry.seq async for entry in reader]
        _warn_skipped(reader.skipped)
        if not seqs:
            say(f"no dead letters{_filters(task_type, group)}")
            return
        failed = 0
        progress = Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            console=make_console(stderr=True),
            redirect_stdout=False,
            redirect_stderr=False,
            transient=True,
        )
        # On a terminal the ids are printed above the bar (as Text: no markup is read in
        # them); piped, to stdout as they come.
        emit: Callable[[str], None] = (
            (lambda line: progress.console.print(Text(line)))
            if make_console().is_terminal
            else click.echo
        )
        with progress:
            bar = progress.add_task("replaying", total=len(seqs))
            for number in seqs:
                try:
                    _replayed(await client.replay(number), emit)
                except natrio.NatrioError as exc:
                    failed += 1
                    progress.console.print(
                        Text(f"dead letter {number} not replayed: {shown(str(exc))}", style="red")
                    )
                progress.advance(bar)
    say(f"replayed {len(seqs) - failed} of {len(seqs)} dead letters", "green")
    if failed:
        raise CommandError(f"{failed} dead letter(s) could not be replayed")


def _replayed(handle: natrio.TaskHandle, emit: Callable[[str], None]) -> None:
    emit(f"{handle.run_id} {handle.step_id} {handle.seq}")
    if handle.duplicate:
        say(
            f"{handle.task_type} {handle.run_id}/{handle.step_id}: replayed already (or "
            f"submitted again) as task {handle.seq}, so no new task was queued; an entry "
            "found replayed already stays (`natrio dlq purge` removes it)",
            "yellow",
        )


# -- natrio dlq purge ---------------------------------------------------------------------


@dlq.command()
@connection_options
@_type_option
@_group_option
@click.option("--yes", is_flag=True, help="Confirm: purged entries are gone for good.")
def purge(
    url: str, connect_timeout: float, task_type: str | None, group: str | None, yes: bool
) -> None:
    """Remove dead letters (of --type, --group; without them, every message of the
    dead-letter stream) and their inputs kept in the object store.

    Refuses to run without --yes. Prints how many messages were removed.
    """
    if not yes:
        fail(f"this removes every dead letter{_filters(task_type, group)} for good: add --yes", 2)
    count = run(_purge, urls(url), connect_timeout, task_type, group)
    click.echo(str(count))
    say(f"purged {count} dead letter(s){_filters(task_type, group)}", "green")


async def _purge(
    urls: list[str], connect_timeout: float, task_type: str | None, group: str | None
) -> int:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio dlq") as nc:
        return await natrio.Client(nc).purge_dead_letters(task_type, group)
