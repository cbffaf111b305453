"""``natrio server`` and ``natrio provision``."""

from __future__ import annotations

import signal

import click
import trio

import natrio

from ._app import cli, connection_options, run, say, urls

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
    run(_serve, port, store_dir, provision)


async def _serve(port: int, store_dir: str | None, provision: bool) -> None:
    # Opened first so that a signal arriving during start-up stops the server once it is
    # up, instead of killing this process and orphaning nats-server.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with natrio.embedded_server(port=port, store_dir=store_dir) as srv:
            if provision:
                async with natrio.connect(srv.url, name="natrio server") as nc:
                    await natrio.provision(nc)
            say(
                f"nats-server {srv.pid} listening on {srv.url} "
                f"(JetStream store {srv.store_dir}"
                f"{'' if provision else ', not provisioned'}); Ctrl-C to stop",
                "green",
            )
            click.echo(srv.url)
            async for signum in signals:
                say(f"received {signal.Signals(signum).name}; stopping nats-server")
                break
    say("nats-server stopped")


# -- natrio provision ---------------------------------------------------------------------


@cli.command()
@connection_options
def provision(url: str, connect_timeout: float) -> None:
    """Create or update natrio's streams and KV buckets on a server (idempotent).

    Needed once per server before workers and clients use it; `natrio server` does it
    for you.
    """
    run(_provision, url, connect_timeout)


async def _provision(url: str, connect_timeout: float) -> None:
    async with natrio.connect(
        urls(url), connect_timeout=connect_timeout, name="natrio provision"
    ) as nc:
        await natrio.provision(nc)
        say(f"provisioned {nc.url}", "green")
