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

from ._errors import NatrioError
from ._jetstream import JetStream

#: The size of one chunk, as the other object store clients use.
CHUNK_SIZE = 128 * 1024
# A chunk subject's last token as natrio (hex) and the NATS clients (base62 nuids) write it.
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")


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


class ObjectStore:
    """Put and get whole objects in one bucket."""

    def __init__(self, js: JetStream, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{_encoded(name)}"

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, replacing an object of that name."""
        nuid = secrets.token_hex(11)
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        chunks = 0
        for start in range(0, len(data), CHUNK_SIZE):
            await self.js.publish(chunk_subject, data[start : start + CHUNK_SIZE])
            chunks += 1
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        meta = {
            "name": name,
            "bucket": self.bucket,
            "nuid": nuid,
            "size": len(data),
            "chunks": chunks,
            "digest": f"SHA-256={digest}",
        }
        # The roll-up leaves one description per name: the newest.
        await self.js.publish(
            self._meta_subject(name), json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"}
        )

    async def get(self, name: str) -> bytes | None:
        """The object ``name``, or None when there is none; NatrioError if it is damaged."""
        msg = await self.js.last_message(self.stream, self._meta_subject(name))
        if msg is None:
            return None
        meta = json.loads(msg.data)
        if meta.get("deleted"):
            return None
        subject = f"$O.{self.bucket}.C.{meta['nuid']}"
        parts: list[bytes] = []
        seq = 0
        for _ in range(int(meta.get("chunks", 0))):
            chunk = await self.js.next_message(self.stream, subject, after=seq)
            if chunk is None:
                raise NatrioError(f"object {name!r} in {self.bucket} is missing chunks")
            seq, data = chunk
            parts.append(data)
        data = b"".join(parts)
        if len(data) != int(meta.get("size", -1)):
            raise NatrioError(f"object {name!r} in {self.bucket} has the wrong size")
        return data

    async def delete(self, name: str) -> bool:
        """Delete the object ``name``; False when there was none.

        As the other clients do it: the description is replaced by one marked deleted
        (a roll-up, so it is the only one left), then the chunks are purged.
        """
        msg = await self.js.last_message(self.stream, self._meta_subject(name))
        if msg is None:
            return False
        try:
            meta = json.loads(msg.data)
            nuid = meta["nuid"]
        except (ValueError, TypeError, KeyError, RecursionError):
            raise NatrioError(
                f"object {name!r} in {self.bucket} has a damaged description"
            ) from None
        if meta.get("deleted"):
            return False
        # The nuid becomes a purge filter: anyone who may write descriptions could put a
        # wildcard there and have every chunk of the bucket purged.
        if not isinstance(nuid, str) or not _NUID.fullmatch(nuid):
            raise NatrioError(f"object {name!r} in {self.bucket} has an invalid nuid")
        marker = {"name": name, "bucket": self.bucket, "nuid": nuid, "size": 0, "chunks": 0}
        marker["deleted"] = True
        await self.js.publish(
            self._meta_subject(name), json.dumps(marker).encode(), headers={"Nats-Rollup": "sub"}
        )
        await self.js.api(f"STREAM.PURGE.{self.stream}", {"filter": f"$O.{self.bucket}.C.{nuid}"})
        return True
