"""A three-node JetStream cluster of real nats-server processes on loopback, for chaos tests.

Each node gets a free client port, cluster (route) port and HTTP monitoring port on
127.0.0.1, a config file and a store directory under one temporary directory, and is
run by :class:`natrio.EmbeddedServer` (``jetstream=False``: the config file enables
JetStream and names the store directory). :meth:`Cluster.kill` and
:meth:`Cluster.restart` act on one node; a restart keeps its ports and store, so it
rejoins the cluster with its data. Roles are read from the servers themselves: the
meta leader from the monitoring endpoint ``/jsz``, a stream's leader from
``$JS.API.STREAM.INFO``.

Use :func:`open_cluster` from Trio code: it starts the nodes, waits until the JetStream
meta group has a leader, and kills every node on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

import natrio
from natrio._jetstream import JetStream

_HOST = "127.0.0.1"
# How often to look again at a state only observable by asking (HTTP monitoring, $JS.API).
_POLL = 0.1


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((_HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


@attrs.define
class Node:
    """One cluster member: its name, ports, files and server process."""

    name: str
    port: int
    cluster_port: int
    http_port: int
    store_dir: str
    config: str
    server: natrio.EmbeddedServer

    @property
    def url(self) -> str:
        return f"nats://{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.server.running

    def monitor(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET ``path`` from the node's monitoring port: the status and the decoded JSON.

        Blocking; call it in a thread. Raises OSError when the node does not answer.
        """
        url = f"http://{_HOST}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else None


def _node_config(
    name: str, port: int, cluster_port: int, http_port: int, store_dir: str, peers: list[int]
) -> str:
    routes = ", ".join(f"nats-route://{_HOST}:{p}" for p in peers)
    return (
        f"server_name: {name}\n"
        # EmbeddedServer passes the same address and port as -a/-p.
        f"listen: {_HOST}:{port}\n"
        f"http: {_HOST}:{http_port}\n"
        f"jetstream {{\n  store_dir: {json.dumps(store_dir)}\n}}\n"
        "cluster {\n"
        "  name: natrio\n"
        f"  listen: {_HOST}:{cluster_port}\n"
        f"  routes: [{routes}]\n"
        "}\n"
    )


class Cluster:
    """Three (or ``size``) JetStream nodes named n1, n2, ...; nothing runs until :meth:`start`."""

    def __init__(self, base_dir: str, size: int = 3) -> None:
        ports = free_ports(3 * size)
        cluster_ports = ports[size : 2 * size]
        self.nodes: list[Node] = []
        for i in range(size):
            name = f"n{i + 1}"
            store_dir = os.path.join(base_dir, name)
            os.makedirs(store_dir)
            config = os.path.join(base_dir, f"{name}.conf")
            peers = [p for j, p in enumerate(cluster_ports) if j != i]
            with open(config, "w", encoding="utf-8") as out:
                out.write(
                    _node_config(
                        name, ports[i], cluster_ports[i], ports[2 * size + i], store_dir, peers
                    )
                )
            server = natrio.EmbeddedServer(port=ports[i], jetstream=False, args=["-c", config])
            self.nodes.append(
                Node(
                    name, ports[i], cluster_ports[i], ports[2 * size + i], store_dir, config, server
                )
            )

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    def index(self, name: str) -> int:
        """The index of the node called ``name``."""
        for i, node in enumerate(self.nodes):
            if node.name == name:
                return i
        raise KeyError(name)

    def live(self) -> list[int]:
        """Indexes of the nodes whose process is running."""
        return [i for i, node in enumerate(self.nodes) if node.running]

    # -- lifecycle (blocking; Trio code runs these in threads) ---------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start every node that is not running."""
        for node in self.nodes:
            node.server.start(timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and reap it."""
        self.nodes[i].server.kill()

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start node ``i`` again (same ports, same store) and wait until it is ready."""
        self.nodes[i].server.start(timeout)

    def close(self) -> None:
        """Kill every node (there is nothing to keep: the store is thrown away)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.server.kill()

    def log_tail(self, i: int) -> str:
        """The last lines node ``i`` logged."""
        return self.nodes[i].server.log_tail

    # -- roles ------------------------------------------------------------------------

    async def monitor(self, i: int, path: str) -> tuple[int, Any]:
        """GET ``path`` from node ``i``'s monitoring port (in a thread)."""
        return await trio.to_thread.run_sync(self.nodes[i].monitor, path)

    async def meta_leader(self) -> str | None:
        """The JetStream meta leader's name as a live node reports it, or None if none knows."""
        for i in self.live():
            try:
                status, body = await self.monitor(i, "/jsz")
            except OSError:
                continue
            if status == 200 and body:
                leader = (body.get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    async def wait_healthy(self, i: int) -> None:
        """Wait until node ``i`` says it is healthy: JetStream on, meta leader known, and
        every stream and consumer it holds current (``/healthz``). Bound it by the caller."""
        while True:
            try:
                status, _ = await self.monitor(i, "/healthz")
            except OSError:
                status = 0
            if status == 200:
                return
            await trio.sleep(_POLL)

    async def wait_meta_leader(self, nc: natrio.Connection) -> None:
        """Wait until the JetStream API answers (so the meta group has a leader). Bound it by
        the caller."""
        js = JetStream(nc, timeout=1.0)
        while True:
            try:
                await js.api("INFO")
                return
            except natrio.NatrioError:
                # No meta leader yet: 503 "temporarily unavailable", no reply, or no responders.
                await trio.sleep(_POLL)

    async def stream_leader(self, nc: natrio.Connection, stream: str) -> str | None:
        """The name of the node leading ``stream``'s replica group, or None during an election."""
        info = await JetStream(nc, timeout=2.0).stream_info(stream)
        leader = (info.get("cluster") or {}).get("leader")
        return str(leader) if leader else None


@contextlib.asynccontextmanager
async def open_cluster(size: int = 3, start_timeout: float = 20.0) -> AsyncIterator[Cluster]:
    """Start a cluster in a temporary directory, wait for a meta leader, yield it; every node is
    killed and the directory removed on exit, even on failure or cancellation."""
    with tempfile.TemporaryDirectory(
        prefix="natrio-cluster-", ignore_cleanup_errors=True
    ) as base_dir:
        cluster = Cluster(base_dir, size)
        try:
            # Concurrently: each start returns once its node logs "Server is ready".
            async with trio.open_nursery() as nursery:
                for node in cluster.nodes:
                    nursery.start_soon(trio.to_thread.run_sync, node.server.start, start_timeout)
            async with natrio.connect(cluster.urls) as nc:
                with trio.fail_after(start_timeout):
                    await cluster.wait_meta_leader(nc)
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cluster.close)
