"""The ``natrio`` command line against real nats-server processes.

Commands that return run in-process with click's CliRunner (plain sync tests: each
invocation calls ``trio.run`` itself); ``natrio server`` and ``natrio worker``, which run
until signalled, and commands that must be running while the test acts (``natrio
stream``, ``natrio submit --wait``) run as subprocesses and are synchronised on the lines
they print.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from click.testing import CliRunner, Result

import natrio
from natrio._cli import cli, load_worker_factory, make_worker
from natrio._routing.placement import fnv1a_32

from . import cli_app

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "nats://127.0.0.1:1"
URL_LINE = re.compile(r"^nats://127\.0\.0\.1:(\d+)$")
STARTED_LINE = re.compile(r"worker (\S+) started")
CLI_APP_TASK_TYPES = (
    "cli-add",
    "cli-approve",
    "cli-binary",
    "cli-count",
    "cli-echo",
    "cli-fail",
)


def invoke(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> Result:
    """Run ``natrio ARGS`` in-process; NATRIO_URL is unset unless ``env`` sets it."""
    runner = CliRunner(env={"NATRIO_URL": None, **(env or {})})
    return runner.invoke(cli, list(args), input=input, catch_exceptions=True)


def ok(result: Result) -> Result:
    """``result``, after checking the command succeeded (showing its output if not)."""
    assert result.exit_code == 0, (result.exception, result.stdout, result.stderr)
    return result


class Process:
    """``python -m natrio ARGS`` in a subprocess, its output lines read as they come."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NATRIO_URL"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "natrio", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: dict[str, queue.Queue[str | None]] = {
            "stdout": queue.Queue(),
            "stderr": queue.Queue(),
        }
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            assert stream is not None
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream: IO[str]) -> None:
        # Drains the pipe for the whole life of the process, so it never blocks on a write.
        for line in stream:
            self.lines[name].put(line.rstrip("\n"))
        self.lines[name].put(None)

    def expect(
        self, pattern: re.Pattern[str] | str, *, stream: str = "stderr", timeout: float = 10.0
    ) -> re.Match[str]:
        """Wait for a line matching ``pattern`` and return the match."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[stream].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} on {stream} in {timeout} s: {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{stream} ended without a line matching {pattern!r}: {self.seen}"
                )
            self.seen[stream].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self, signum: int, timeout: float) -> int:
        """Send ``signum`` and return the exit status, which must come within ``timeout`` s."""
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {timeout} s after {signum!r}: {self.seen}"
            ) from None

    def exit_status(self, timeout: float) -> int:
        """The exit status of a process that must end by itself within ``timeout`` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s: {self.seen}") from None

    def rest(self, stream: str) -> list[str]:
        """Every line of ``stream`` (the process must have exited)."""
        while (line := self.lines[stream].get(timeout=5)) is not None:
            self.seen[stream].append(line)
        self.lines[stream].put(None)
        return self.seen[stream]

    def close(self) -> None:
        """Kill the process if a failed test left it running."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture(scope="module")
def cli_server() -> Iterator[natrio.EmbeddedServer]:
    """A provisioned nats-server shared by this module's tests (provisioned with the CLI)."""
    server = natrio.EmbeddedServer()
    try:
        server.start()
        ok(invoke("provision", "--url", server.url))
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cli_worker(cli_server: natrio.EmbeddedServer) -> Iterator[tuple[Process, str]]:
    """``natrio worker tests.cli_app:make_worker`` running, and its worker id."""
    process = Process(
        "worker", "tests.cli_app:make_worker", "--url", cli_server.url, "--grace", "5"
    )
    try:
        worker_id = process.expect(STARTED_LINE)[1]
        yield process, worker_id
    finally:
        process.close()


# -- natrio server ------------------------------------------------------------------------


