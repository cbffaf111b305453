"""A TCP proxy in its own process, to cut one client off from the server: SIGSTOP it and
every byte either way waits in the kernel (no reset, no close: a silent network
partition); SIGCONT it and the bytes flow again.

Usage: python -m tests.chaos.tcp_proxy TARGET_PORT — prints ``READY <port>`` once it
listens on 127.0.0.1.
"""

from __future__ import annotations

import sys

import trio


async def pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()  # one side gone: the pair ends


async def main(target: int) -> None:
    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(pump, upstream, client, nursery.cancel_scope)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(relay, listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
