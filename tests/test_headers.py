"""natrio encodes and parses NATS header blocks itself (the bridge's hot path): round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natrio._transport.protocol import Headers, header_block, parse_headers

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True)
# Printable values without line breaks; leading and trailing blanks are not kept by NATS.
values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40).map(
    str.strip
)


@given(st.dictionaries(names, values, min_size=1, max_size=8))
def test_encoded_headers_parse_back(headers: dict[str, str]) -> None:
    block = header_block(headers)
    assert parse_headers(block) == headers
    assert Headers(headers).block == block == Headers.of_own(dict(headers)).block


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (b"NATS/1.0 503\r\n\r\n", {"Status": "503"}),
        (
            b"NATS/1.0 408 Request Timeout\r\n\r\n",
            {"Status": "408", "Description": "Request Timeout"},
        ),
        (
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n\r\n",
            {"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "5"},
        ),
        (b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n", {"A": "1, 2"}),
    ],
)
def test_status_lines_and_repeated_names(raw: bytes, parsed: dict[str, str]) -> None:
    assert parse_headers(raw) == parsed


@pytest.mark.parametrize(
    "headers",
    [
        {"A": "line\r\nInjected: yes"},
        {"A": "x\ny"},
        {"Bad Name": "x"},
        {"Bad:Name": "x"},
        {"": "x"},
    ],
)
def testheader_blocks_that_would_break_the_protocol_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="header"):
        header_block(headers)


@given(
    seq=st.integers(1, 2**63),
    attempt=st.integers(1, 10**6),
    started=st.one_of(st.none(), st.floats(0, 1e11, allow_nan=False)),
)
def test_the_completion_block_is_the_general_encoding(
    seq: int, attempt: int, started: float | None
) -> None:
    from natrio._model import Task
    from natrio._outcomes import Reporter

    reporter = Reporter.__new__(Reporter)
    reporter.worker_id = "resize/default.0123456789ab@host"
    task = Task("resize", "default", "run-1", "step_2", b"", {}, attempt, seq, started_at=started)
    headers = reporter.completion_headers(task)
    assert headers.block == header_block(dict(headers))
    assert parse_headers(headers.block) == dict(headers)
