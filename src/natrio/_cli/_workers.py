"""``natrio workers``: the worker directory."""

from __future__ import annotations

import json

import click
from rich.table import Table
from rich.text import Text

import natrio

from .._routing.claims import unheld_claims
from ._app import cli, connection_options, json_option, make_console, run, say, urls

# -- natrio workers -----------------------------------------------------------------------


@cli.command()
@connection_options
@json_option("Print a JSON list instead of a table.")
def workers(url: str, connect_timeout: float, as_json: bool) -> None:
    """List the workers registered in the worker directory.

    A worker that died without deregistering disappears once its entry's TTL passes.
    """
    found, waiting = run(_workers, urls(url), connect_timeout)
    if as_json:
        click.echo(json.dumps([json.loads(info.to_json()) for info in found], indent=2))
        return
    if not found:
        say("no workers registered")
    else:
        _workers_table(found)
    if waiting:
        table = Table(title="tasks waiting for a claim no live worker holds", title_justify="left")
        table.add_column("consumer", no_wrap=True)
        table.add_column("claim")
        table.add_column("waiting", justify="right")
        for name, claim, count in waiting:
            table.add_row(Text(name), Text(claim), str(count))
        make_console().print(table)


def _workers_table(found: list[natrio.WorkerInfo]) -> None:
    table = Table(title=f"natrio workers ({len(found)})", title_justify="left")
    table.add_column("worker id", no_wrap=True)
    table.add_column("task types")
    table.add_column("groups")
    table.add_column("partitions")
    table.add_column("claims")
    table.add_column("host")
    table.add_column("pid", justify="right")
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
    make_console().print(table)


async def _workers(
    urls: list[str], connect_timeout: float
) -> tuple[list[natrio.WorkerInfo], list[tuple[str, str, int]]]:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio workers") as nc:
        found = await natrio.list_workers(nc)
        return found, await unheld_claims(nc, found)
