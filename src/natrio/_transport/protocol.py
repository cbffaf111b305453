"""The NATS protocol as natrio speaks it, free of I/O: messages, header blocks, PUB/HPUB
commands, and the syntax and limits every subject and header natrio publishes must meet.

Nothing natrio publishes reaches the socket without passing :func:`check_subject` (or
being built from parts that did) and a header block from :func:`header_block`: the server
closes a connection for a control line over its limit, and nats-py then gives up on it
for good, so one unchecked value from the wire could silence a worker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Final

#: The server's default limit on a control line (``PUB``/``HPUB``/``MSG`` with subject,
#: reply subject and sizes), ``max_control_line``.
MAX_CONTROL_LINE: Final = 4096

#: The longest subject plus reply subject natrio publishes: the control line's limit less
#: room for the verb and the two sizes.
MAX_SUBJECTS_LENGTH: Final = MAX_CONTROL_LINE - 64

# Tokens of printable ASCII except space and ".", joined by ".": what natrio's own subjects
# are made of. The server accepts more (any byte but whitespace), but natrio never needs
# it, and ASCII encodes one to one. One pattern, so a valid subject costs one match.
_SUBJECT = re.compile(r"[!-\-/-~]+(?:\.[!-\-/-~]+)*")
_PRINTABLE = re.compile(r"[!-~]+")
# RFC 7230 token characters, as NATS header names use them.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def redact(url: str) -> str:
    """``url`` with any user, password or token replaced by ``***``.

    Everything up to the last ``@`` of the authority is credentials (a password may hold
    ``@`` or ``/``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return url
    return f"{scheme}{sep}***@{rest[at + 1 :]}"


def check_subject(subject: str, *, kind: str = "subject", wildcards: bool = True) -> None:
    """Raise ValueError unless ``subject`` is one natrio may publish on (or reply to).

    Printable ASCII without spaces, no empty tokens, at most :data:`MAX_SUBJECTS_LENGTH`
    characters; without ``wildcards``, no ``*`` or ``>`` tokens either (a reply subject is
    a publish target, never a pattern).
    """
    if len(subject) > MAX_SUBJECTS_LENGTH or not _SUBJECT.fullmatch(subject):
        reason = "empty token" if "." in subject and _PRINTABLE.fullmatch(subject) else ""
        raise ValueError(f"invalid {kind} {subject[:100]!r}{': ' if reason else ''}{reason}")
    if not wildcards and ("*" in subject or ">" in subject):
        for token in subject.split("."):
            if token in ("*", ">"):
                raise ValueError(f"invalid {kind} {subject[:100]!r}: wildcard token")


class Message:
    """A message as natrio sees it: subject, payload, reply subject and headers.

    Subjects arrive as bytes; natrio decodes them as UTF-8 with ``surrogateescape``, so a
    subject that is not UTF-8 still arrives (and fails natrio's checks) rather than
    vanishing in the decoder.
    """

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(
        self, subject: str, data: bytes, reply: str, headers: Mapping[str, str] | None
    ) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers

    @property
    def status(self) -> str | None:
        """The status code of a server status message (``"100"``, ``"408"``, ...), else None.

        A message JetStream delivers with an ack subject is never a status message, whatever
        its header block says: that block came from whoever published the message.
        """
        if not self.headers:
            return None
        status = self.headers.get("Status")
        if status is not None and self.reply.startswith("$JS.ACK."):
            return None
        return status

    def header(self, name: str, default: str | None = None) -> str | None:
        """One header's value, or ``default``."""
        return self.headers.get(name, default) if self.headers else default

    def __repr__(self) -> str:
        return f"Message(subject={self.subject!r}, reply={self.reply!r}, {len(self.data)} bytes)"


class Headers(Mapping[str, str]):
    """Message headers encoded once, for a publish that repeats them (an event and its reply)
    or a header set that never changes. Raises ValueError for invalid names or values."""

    __slots__ = ("_items", "block")

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = dict(items)
        self.block = header_block(self._items) if self._items else b""

    @classmethod
    def of_own(cls, items: dict[str, str]) -> Headers:
        """Headers natrio builds itself from validated names, ids and numbers: encoded
        without the checks (the per-task events are the hot path)."""
        headers = cls.__new__(cls)
        headers._items = items
        headers.block = _header_text(items).encode()
        return headers

    @classmethod
    def of_own_block(cls, items: dict[str, str], block: bytes) -> Headers:
        """:meth:`of_own` with the block already encoded (by a caller that wrote out the
        same lines as :func:`header_block` would, in one format string)."""
        headers = cls.__new__(cls)
        headers._items = items
        headers.block = block
        return headers

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def parse_headers(raw: bytes) -> dict[str, str]:
    """A received header block as a dict, the status line as ``Status`` and ``Description``.

    ``NATS/1.0[ <status>[ <description>]]\\r\\n`` then ``Name: value`` lines. A name given
    more than once gets its values joined with ``", "``, as HTTP does, so a repeated
    header is never silently reduced to one of its values. Lines without a colon are
    ignored; bytes that are not UTF-8 become U+FFFD. (nats-py's parser cost more than the
    rest of receiving a task.)
    """
    lines = raw.decode(errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    first = lines[0]
    if len(first) > 9:
        status, _, description = first[9:].strip().partition(" ")
        if status.isascii() and status.isdigit():
            headers["Status"] = status
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            name = name.strip()
            value = value.strip()
            if name in headers:
                value = f"{headers[name]}, {value}"
            headers[name] = value
    return headers


def _header_text(headers: Mapping[str, str]) -> str:
    return "NATS/1.0\r\n" + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) + "\r\n"


def valid_header_name(name: str) -> bool:
    """Whether ``name`` is a header name natrio accepts (an RFC 7230 token)."""
    if name in _valid_names:
        return True
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        return False
    if len(_valid_names) < 1024:  # names seen often are checked once
        _valid_names.add(name)
    return True


def header_block(headers: Mapping[str, str]) -> bytes:
    """The encoded header block of a message; ValueError for names or values that would
    break it (a name that is not an RFC 7230 token, a line break in a value)."""
    for name in headers:
        if not valid_header_name(name):
            raise ValueError(f"invalid header name {str(name)[:100]!r}")
    text = _header_text(headers)
    # A line break inside a value would add a line: count them rather than scan each value.
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("header values may not contain line breaks")
    return text.encode()


_valid_names: set[str] = set()


def encode_command(subject: str, reply: str, payload: bytes, block: bytes) -> bytes:
    """One PUB or HPUB command, as the NATS protocol has it."""
    if not block:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(block),
        len(block) + len(payload),
        block,
        payload,
    )
