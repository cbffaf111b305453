"""The JetStream API as JSON requests over the bridge: streams, consumers, publishes, KV reads."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from ._asyncio.bridge import Connection, Message, Subscription
from ._errors import JetStreamError, NatrioError, NoResponders

API = "$JS.API"

# JetStream error codes natrio reacts to.
STREAM_NOT_FOUND = 10059
STREAM_NAME_IN_USE = 10058
CONSUMER_NOT_FOUND = 10014
MESSAGE_NOT_FOUND = 10037


class JetStream:
    """JetStream operations natrio needs, each a request to the ``$JS.API`` or a publish."""

    def __init__(self, conn: Connection, *, timeout: float = 5.0) -> None:
        self.conn = conn
        self.timeout = timeout

    async def api(self, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<subject>`` and return the JSON reply; JetStreamError on an error reply."""
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await self._request(f"{API}.{subject}", payload)
        except NoResponders:
            raise NatrioError(
                "JetStream is not enabled on this server (no responders on $JS.API); "
                "start nats-server with -js"
            ) from None
        return _reply(msg)

    async def _request(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> Message:
        return await self.conn.request(subject, payload, headers=headers, timeout=self.timeout)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Publish into a stream and wait for the stream's acknowledgement (its ``PubAck``).

        The reply has ``stream``, ``seq`` and ``duplicate`` (true when ``Nats-Msg-Id``
        matched an earlier message inside the duplicate window).
        """
        try:
            msg = await self._request(subject, payload, headers)
        except NoResponders:
            raise _no_stream(subject) from None
        return _reply(msg)

    def publish_nowait(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        on_ack: Callable[[dict[str, Any] | None, NatrioError | None], None],
    ) -> None:
        """Publish into a stream without waiting: ``on_ack(puback, error)`` is called once,
        synchronously, with the stream's acknowledgement or with what went wrong
        (RequestTimeout, NoResponders, ConnectionClosed, JetStreamError)."""

        def on_reply(msg: Message | None, error: BaseException | None) -> None:
            if msg is not None and msg.status == "503":
                error = _no_stream(subject)
            if error is None:
                assert msg is not None
                try:
                    ack = _reply(msg)
                except (JetStreamError, ValueError) as exc:
                    error = exc if isinstance(exc, NatrioError) else JetStreamError(0, 0, str(exc))
                else:
                    on_ack(ack, None)
                    return
            on_ack(None, error if isinstance(error, NatrioError) else NatrioError(repr(error)))

        self.conn.request_nowait(
            subject, payload, headers=headers, timeout=self.timeout, on_reply=on_reply
        )

    async def ensure_stream(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Create the stream, or update it to ``config`` when it exists."""
        name = config["name"]
        try:
            return await self.api(f"STREAM.CREATE.{name}", config)
        except JetStreamError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
        return await self.api(f"STREAM.UPDATE.{name}", config)

    async def stream_info(self, name: str, *, subjects_filter: str | None = None) -> dict[str, Any]:
        """The stream's config and state; with ``subjects_filter``, its subjects and counts."""
        body = {"subjects_filter": subjects_filter} if subjects_filter else None
        return await self.api(f"STREAM.INFO.{name}", body)

    async def subjects(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Every subject in ``stream`` matching the filter, with its message count.

        The server answers with at most 100,000 subjects at a time; this pages through all.
        """
        found: dict[str, int] = {}
        while True:
            body = {"subjects_filter": subjects_filter, "offset": len(found)}
            info = await self.api(f"STREAM.INFO.{stream}", body)
            page = (info.get("state") or {}).get("subjects") or {}
            found.update(page)
            if not page or len(found) >= int(info.get("total") or 0):
                return found

    async def ensure_consumer(self, stream: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Create the durable consumer, or update it to ``config`` when it exists."""
        name = config["durable_name"]
        subject = f"CONSUMER.CREATE.{stream}.{name}"
        if "filter_subject" in config:
            # The filter in the subject too: then the server rejects a body that differs,
            # and permissions on this subject pin what the consumer may ever read.
            subject += f".{config['filter_subject']}"
        return await self.api(subject, {"stream_name": stream, "config": dict(config)})

    async def consumer_info(self, stream: str, name: str) -> dict[str, Any]:
        """The consumer's config and state (delivered, ack pending, waiting pulls)."""
        return await self.api(f"CONSUMER.INFO.{stream}.{name}")

    async def delete_consumer(self, stream: str, name: str) -> None:
        """Delete a consumer; a missing one is not an error."""
        try:
            await self.api(f"CONSUMER.DELETE.{stream}.{name}")
        except JetStreamError as exc:
            if exc.err_code != CONSUMER_NOT_FOUND:
                raise

    async def last_message(self, stream: str, subject: str) -> Message | None:
        """The last message stored on ``subject`` (a direct get), or None when there is none."""
        # The subject in the request subject (not the body), so that permissions can
        # scope who may read what.
        msg = await self._request(f"{API}.DIRECT.GET.{stream}.{subject}", b"")
        status = msg.status
        if status == "404":
            return None
        if status is not None and status != "200":
            raise JetStreamError(
                int(status), 0, msg.header("Description", "") or "direct get failed"
            )
        return msg


class KeyValue:
    """A JetStream key-value bucket, read and written through its stream ``KV_<bucket>``."""

    def __init__(self, js: JetStream, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` under ``key``; returns the revision."""
        ack = await self.js.publish(self._subject(key), value)
        return int(ack["seq"])

    async def get(self, key: str) -> bytes | None:
        """The current value of ``key``, or None when absent, deleted or expired."""
        msg = await self.js.last_message(self.stream, self._subject(key))
        if msg is None or msg.header("KV-Operation") in ("DEL", "PURGE"):
            return None
        return msg.data

    @asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Subscription]:
        """The key's current value, then every update, as messages (a KV watch).

        An ephemeral consumer delivers the last message on the key and everything after
        it, so nothing falls between reading and watching (a plain subscription plus a
        read can miss a put that the stream stores after the read was answered). Deleted
        or purged values arrive with a ``KV-Operation`` header.
        """
        name = f"watch_{secrets.token_hex(8)}"
        subject = self._subject(key)
        inbox = await self.js.conn.subscribe(self.js.conn.new_inbox())
        async with inbox:
            config = {
                "name": name,
                "deliver_subject": inbox.subject,
                "deliver_policy": "last_per_subject",
                "filter_subject": subject,
                "ack_policy": "none",
                "mem_storage": True,
                "num_replicas": 1,
                # Gone by itself soon after the watcher is (a crash leaves nothing behind).
                "inactive_threshold": 30 * 1_000_000_000,
            }
            await self.js.api(
                f"CONSUMER.CREATE.{self.stream}.{name}.{subject}",
                {"stream_name": self.stream, "config": config},
            )
            try:
                yield inbox
            finally:
                # Best effort: it expires by itself anyway.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self.js.timeout),
                    suppress(NatrioError),
                ):
                    await self.js.delete_consumer(self.stream, name)

    async def delete(self, key: str) -> None:
        """Remove ``key`` and its history."""
        await self.js.publish(
            self._subject(key), b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        )

    async def keys(self) -> list[str]:
        """Keys that currently have a value."""
        prefix = f"$KV.{self.bucket}."
        subjects = await self.js.subjects(self.stream, prefix + ">")
        return sorted(s[len(prefix) :] for s in subjects)

    async def items(self) -> dict[str, bytes]:
        """Every key with a value, and the value."""
        out: dict[str, bytes] = {}
        for key in await self.keys():
            value = await self.get(key)
            if value is not None:
                out[key] = value
        return out


def _no_stream(subject: str) -> NoResponders:
    return NoResponders(
        f"no stream answered for {subject}: it is not provisioned (run "
        "natrio.provision()), or its stream has no leader right now"
    )


def _reply(msg: Message) -> dict[str, Any]:
    """The JSON of a JetStream API reply; JetStreamError when it is an error reply."""
    reply: dict[str, Any] = json.loads(msg.data)
    error = reply.get("error")
    if error:
        raise JetStreamError(
            int(error.get("code", 0)),
            int(error.get("err_code", 0)),
            str(error.get("description", "")),
        )
    return reply
