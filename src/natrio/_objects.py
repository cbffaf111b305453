"""A JetStream object store bucket, where natrio keeps payloads too large for one message
(the input of a dead letter that does not fit beside its entry).

The layout is the one nats.go, nats-py and the ``nats`` CLI use: stream ``OBJ_<bucket>``,
chunks on ``$O.<bucket>.C.<nuid>``, the object's description on
``$O.<bucket>.M.<base64url(name)>``, so any NATS tool can read what natrio stores.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Any

from . import _wire as wire
from ._errors import NatrioError
from ._jetstream import JetStream
from ._model import DeadLetter

#: The size of one chunk, as the other object store clients use.
CHUNK_SIZE = 128 * 1024
# A chunk subject's last token as natrio (hex) and the NATS clients (base62 nuids) write it.
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")
#: The largest object :meth:`ObjectStore.get` reads (a NATS message is at most 64 MiB,
#: and natrio keeps nothing larger than one).
MAX_OBJECT = 64 * 1024 * 1024
#: The key in an object's ``metadata`` naming what it belongs to (see ``owner``).
OWNER_KEY = "natrio-owner"
_DIGEST = re.compile(r"SHA-256=([A-Za-z0-9_-]{43}=?)")


def object_stream_config(
    bucket: str, *, max_age: int, replicas: int, storage: str
) -> dict[str, Any]:
    """The stream behind an object store bucket (``max_age`` in nanoseconds)."""
    return {
        "name": f"OBJ_{bucket}",
        "subjects": [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        "retention": "limits",
        "max_age": max_age,
        "discard": "new",
        "storage": storage,
        "num_replicas": replicas,
        "allow_rollup_hdrs": True,
        "allow_direct": True,
    }


def _encoded(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def dead_input_owner(entry: DeadLetter) -> str:
    """What the stored input of ``entry`` belongs to: its dead-letter subject."""
    return wire.dead_subject(entry.task_type, entry.group, entry.run_id, entry.step_id)


class ObjectStore:
    """Put, get and delete whole objects in one bucket.

    Anyone allowed to publish on the bucket's subjects can write a description, so one is
    checked before it is used (:meth:`_description`): a damaged one is a NatrioError,
    never a read of other objects' chunks or a purge of them. An object put with an
    ``owner`` names it in its metadata; a get that gives an owner refuses an object of
    another one (one without an owner, as other clients and earlier versions of natrio
    write them, is read), and a delete that gives one deletes only an object of that
    owner (a description naming another object's chunks cannot have them purged).
    """

    def __init__(self, js: JetStream, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{_encoded(name)}"

    async def put(self, name: str, data: bytes, *, owner: str | None = None) -> None:
        """Store ``data`` as ``name``, replacing an object of that name."""
        nuid = secrets.token_hex(11)
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        chunks = 0
        for start in range(0, len(data), CHUNK_SIZE):
            await self.js.publish(chunk_subject, data[start : start + CHUNK_SIZE])
            chunks += 1
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        meta: dict[str, Any] = {
            "name": name,
            "bucket": self.bucket,
            "nuid": nuid,
            "size": len(data),
            "chunks": chunks,
            "digest": f"SHA-256={digest}",
        }
        if owner is not None:
            meta["metadata"] = {OWNER_KEY: owner}
        # The roll-up leaves one description per name: the newest.
        await self.js.publish(
            self._meta_subject(name), json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"}
        )

    async def _description(
        self, name: str, owner: str | None, *, owned: bool = False
    ) -> dict[str, Any] | None:
        """The checked description of ``name``, or None when there is none or it is marked
        deleted; NatrioError for one that is damaged or another owner's (with ``owned``,
        also for one that names no owner)."""
        msg = await self.js.last_message(self.stream, self._meta_subject(name))
        if msg is None:
            return None
        where = f"object {name!r} in {self.bucket}"
        try:
            meta = json.loads(msg.data)
        except (ValueError, RecursionError):
            raise NatrioError(f"{where} has a damaged description: not JSON") from None
        if not isinstance(meta, dict):
            raise NatrioError(f"{where} has a damaged description: not a JSON object")
        if meta.get("deleted") is True:
            return None
        problem = _problem(meta, name, self.bucket)
        if problem:
            raise NatrioError(f"{where} has a damaged description: {problem}")
        if owner is not None:
            stated = (meta.get("metadata") or {}).get(OWNER_KEY)
            if stated is None and owned:
                raise NatrioError(f"{where} names no owner: it is not known to be {owner!r}'s")
            if stated is not None and stated != owner:
                raise NatrioError(f"{where} belongs to {str(stated)[:200]!r}, not to {owner!r}")
        return meta

    async def get(self, name: str, *, owner: str | None = None) -> bytes | None:
        """The object ``name``, or None when there is none; NatrioError if it is damaged
        (its description, a chunk, its size or digest) or, with ``owner``, another's."""
        meta = await self._description(name, owner)
        if meta is None:
            return None
        where = f"object {name!r} in {self.bucket}"
        size: int = meta["size"]
        subject = f"$O.{self.bucket}.C.{meta['nuid']}"
        parts: list[bytes] = []
        got = 0
        seq = 0
        for _ in range(meta["chunks"]):
            try:
                chunk = await self.js.next_message(self.stream, subject, after=seq)
            except ValueError:  # a sequence the server did not write
                raise NatrioError(f"{where} has a damaged chunk") from None
            if chunk is None:
                raise NatrioError(f"{where} is missing chunks")
            next_seq, data = chunk
            got += len(data)
            if next_seq <= seq or got > size:
                raise NatrioError(f"{where} has chunks that are not its own")
            seq = next_seq
            parts.append(data)
        data = b"".join(parts)
        if len(data) != size:
            raise NatrioError(f"{where} has the wrong size")
        digest = meta.get("digest")
        if digest is not None and _digest(data) != digest.partition("=")[2].rstrip("="):
            raise NatrioError(f"{where} does not match its digest")
        return data

    async def delete(self, name: str, *, owner: str | None = None) -> bool:
        """Delete the object ``name``; False when there was none. NatrioError for a
        damaged description or, with ``owner``, an object that does not name that owner
        (then nothing is deleted).

        As the other clients do it: the description is replaced by one marked deleted
        (a roll-up, so it is the only one left), then the chunks are purged.
        """
        meta = await self._description(name, owner, owned=True)
        if meta is None:
            return False
        # The nuid becomes a purge filter: checked (_problem) to be one token, no wildcard,
        # or anyone who may write descriptions could have every chunk of the bucket purged.
        nuid = meta["nuid"]
        marker = {"name": name, "bucket": self.bucket, "nuid": nuid, "size": 0, "chunks": 0}
        marker["deleted"] = True
        await self.js.publish(
            self._meta_subject(name), json.dumps(marker).encode(), headers={"Nats-Rollup": "sub"}
        )
        await self.js.api(f"STREAM.PURGE.{self.stream}", {"filter": f"$O.{self.bucket}.C.{nuid}"})
        return True


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _problem(meta: dict[str, Any], name: str, bucket: str) -> str:
    """What is wrong with the description ``meta`` of object ``name`` ("" for nothing)."""
    if meta.get("name", name) != name or meta.get("bucket", bucket) != bucket:
        return "it is another object's"
    nuid = meta.get("nuid")
    if not isinstance(nuid, str) or not _NUID.fullmatch(nuid):
        # It names the chunk subject read and purged: one token, no wildcards.
        return "an invalid nuid"
    size, chunks = _count(meta.get("size")), _count(meta.get("chunks", 0))
    if size is None or chunks is None or size > MAX_OBJECT:
        return f"size and chunks are not counts (of at most {MAX_OBJECT} bytes)"
    if chunks > size or (size and not chunks):
        return f"{chunks} chunks cannot hold {size} bytes"
    digest = meta.get("digest")
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        return "a digest that is not SHA-256=<base64url>"
    metadata = meta.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return "metadata that is not an object"
    return ""


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