def test_server_prints_a_usable_url_and_stops_on_sigterm() -> None:
    process = Process("server", "--port", "0")
    try:
        url = process.expect(URL_LINE, stream="stdout")[0]
        pid = int(process.expect(r"nats-server (\d+) listening")[1])
        # Provisioned already: the worker directory's bucket exists.
        assert json.loads(ok(invoke("workers", "--url", url, "--json")).stdout) == []
        assert process.stop(signal.SIGTERM, timeout=5) == 0
        stderr = process.rest("stderr")
        assert "nats-server stopped" in stderr
        assert not any("Traceback" in line for line in stderr)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        process.close()


def test_server_without_provisioning_stops_on_sigint(tmp_path: Path) -> None:
    store = tmp_path / "js"
    process = Process("server", "--port", "0", "--no-provision", "--store-dir", str(store))
    try:
        url = process.expect(URL_LINE, stream="stdout")[0]
        result = invoke("workers", "--url", url)
        assert result.exit_code == 1
        assert "natrio provision" in result.stderr
        ok(invoke("provision", "--url", url))
        assert process.stop(signal.SIGINT, timeout=5) == 0
        assert store.is_dir()
    finally:
        process.close()


def test_server_on_a_busy_port_exits_1_with_the_reason(cli_server: natrio.EmbeddedServer) -> None:
    result = invoke("server", "--port", str(cli_server.port))
    assert result.exit_code == 1, (result.exception, result.stderr)
    assert "address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- natrio submit / natrio workers against a worker process ------------------------------


