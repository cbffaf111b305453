"""``natrio submit``, ``natrio signal`` and ``natrio stream``."""

from __future__ import annotations

import json
import math
import sys

import click
import trio

import natrio

from ._app import CommandError, cli, connection_options, run, say, seconds_option, urls

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
@connection_options
@click.option("--group", default=None, help="Worker group to send the task to. Default: default.")
@click.option("--run-id", default=None, help="Run id. Default: a random one.")
@click.option("--step-id", default=None, help="Step id. Default: the task type.")
@click.option("--key", default=None, help="Partition key (partitioned types). Default: the run id.")
@click.option("--target", default=None, help="Run only on a worker holding this claim.")
@click.option(
    "--soft", is_flag=True, help="With --target: any worker may run it while no holder is alive."
)
@click.option("--wait", is_flag=True, help="Wait for the task's outcome and print its output.")
@seconds_option(
    "--timeout",
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
    run(
        _submit,
        urls(url),
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
            say(
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
            raise CommandError(
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
@connection_options
def signal_command(run_id: str, name: str, data: bytes, url: str, connect_timeout: float) -> None:
    """Send signal NAME with DATA to run RUN.

    A step of the run waiting in `ctx.wait_for_signal(NAME, ...)` wakes with DATA; one
    that starts waiting later gets it at once. DATA (default: empty) is sent as its
    UTF-8 bytes; `-` reads it from stdin, sent as is (a trailing newline included).
    Prints a confirmation on stderr, nothing on stdout.
    """
    run(_send_signal, urls(url), connect_timeout, run_id, name, data)


async def _send_signal(
    urls: list[str], connect_timeout: float, run_id: str, name: str, data: bytes
) -> None:
    async with natrio.connect(urls, connect_timeout=connect_timeout, name="natrio signal") as nc:
        await natrio.Client(nc).send_signal(run_id, name, data)
    say(f"signal {name} sent to run {run_id}", "green")


# -- natrio stream ------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("step_id", metavar="STEP")
@connection_options
@seconds_option(
    "--timeout",
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
    run(_stream, urls(url), connect_timeout, run_id, step_id, wait_timeout=timeout)


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
                    say(f"listening to the stream of run {run_id} step {step_id}")
                async for data in chunks:
                    # click.echo flushes, so a pipe sees each chunk as it arrives.
                    click.echo(_show_output(data))
    if scope.cancelled_caught:
        raise CommandError(f"run {run_id} step {step_id} did not end within {wait_timeout:g} s")
    if chunks.outcome == "completed":
        say(f"run {run_id} step {step_id} completed", "green")
        return
    if chunks.outcome == "dead":
        raise CommandError(f"run {run_id} step {step_id} dead (dead-lettered)")
    raise CommandError(  # pragma: no cover - StepStream ends only with an outcome
        f"the stream of run {run_id} step {step_id} ended without an outcome"
    )
