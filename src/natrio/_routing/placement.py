"""Placement, free of I/O: which partition a key falls in, which member holds which
partitions, and the claim a worker holds by its name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from .. import _wire as wire
from .._errors import ConfigurationError

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash of ``data``: what nats-server's ``{{partition(n, ...)}}``
    subject transform computes, so a partition natrio picks is the one the server would."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


def partition_of(key: str, partitions: int) -> int:
    """The partition (0-based) of ``key`` among ``partitions``."""
    return fnv1a_32(key.encode("utf-8", "surrogateescape")) % partitions


def check_partitions(value: object, what: str = "partitions") -> int:
    """``value`` if it is a valid partition count (an int from 1 to 256), else raise."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= wire.MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"{what} must be an int from 1 to {wire.MAX_PARTITIONS}, got {value!r}"
        )
    return value


def assign(partitions: int, members: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Which partitions each member holds: every partition to exactly one member, each
    member ⌊n/k⌋ or ⌈n/k⌉ of them, the same answer for the same members wherever computed.

    Members are sorted by id; partition ``p`` goes to the member at ``p mod k``.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    held: dict[str, list[int]] = {member: [] for member in ordered}
    for partition in range(partitions):
        held[ordered[partition % len(ordered)]].append(partition)
    return {member: tuple(parts) for member, parts in held.items()}


def check_claim(value: object) -> str:
    """``value`` if it is a valid claim name (1-64 ASCII letters, digits, ``_``, ``-``)."""
    return wire.check_name("claim", value)


def worker_target(name: str) -> str:
    """The claim every worker named ``name`` holds: submit with ``target=`` this to run a
    task on that worker (or on the next worker started under the same name).

    ``w-<name>`` for a name that fits a claim, else ``w-`` and a digest of the name
    (default worker names have ``+`` and ``/`` in them).
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a worker name is a non-empty string, got {name!r}")
    if wire.valid_name(name) and len(name) <= 62:
        return f"w-{name}"
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=12)
    return f"w-{digest.hexdigest()}"


def check_claims(values: Sequence[object]) -> tuple[str, ...]:
    """Valid, distinct claim names from ``values``, sorted; else raise ConfigurationError."""
    if isinstance(values, str | bytes):
        raise ConfigurationError("claims must be a list of names, not a string")
    claims = {check_claim(value) for value in values}
    return tuple(sorted(claims))


def parse_claim_consumer(name: str) -> tuple[str, str, bool, str] | None:
    """(task type, group, soft, claim) of a claim consumer's name
    (``<type>~<group>~t<claim>`` or ``~s<claim>``), or None for any other name."""
    parts = name.split("~")
    if len(parts) != 3 or len(parts[2]) < 2 or parts[2][0] not in "ts":
        return None
    task_type, group, placement = parts
    claim = placement[1:]
    if not (wire.valid_name(task_type) and wire.valid_name(group) and wire.valid_name(claim)):
        return None
    return task_type, group, placement[0] == "s", claim
