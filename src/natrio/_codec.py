"""Payload codec: handler inputs and outputs to bytes and back, with cattrs for typed values."""

from __future__ import annotations

import json
import types
from typing import Any

import cattrs
from cattrs.preconf.json import make_converter

from ._errors import DecodeError

#: The converter natrio uses for typed inputs and outputs. Register hooks on it for
#: types cattrs does not handle out of the box.
converter = make_converter()
# One encoder for every payload: json.dumps with non-default options builds one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(value: object) -> bytes:
    """Bytes for a payload: bytes pass through, ``None`` is empty, anything else is JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return _ENCODER.encode(converter.unstructure(value)).encode()


def decode(data: bytes, type_: Any) -> Any:
    """The payload as ``type_``: ``bytes`` and ``None`` (raw) pass through, other types via JSON.

    Raises DecodeError naming the type and the offending field.
    """
    if type_ is None or type_ is bytes:
        return data
    if type_ is types.NoneType:
        if data not in (b"", b"null"):
            raise DecodeError(f"expected an empty payload for None, got {len(data)} bytes")
        return None
    name = getattr(type_, "__qualname__", repr(type_))
    try:
        obj = json.loads(data) if data else None
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"cannot decode {name}: payload is not JSON ({exc})") from None
    try:
        return converter.structure(obj, type_)
    except RecursionError:
        raise DecodeError(f"cannot decode {name}: payload nests too deeply") from None
    except Exception as exc:
        details = (
            "; ".join(cattrs.transform_error(exc, path="$"))
            if isinstance(exc, cattrs.BaseValidationError)
            else f"{type(exc).__name__}: {exc}"
        )
        raise DecodeError(f"cannot decode {name}: {details}") from None
