"""Every invalid name and option fails at construction with ConfigurationError."""

from __future__ import annotations

import pytest

import natrio
from natrio.testing import WorkerFactory

BAD_NAMES = ["", "a.b", "a*", "a>", "a b", "tab\there", "x" * 65, "ä", None, 3]


async def ok(ctx: natrio.TaskContext) -> bytes:
    return b""


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_task_type(natrio_worker_factory: WorkerFactory, name: object) -> None:
    worker = natrio_worker_factory()
    with pytest.raises(natrio.ConfigurationError, match="task type"):
        worker.handle(name, ok)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_group(natrio_connection: natrio.Connection, name: object) -> None:
    with pytest.raises(natrio.ConfigurationError, match="group"):
        natrio.Worker(natrio_connection, groups=[name])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "options",
    [
        {"concurrency": 0},
        {"concurrency": -1},
        {"concurrency": 1.5},
        {"concurrency": True},
        {"groups": []},
        {"groups": "gpu"},
        {"groups": ["a", "a"]},
        {"ack_wait": 0},
        {"shutdown_grace": -1},
        {"prefetch": 0},
        {"retry": "often"},
        {"name": "a.b"},
    ],
)
async def test_bad_worker_options(
    natrio_connection: natrio.Connection, options: dict[str, object]
) -> None:
    with pytest.raises(natrio.ConfigurationError):
        natrio.Worker(natrio_connection, **options)  # type: ignore[arg-type]


async def test_duplicate_registration(natrio_worker_factory: WorkerFactory) -> None:
    worker = natrio_worker_factory()
    worker.handle("dup", ok)
    with pytest.raises(natrio.ConfigurationError, match="already registered"):
        worker.handle("dup", ok)


async def test_handler_must_be_async(natrio_worker_factory: WorkerFactory) -> None:
    worker = natrio_worker_factory()

    def sync_handler(ctx: natrio.TaskContext) -> bytes:
        return b""

    with pytest.raises(natrio.ConfigurationError, match="async"):
        worker.handle("sync", sync_handler)  # type: ignore[type-var]


async def test_typed_handler_needs_annotations(natrio_worker_factory: WorkerFactory) -> None:
    worker = natrio_worker_factory()

    async def no_input(ctx, value):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(natrio.ConfigurationError, match="annotate"):
        worker.handle_typed("t", no_input)

    async def no_return(ctx: natrio.TaskContext, value: int):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(natrio.ConfigurationError, match="return type"):
        worker.handle_typed("t", no_return)

    async def one_param(ctx: natrio.TaskContext) -> None:
        return None

    with pytest.raises(natrio.ConfigurationError, match="takes"):
        worker.handle_typed("t", one_param)


async def test_run_without_handlers(natrio_worker_factory: WorkerFactory) -> None:
    worker = natrio_worker_factory()
    with pytest.raises(natrio.ConfigurationError, match="no handlers"):
        await worker.run()


async def test_bad_handler_options(natrio_worker_factory: WorkerFactory) -> None:
    worker = natrio_worker_factory()
    with pytest.raises(natrio.ConfigurationError):
        worker.handle("a", ok, ack_wait=-1)
    with pytest.raises(natrio.ConfigurationError):
        worker.handle("b", ok, retry=3)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "options",
    [
        {"initial_interval": -1},
        {"backoff_coefficient": 0.5},
        {"maximum_interval": -1},
        {"maximum_attempts": -1},
        {"maximum_attempts": 1.5},
        {"jitter": 2},
        {"non_retryable": [3]},
    ],
)
def test_bad_retry_policy(options: dict[str, object]) -> None:
    with pytest.raises(natrio.ConfigurationError):
        natrio.RetryPolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"run_id": "a.b"},
        {"run_id": ""},
        {"step_id": "x y"},
        {"group": "g*"},
        {"deadline": -5},
        {"headers": {"": "x"}},
        {"headers": {"a": 1}},
        {"retry": "no"},
    ],
)
async def test_bad_submit_options(natrio_client: natrio.Client, options: dict[str, object]) -> None:
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.submit("ok", b"", **options)  # type: ignore[arg-type]


async def test_bad_submit_task_type(natrio_client: natrio.Client) -> None:
    with pytest.raises(natrio.ConfigurationError, match="task type"):
        await natrio_client.submit("a.b")


async def test_bad_provision_options(natrio_connection: natrio.Connection) -> None:
    for options in (
        {"replicas": 0},
        {"storage": "disk"},
        {"worker_ttl": 0},
        {"duplicate_window": 0},
    ):
        with pytest.raises(natrio.ConfigurationError):
            await natrio.provision(natrio_connection, **options)


async def test_stop_with_bad_grace(natrio_worker_factory: WorkerFactory) -> None:
    with pytest.raises(natrio.ConfigurationError):
        natrio_worker_factory().stop(-1)


async def test_unreachable_server_names_the_url() -> None:
    with trio_fail_after(10), pytest.raises(natrio.ConnectError, match=r"127\.0\.0\.1:1"):
        async with natrio.connect("nats://user:secret@127.0.0.1:1", connect_timeout=1.0):
            pass


async def test_connect_error_hides_credentials() -> None:
    with pytest.raises(natrio.ConnectError) as info:
        async with natrio.connect("nats://user:secret@127.0.0.1:1", connect_timeout=0.5):
            pass
    assert "secret" not in str(info.value)


def trio_fail_after(seconds: float):  # type: ignore[no-untyped-def]
    import trio

    return trio.fail_after(seconds)