def test_submit_and_wait(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    url = cli_server.url
    result = ok(
        invoke(
            "submit",
            "cli-echo",
            '{"x": [1, 2]}',
            "--url",
            url,
            "--run-id",
            "r-1",
            "--wait",
            "--timeout",
            "10",
        )
    )
    first, output = result.stdout.splitlines()
    run_id, step_id, seq = first.split()
    assert (run_id, step_id) == ("r-1", "cli-echo")
    assert int(seq) > 0
    assert output == '{"x": [1, 2]}'

    # A typed handler decodes the JSON; its output is JSON text.
    result = ok(
        invoke("submit", "cli-add", '{"a": 2, "b": 3}', "--url", url, "--wait", "--timeout", "10")
    )
    assert json.loads(result.stdout.splitlines()[1]) == {"sum": 5}

    # Output that is not UTF-8 is shown as a bytes literal.
    result = ok(
        invoke(
            "submit", "cli-binary", "--url", url, "--step-id", "s-2", "--wait", "--timeout", "10"
        )
    )
    first, output = result.stdout.splitlines()
    assert first.split()[1] == "s-2"
    assert output == repr(b"\xff\x00binary")


def test_submit_without_wait_prints_ids_only(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    result = ok(invoke("submit", "cli-echo", "[]", "--url", cli_server.url, "--group", "default"))
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.split()[1] == "cli-echo"


def test_dead_lettered_task_exits_1(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    result = invoke("submit", "cli-fail", "--url", cli_server.url, "--wait", "--timeout", "10")
    assert result.exit_code == 1, (result.exception, result.stderr)
    assert len(result.stdout.splitlines()) == 1  # the ids, then no output
    assert "refused on purpose" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_wait_timeout_exits_1(cli_server: natrio.EmbeddedServer) -> None:
    # Nobody serves this task type, so no outcome ever comes.
    result = invoke("submit", "cli-nobody", "--url", cli_server.url, "--wait", "--timeout", "0.3")
    assert result.exit_code == 1
    assert "within 0.3 s" in result.stderr


def test_workers_lists_the_worker(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    process, worker_id = cli_worker
    table = ok(invoke("workers", "--url", cli_server.url)).stdout
    row = next(line for line in table.splitlines() if worker_id in line)
    assert "cli-echo" in row
    assert str(process.popen.pid) in row

    # The URL may come from $NATRIO_URL.
    listed = json.loads(ok(invoke("workers", "--json", env={"NATRIO_URL": cli_server.url})).stdout)
    (entry,) = (info for info in listed if info["worker_id"] == worker_id)
    assert entry["pid"] == process.popen.pid
    assert entry["groups"] == ["default"]
    assert set(entry["task_types"]) == set(CLI_APP_TASK_TYPES)
    assert {"hostname", "in_flight", "processed", "failed", "last_seen"} <= entry.keys()


def test_worker_lets_a_running_task_finish_on_sigterm(cli_server: natrio.EmbeddedServer) -> None:
    url = cli_server.url
    process = Process("worker", "tests.cli_app:make_slow_worker", "--url", url, "--grace", "5")
    try:
        worker_id = process.expect(STARTED_LINE)[1]
        ok(invoke("submit", "cli-slow", "--url", url, "--run-id", "slow-1"))
        process.expect("SLOW STARTED slow-1")
        started = time.monotonic()
        assert process.stop(signal.SIGTERM, timeout=5 + 2) == 0
        assert time.monotonic() - started < 5 + 1
        stderr = process.rest("stderr")
        assert f"worker {worker_id} stopped" in stderr
        assert not any("Traceback" in line for line in stderr)
    finally:
        process.close()
    # The task completed during the grace: submitting it again is a duplicate whose
    # outcome is read back from the events stream.
    result = ok(
        invoke(
            "submit", "cli-slow", "--url", url, "--run-id", "slow-1", "--wait", "--timeout", "10"
        )
    )
    assert result.stdout.splitlines()[1] == "slow done"
    assert "duplicate" in result.stderr
    # ...and the worker left the directory as it stopped.
    listed = json.loads(ok(invoke("workers", "--url", url, "--json")).stdout)
    assert worker_id not in {info["worker_id"] for info in listed}


# -- natrio signal / natrio stream ---------------------------------------------------------


def test_signal_wakes_a_waiting_step(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    worker, _ = cli_worker
    url = cli_server.url
    waiter = Process(
        "submit", "cli-approve", "--url", url, "--run-id", "approve-1", "--wait", "--timeout", "20"
    )
    try:
        waiter.expect(r"^approve-1 cli-approve \d+$", stream="stdout")
        worker.expect("APPROVE WAITING approve-1")
        result = ok(invoke("signal", "approve-1", "approval", "yes", "--url", url))
        assert result.stdout == ""
        assert result.stderr.strip() == "signal approval sent to run approve-1"
        # The step returns the signal's data, which `submit --wait` prints.
        waiter.expect("^yes$", stream="stdout")
        assert waiter.exit_status(timeout=10) == 0
    finally:
        waiter.close()


@pytest.mark.parametrize(
    ("run_id", "args", "stdin", "output"),
    [
        ("approve-2", ["early"], None, "early"),
        # `-` reads the data from stdin, bytes as they are: not decoded, newline kept.
        ("approve-3", ["-"], b"\xffraw\n", repr(b"\xffraw\n")),
        ("approve-4", [], None, ""),
    ],
)
def test_signal_sent_before_the_step_starts_is_seen(
    cli_server: natrio.EmbeddedServer,
    cli_worker: tuple[Process, str],
    run_id: str,
    args: list[str],
    stdin: bytes | None,
    output: str,
) -> None:
    url = cli_server.url
    ok(invoke("signal", run_id, "approval", *args, "--url", url, input=stdin))
    result = ok(
        invoke(
            "submit", "cli-approve", "--url", url, "--run-id", run_id, "--wait", "--timeout", "20"
        )
    )
    assert result.stdout.splitlines()[1:] == [output]


def test_stream_prints_chunks_as_they_come_then_the_outcome(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    url = cli_server.url
    # The step waits for "go" before it streams anything.
    ok(invoke("submit", "cli-count", "--url", url, "--run-id", "count-1"))
    follower = Process("stream", "count-1", "cli-count", "--url", url, "--timeout", "20")
    try:
        follower.expect("listening")
        ok(invoke("signal", "count-1", "go", "--url", url))
        assert follower.exit_status(timeout=10) == 0
        assert follower.rest("stdout") == ["chunk 0", "chunk 1", "chunk 2"]
        stderr = follower.rest("stderr")
        assert stderr[-1] == "run count-1 step cli-count completed"
    finally:
        follower.close()

    # The step has ended: the stream ends at once, with the same outcome and no chunks
    # (it does not wait the client's check interval of 5 s either).
    started = time.monotonic()
    result = ok(invoke("stream", "count-1", "cli-count", "--url", url))
    assert time.monotonic() - started < 4
    assert result.stdout == ""
    assert result.stderr.strip() == "run count-1 step cli-count completed"


def test_stream_of_a_dead_step_exits_1(
    cli_server: natrio.EmbeddedServer, cli_worker: tuple[Process, str]
) -> None:
    url = cli_server.url
    result = invoke(
        "submit", "cli-fail", "--url", url, "--run-id", "dead-1", "--wait", "--timeout", "10"
    )
    assert result.exit_code == 1, (result.exception, result.stderr)
    result = invoke("stream", "dead-1", "cli-fail", "--url", url, "--timeout", "10")
    assert result.exit_code == 1, (result.exception, result.stderr)
    assert result.stdout == ""
    assert "run dead-1 step cli-fail dead" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stream_timeout_exits_1(cli_server: natrio.EmbeddedServer) -> None:
    # No such step: the stream never ends.
    result = invoke("stream", "nobody-1", "cli-nobody", "--url", cli_server.url, "--timeout", "0.3")
    assert result.exit_code == 1, (result.exception, result.stderr)
    assert "listening" in result.stderr
    assert "within 0.3 s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["signal", "r-1", "a.b"], "invalid signal name 'a.b'"),
        (["signal", "r-1", "a b", "data"], "invalid signal name 'a b'"),
        (["signal", "r.1", "go"], "invalid run id 'r.1'"),
        (["stream", "r*1", "s-1"], "invalid run id 'r*1'"),
        (["stream", "r-1", "s>1"], "invalid step id 's>1'"),
    ],
)
def test_invalid_signal_and_stream_names_exit_2(
    cli_server: natrio.EmbeddedServer, command: list[str], message: str
) -> None:
    result = invoke(*command, "--url", cli_server.url)
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- the worker factory --------------------------------------------------------------------


async def test_make_worker_accepts_sync_and_async_factories(
    cli_server: natrio.EmbeddedServer,
) -> None:
    async with natrio.connect(cli_server.url) as nc:
        assert (await make_worker(cli_app.make_worker, nc)).task_types == CLI_APP_TASK_TYPES
        assert (await make_worker(cli_app.make_slow_worker, nc)).task_types == ("cli-slow",)
        with pytest.raises(natrio.ConfigurationError, match=r"returned str, not a natrio\.Worker"):
            await make_worker(cli_app.returns_string, nc)  # type: ignore[arg-type]


def test_load_worker_factory_finds_dotted_attributes(tmp_path: Path) -> None:
    (tmp_path / "cli_app_dotted.py").write_text(
        "class Holder:\n    @staticmethod\n    def factory(nc):\n        raise NotImplementedError\n"
    )
    factory = load_worker_factory("cli_app_dotted:Holder.factory", str(tmp_path))
    assert factory.__name__ == "factory"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.cli_app", "is not MODULE:ATTRIBUTE"),
        (":make_worker", "is not MODULE:ATTRIBUTE"),
        ("tests.cli_app:", "is not MODULE:ATTRIBUTE"),
        ("tests.no_such_module:make_worker", "could not import module 'tests.no_such_module'"),
        ("tests.cli_app:no_such_factory", "has no attribute 'no_such_factory'"),
        ("tests.cli_app:NOT_CALLABLE", "is not a worker factory"),
    ],
)
def test_bad_worker_spec_exits_2(spec: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    # Checked before connecting, so the unreachable URL is never tried.
    result = invoke("worker", spec, "--url", UNREACHABLE)
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_module_failing_to_import_exits_2(tmp_path: Path) -> None:
    (tmp_path / "cli_app_broken.py").write_text("import os\n\n1 / 0\n")
    result = invoke(
        "worker", "cli_app_broken:make_worker", "--app-dir", str(tmp_path), "--url", UNREACHABLE
    )
    assert result.exit_code == 2
    assert "error while importing 'cli_app_broken': ZeroDivisionError" in result.stderr
    assert "cli_app_broken.py:3" in result.stderr


def test_factory_returning_something_else_exits_2(
    cli_server: natrio.EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    result = invoke("worker", "tests.cli_app:returns_string", "--url", cli_server.url)
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert "returned str, not a natrio.Worker" in result.stderr


# -- errors before or instead of talking to NATS ---------------------------------------------


@pytest.mark.parametrize("payload", ["{bad", "", "[1, 2"])
def test_invalid_json_exits_2(payload: str) -> None:
    result = invoke("submit", "cli-echo", payload, "--url", UNREACHABLE)
    assert result.exit_code == 2
    assert "not valid JSON" in result.stderr


def test_invalid_task_type_exits_2(cli_server: natrio.EmbeddedServer) -> None:
    result = invoke("submit", "a.b", "--url", cli_server.url)
    assert result.exit_code == 2
    assert "task type" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["workers"],
        ["submit", "cli-echo", "{}"],
        ["provision"],
        ["signal", "r-1", "go"],
        ["stream", "r-1", "s-1"],
    ],
)
def test_unreachable_server_exits_1_naming_the_url(command: list[str]) -> None:
    started = time.monotonic()
    result = invoke(*command, "--connect-timeout", "0.5", env={"NATRIO_URL": UNREACHABLE})
    assert time.monotonic() - started < 4
    assert result.exit_code == 1, (result.exception, result.stderr)
    assert UNREACHABLE in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_help_and_version() -> None:
    result = ok(invoke("--help"))
    for command in ("server", "worker", "submit", "workers", "provision", "signal", "stream"):
        assert command in result.stdout
    assert "natrio.Connection" in ok(invoke("worker", "--help")).stdout
    assert natrio.__version__ in ok(invoke("--version")).stdout


def test_workers_show_partitions_claims_and_tasks_waiting_for_a_claim(
    cli_server: natrio.EmbeddedServer,
) -> None:
    url = cli_server.url
    process = Process("worker", "tests.cli_app:make_routing_worker", "--url", url, "--grace", "1")
    try:
        worker_id = process.expect(STARTED_LINE)[1]
        listed = json.loads(ok(invoke("workers", "--url", url, "--json")).stdout)
        (entry,) = (info for info in listed if info["worker_id"] == worker_id)
        assert entry["partitions"] == {"cli-part/default": [0, 1, 2, 3]}
        assert set(entry["claims"]) == {"cli-claim", natrio.worker_target("cli-routing")}
        assert entry["routing"]["cli-part"]["partitions"] == 4
        # A key picks the partition; the task runs in it.
        result = ok(
            invoke("submit", "cli-part", "--url", url, "--key", "k1", "--wait", "--timeout", "10")
        )
        assert result.stdout.splitlines()[1] == str(fnv1a_32(b"k1") % 4)
        # Targeted at the claim held: runs; at one nobody holds: waits, and is shown.
        result = ok(
            invoke(
                "submit",
                "cli-targeted",
                '"here"',
                "--url",
                url,
                "--target",
                "cli-claim",
                "--wait",
                "--timeout",
                "10",
            )
        )
        assert result.stdout.splitlines()[1] == '"here"'
        ok(invoke("submit", "cli-targeted", "--url", url, "--target", "nobody-holds"))
        table = ok(invoke("workers", "--url", url)).stdout
        assert "0,1,2,3" in table
        waiting = table[table.index("waiting for a claim") :]
        assert "cli-targeted~default~tnobody-holds" in waiting
        assert "nobody-holds" in waiting
    finally:
        process.close()
