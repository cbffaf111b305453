"""The wire edge without a server: a delivered message becomes a valid Task or MalformedTask
names the rule it broke (natrio._dispatch.edge), and the protocol checks every subject and
header block natrio publishes (natrio._transport.protocol)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natrio import Message
from natrio import _wire as wire
from natrio._dispatch.edge import (
    MAX_DEADLINE,
    MAX_REPLY,
    MAX_RETRY_HEADER,
    ack_position,
    check_headers,
    check_reply,
    read_task,
    reply_target,
)
from natrio._errors import MalformedTask
from natrio._model import Task
from natrio._retry import RetryPolicy
from natrio._transport.protocol import (
    MAX_SUBJECTS_LENGTH,
    check_subject,
    header_block,
    parse_headers,
)
from natrio._wire import valid_id

ACK = "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.1700000000000000000.0"
# The v2 form: domain and account hash after $JS.ACK, a random token at the end.
ACK_V2 = "$JS.ACK.hub.ACCHASH.NATRIO_TASKS.t~default.3.42.7.1700000000000000000.0.r4nd"
SUBJECT = "natrio.task.t.default.run-1.step_1"
INBOX = "_INBOX"
ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")


def message(
    subject: str = SUBJECT,
    headers: Mapping[str, str] | None = None,
    *,
    reply: str = ACK,
    data: bytes = b"input",
) -> Message:
    return Message(subject, data, reply, headers)


def read(msg: Message, inbox_prefix: str = INBOX) -> Task:
    return read_task(msg, task_type="t", group="default", inbox_prefix=inbox_prefix)


def refused(
    subject: str = SUBJECT,
    headers: Mapping[str, str] | None = None,
    *,
    reply: str = ACK,
    match: str | None = None,
) -> MalformedTask:
    with pytest.raises(MalformedTask, match=match) as info:
        read(message(subject, headers, reply=reply))
    return info.value


def with_header(name: str, value: str) -> dict[str, str]:
    return {wire.H_MSG_ID: "task:t:run-1:step_1", name: value}


# -- valid tasks ------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {}])
def test_a_task_without_headers(headers: dict[str, str] | None) -> None:
    task = read(message(headers=headers))
    assert task == Task(
        task_type="t",
        group="default",
        run_id="run-1",
        step_id="step_1",
        input=b"input",
        headers={},
        attempt=1,
        seq=5,
        deadline=None,
        retry=None,
        reply=None,
        iteration=1,
        delivered=1,
    )


def test_a_task_with_every_header() -> None:
    policy = RetryPolicy(initial_interval=0.5, maximum_attempts=3, non_retryable=(KeyError,))
    headers = {
        wire.H_MSG_ID: "task:t:run-1:step_1",
        wire.H_RETRY: policy.to_json(),
        wire.H_DEADLINE: "1700000000.25",
        wire.H_REPLY: "_INBOX.abc.def",
        wire.H_SUBMITTED: "1699999999.5",
        wire.H_ITERATION: "3",
        "X-Trace": "anything at all, even: colons",
    }
    task = read(message(headers=headers, reply=ACK_V2))
    assert task.retry == policy
    assert task.deadline == 1700000000.25
    assert task.reply == "_INBOX.abc.def"
    assert task.iteration == 3
    assert (task.attempt, task.delivered, task.seq) == (3, 3, 42)
    assert task.headers == headers
    assert task.input == b"input"


@pytest.mark.parametrize(
    "run_id", ["a", "0", "_", "-", "=", "A-z_0=9", "x" * 128, "dGFzaw==", "--==__"]
)
def test_valid_ids(run_id: str) -> None:
    assert valid_id(run_id)
    task = read(message(f"natrio.task.t.default.{run_id}.{run_id}"))
    assert task.run_id == task.step_id == run_id


@pytest.mark.parametrize(
    ("value", "deadline"),
    [("1", 1.0), ("0.000001", 0.000001), ("1700000000", 1.7e9), ("100000000000", MAX_DEADLINE)],
)
def test_deadlines_in_range(value: str, deadline: float) -> None:
    assert read(message(headers=with_header(wire.H_DEADLINE, value))).deadline == deadline


@pytest.mark.parametrize(("value", "iteration"), [("1", 1), ("42", 42), ("999999999", 999999999)])
def test_iterations_in_range(value: str, iteration: int) -> None:
    assert read(message(headers=with_header(wire.H_ITERATION, value))).iteration == iteration


def test_other_headers_are_kept_untouched() -> None:
    headers = {"natrio-other": "x", "X-Empty": "", "Nats-Expected-Stream": "NATRIO_TASKS"}
    assert read(message(headers=headers)).headers == headers


# -- the ack subject ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "position"),
    [
        (ACK, (1, 5)),
        (ACK_V2, (3, 42)),
        ("$JS.ACK.S.C.7.123456789012.1.0.0", (7, 123456789012)),
        ("$JS.ACK.hub.HASH.S.C.1.2.3.4.5", (1, 2)),
    ],
)
def test_ack_positions(reply: str, position: tuple[int, int]) -> None:
    assert ack_position(reply) == position


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "_INBOX.abc",
        "$JS.ACK",
        "$JS.ACK.",
        "$JS.API.S.C.1.5.5.0.0",
        "$js.ack.S.C.1.5.5.0.0",
        "JS.ACK.S.C.1.5.5.0.0",
        "$JS.ACK.S.C.1.5.5.0",  # 8 tokens
        "$JS.ACK.S.C.1.5.5.0.0.0",  # 10 tokens
        "$JS.ACK.S.C.x.5.5.0.0",
        "$JS.ACK.S.C.1.y.5.0.0",
        "$JS.ACK.S.C..5.5.0.0",
        "$JS.ACK.S.C.0.5.5.0.0",  # delivered 0
        "$JS.ACK.S.C.1.0.5.0.0",  # sequence 0
        "$JS.ACK.S.C.-1.5.5.0.0",
        "$JS.ACK.S.C.1.-5.5.0.0",
        "$JS.ACK.S.C.1.5e3.5.0.0",
        "$JS.ACK.S.C.\u0661.5.5.0.0",  # an Arabic-Indic digit: int() would take it
        "$JS.ACK.S.C.1.\udcff.5.0.0",
        "$JS.ACK.S.C.1.5.5.0." + "0" * 512,  # over 512 characters
        "$JS.ACK.hub.HASH.S.C.x.5.5.0.0.r",
    ],
)
def test_replies_that_are_not_ack_subjects(reply: str) -> None:
    assert ack_position(reply) is None
    refused(reply=reply, match="not a JetStream ack subject")


def test_the_ack_subject_is_checked_first() -> None:
    refused("junk", {"natrio-reply": "x"}, reply="_INBOX.x", match="ack subject")


# -- the subject --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "natrio.task.t.default.r\udcff.s",  # a non-UTF-8 byte, as surrogateescape gives it
        b"natrio.task.t.default.\xff\xfe.s".decode(errors="surrogateescape"),
        "natrio.task.t.default.r\u00e9.s",
        "natrio.task.t.d\u00e9fault.r.s",
        "natr\u0131o.task.t.default.r.s",  # dotless i
        "natrio.task.t.default.r.s\u200b",
    ],
)
def test_subjects_that_are_not_ascii(subject: str) -> None:
    refused(subject, match="not ASCII")


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "natrio",
        "natrio.task.t.default.r",
        "natrio.task.t.default.r.s.extra",
        "natrio.task.t.default.r.s.",
        ".natrio.task.t.default.r",
        "natrio.task.t.default.r.s.>",
        "nats.task.t.default.r.s",
        "NATRIO.task.t.default.r.s",
        "natrio.Task.t.default.r.s",
        "natrio.event.t.default.r.s",
        "natrio.dead.t.default.r.s",
        " natrio.task.t.default.r.s",
    ],
)
def test_subjects_of_the_wrong_shape(subject: str) -> None:
    refused(subject, match="is not natrio.task.<type>.<group>.<run_id>.<step_id>")


@pytest.mark.parametrize(
    "subject",
    [
        "natrio.task.other.default.r.s",
        "natrio.task.T.default.r.s",
        "natrio.task.t.gpu.r.s",
        "natrio.task.t.Default.r.s",
        "natrio.task.*.default.r.s",
        "natrio.task.t.>.r.s",
        "natrio.task..default.r.s",
    ],
)
def test_subjects_for_another_type_or_group(subject: str) -> None:
    refused(subject, match="is not for t in default")


BAD_IDS = ["", "x" * 129, "a:b", "a~b", "a%20", "a b", "*", ">", "a/b", "a+b", "\t", "a\x00"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_run_ids(bad: str) -> None:
    assert not valid_id(bad)
    refused(f"natrio.task.t.default.{bad}.s", match="run id")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_step_ids(bad: str) -> None:
    refused(f"natrio.task.t.default.r.{bad}", match="step id")


@pytest.mark.parametrize("bad", ["\u00e9", "\udcff", "\uff21", "\u0661", "a\n", "x" * 200])
def test_valid_id_refuses_what_the_subject_check_would_catch_too(bad: str) -> None:
    assert not valid_id(bad)


# -- Natrio-Reply -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "_INBOX.a",
        "_INBOX.abc.def.ghi",
        "_INBOX.a*b.c>d",  # '*' and '>' inside a token are not wildcards
        "_INBOX." + "x" * (MAX_REPLY - 7),  # exactly 256
        "_INBOX.!#$%&'()+,-/:;<=?@[]^_`{|}~",
    ],
)
def test_replies_under_the_inbox_prefix(reply: str) -> None:
    assert check_reply(reply) == reply
    assert read(message(headers=with_header(wire.H_REPLY, reply))).reply == reply


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ("_INBOX." + "x" * (MAX_REPLY - 6), "at most 256"),  # 257
        ("_INBOX." + "x" * 5000, "at most 256"),
        ("_INBOX.a b", "invalid Natrio-Reply"),
        ("_INBOX.a\tb", "invalid Natrio-Reply"),
        ("_INBOX.a\r\nPUB x 1", "invalid Natrio-Reply|line break"),
        ("_INBOX.\u00e9", "invalid Natrio-Reply"),
        ("_INBOX.\udcff", "invalid Natrio-Reply"),
        ("_INBOX.\x7f", "invalid Natrio-Reply"),
        ("_INBOX.\x00", "invalid Natrio-Reply"),
        ("_INBOX.*", "wildcard"),
        ("_INBOX.>", "wildcard"),
        ("_INBOX.a.*.b", "wildcard"),
        ("*", "wildcard"),
        (">", "wildcard"),
        ("_INBOX..a", "empty token"),
        ("_INBOX.", "empty token"),
        (".", "empty token"),
        ("._INBOX.a", "empty token"),
        ("_INBOX.a, _INBOX.b", "invalid Natrio-Reply"),  # a repeated header, joined
    ],
)
def test_invalid_replies(reply: str, match: str) -> None:
    with pytest.raises(MalformedTask, match=match):
        check_reply(reply)
    refused(headers=with_header(wire.H_REPLY, reply), match=match)


@pytest.mark.parametrize(
    "reply", ["other.inbox", "_INBOX", "_INBOXES.a", "_inbox.a", "x._INBOX.a", "$JS.ACK.a"]
)
def test_replies_outside_the_inbox_prefix_are_not_answered(reply: str) -> None:
    assert reply_target(reply, INBOX) is None
    task = read(message(headers=with_header(wire.H_REPLY, reply)))
    assert task.reply is None
    assert task.headers[wire.H_REPLY] == reply


def test_an_empty_reply_is_no_reply() -> None:
    assert read(message(headers=with_header(wire.H_REPLY, ""))).reply is None


@pytest.mark.parametrize(
    ("reply", "answered"),
    [
        ("_INBOX.tenant.abc", True),
        ("_INBOX.tenant.a.b.c", True),
        ("_INBOX.abc", False),
        ("_INBOX.tenant", False),
        ("_INBOX.tenantX.abc", False),
    ],
)
def test_a_custom_inbox_prefix(reply: str, answered: bool) -> None:
    task = read(message(headers=with_header(wire.H_REPLY, reply)), inbox_prefix="_INBOX.tenant")
    assert task.reply == (reply if answered else None)
    assert reply_target(reply, "_INBOX.tenant") == task.reply


# -- Natrio-Retry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "not json",
        "{'initial_interval': 1}",
        "[]",
        "1",
        '"policy"',
        "null",
        "true",
        '{"x": 1}',  # not a field
        '{"initial_interval": NaN}',
        '{"initial_interval": Infinity}',
        '{"maximum_interval": Infinity}',
        '{"maximum_interval": 1e999}',  # inf once parsed
        '{"backoff_coefficient": Infinity}',
        '{"backoff_coefficient": NaN}',
        '{"backoff_coefficient": 0.5}',
        '{"initial_interval": -Infinity}',
        '{"initial_interval": -1}',
        '{"initial_interval": "1"}',
        '{"initial_interval": true}',
        '{"initial_interval": null}',
        '{"maximum_attempts": -1}',
        '{"maximum_attempts": 1.5}',
        '{"maximum_attempts": 1e300}',
        '{"maximum_attempts": true}',
        '{"jitter": NaN}',
        '{"jitter": 2}',
        '{"jitter": -0.1}',
        '{"non_retryable": 5}',
        '{"non_retryable": [""]}',
        '{"non_retryable": [1]}',
        '{"non_retryable": [["KeyError"]]}',
        '{"self": 1}',
        '{"maximum_attempts": 3}, {"maximum_attempts": 4}',  # a repeated header, joined
        '{"initial_interval": 1}garbage',
    ],
)
def test_bad_retry_policies(text: str) -> None:
    refused(headers=with_header(wire.H_RETRY, text), match="Natrio-Retry")


def test_a_retry_policy_over_1024_characters() -> None:
    text = json.dumps({"non_retryable": ["E" * MAX_RETRY_HEADER]})
    refused(headers=with_header(wire.H_RETRY, text), match="over 1024")


def test_a_retry_policy_of_exactly_1024_characters() -> None:
    head = '{"maximum_attempts": 3'
    text = head + " " * (MAX_RETRY_HEADER - len(head) - 1) + "}"
    assert len(text) == MAX_RETRY_HEADER
    retry = read(message(headers=with_header(wire.H_RETRY, text))).retry
    assert retry == RetryPolicy(maximum_attempts=3)


def test_huge_but_finite_retry_intervals_are_a_policy() -> None:
    # decide() clamps what such a policy asks for (tests/test_policy.py).
    text = '{"initial_interval": 1e300, "maximum_interval": 1e308, "maximum_attempts": 0}'
    retry = read(message(headers=with_header(wire.H_RETRY, text))).retry
    assert retry == RetryPolicy(initial_interval=1e300, maximum_interval=1e308, maximum_attempts=0)


def test_a_deeply_nested_retry_policy_is_malformed() -> None:
    # 1000 characters, within MAX_RETRY_HEADER: json.loads recurses once per bracket.
    refused(headers=with_header(wire.H_RETRY, "[" * 1000), match="Natrio-Retry")


# -- Natrio-Deadline, Natrio-Submitted, Natrio-Iteration ----------------------------------

BAD_NUMBERS = [
    "",
    "nan",
    "NaN",
    "inf",
    "Infinity",
    "-1",
    "+1",
    "1e5",
    "1E5",
    "0x10",
    "1_000",
    "soon",
    "1.",
    ".5",
    " 5",
    "5 ",
    "1,5",
    "5, 6",  # a repeated header, joined
    "\u0661\u0662",  # Arabic-Indic digits: float() would take them
    "\uff11",  # a fullwidth 1
    "1" * 13,
    "1." + "1" * 18,
]


@pytest.mark.parametrize("value", [*BAD_NUMBERS, "0", "0.0", "100000000000.1", "100000000001"])
def test_bad_deadlines(value: str) -> None:
    refused(headers=with_header(wire.H_DEADLINE, value), match="Natrio-Deadline")


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_bad_submitted_times(value: str) -> None:
    refused(headers=with_header(wire.H_SUBMITTED, value), match="Natrio-Submitted")


@pytest.mark.parametrize("value", ["0", "1", "1700000000.123456"])
def test_submitted_times(value: str) -> None:
    read(message(headers=with_header(wire.H_SUBMITTED, value)))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0",
        "-1",
        "+1",
        "01",
        "00",
        "1e3",
        "1.0",
        " 1",
        "1 ",
        "one",
        "1000000000",  # 10 digits
        "9" * 100,
        "1, 2",  # a repeated header, joined
        "\u0661",
    ],
)
def test_bad_iterations(value: str) -> None:
    refused(headers=with_header(wire.H_ITERATION, value), match="Natrio-Iteration")


# -- header names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("natrio-reply", "_INBOX.a"),
        ("NATRIO-REPLY", "_INBOX.a"),
        ("natrio-retry", "{}"),
        ("Natrio-retry", "{}"),
        ("natrio-deadline", "1700000000"),
        ("Natrio-deadline", "1700000000"),
        ("natrio-submitted", "1700000000"),
        ("natrio-iteration", "2"),
        ("NATRIO-ITERATION", "2"),
    ],
)
def test_natrio_header_names_in_another_case(name: str, value: str) -> None:
    with pytest.raises(MalformedTask, match="exact"):
        check_headers({name: value})
    refused(headers={name: value}, match="exact")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Bad Name",
        "a:b",
        "a\r",
        "a\nb",
        "\u00e9",
        "\udcff",
        "(x)",
        "a/b",
        '"q"',
        "{x}",
        "a@b",
        "a,b",
        "a;b",
        "a=b",
        "a?b",
        "[x]",
        "a\\b",
        "a\x00",
        "a\x7f",
        " Natrio-Reply",
    ],
)
def test_header_names_that_are_not_tokens(name: str) -> None:
    with pytest.raises(MalformedTask, match="invalid header name"):
        check_headers({name: "x"})
    refused(headers={"X-Ok": "1", name: "x"}, match="invalid header name")


def test_token_header_names_are_accepted() -> None:
    check_headers({"!#$%&'*+-.^_`|~09AZaz": "x", "Natrio-Outcome": "y", "natrio-other": "z"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (wire.H_REPLY, "_INBOX.a"),
        (wire.H_RETRY, '{"maximum_attempts": 3}'),
        (wire.H_DEADLINE, "1700000000"),
        (wire.H_SUBMITTED, "1700000000"),
        (wire.H_ITERATION, "2"),
    ],
)
def test_a_natrio_header_given_twice_is_malformed(name: str, value: str) -> None:
    once = parse_headers(f"NATS/1.0\r\n{name}: {value}\r\n\r\n".encode())
    read(message(headers=once))
    twice = parse_headers(f"NATS/1.0\r\n{name}: {value}\r\n{name}: {value}\r\n\r\n".encode())
    assert twice[name] == f"{value}, {value}"
    refused(headers=twice, match=name)


def test_a_natrio_header_given_in_two_cases_is_malformed() -> None:
    headers = parse_headers(b"NATS/1.0\r\nNatrio-Reply: _INBOX.a\r\nnatrio-reply: _INBOX.b\r\n\r\n")
    refused(headers=headers, match="exact")


def test_a_header_line_without_a_name_is_malformed() -> None:
    headers = parse_headers(b"NATS/1.0\r\n: orphan\r\n\r\n")
    assert headers == {"": "orphan"}
    refused(headers=headers, match="invalid header name")


# -- the property: a Task within the limits, or MalformedTask, nothing else ----------------

ids = st.from_regex(r"[A-Za-z0-9_=-]{1,130}", fullmatch=True)
tokens = st.one_of(
    st.sampled_from(["natrio", "task", "t", "default", "", "*", ">", "_INBOX"]),
    ids,
    st.text(st.characters(max_codepoint=0x7F), max_size=8),
    st.text(max_size=8),
)
subjects = st.one_of(
    st.text(max_size=80),
    st.lists(tokens, max_size=8).map(".".join),
    st.tuples(tokens, tokens).map(lambda pair: f"natrio.task.t.default.{pair[0]}.{pair[1]}"),
    st.tuples(ids, ids).map(lambda pair: f"natrio.task.t.default.{pair[0]}.{pair[1]}"),
)
replies = st.one_of(
    st.sampled_from([ACK, ACK_V2]),
    st.sampled_from([ACK, ACK_V2]),
    st.text(max_size=60),
    st.lists(st.one_of(st.integers(-2, 10**12).map(str), tokens), max_size=12).map(
        lambda parts: ".".join(["$JS", "ACK", *parts])
    ),
)
natrio_names = st.sampled_from(
    [wire.H_RETRY, wire.H_DEADLINE, wire.H_REPLY, wire.H_SUBMITTED, wire.H_ITERATION]
)
header_names = st.one_of(
    natrio_names, natrio_names.map(str.lower), st.sampled_from(["X-A", ""]), st.text(max_size=12)
)
policy_fields = st.sampled_from(
    [
        "initial_interval",
        "backoff_coefficient",
        "maximum_interval",
        "maximum_attempts",
        "non_retryable",
        "jitter",
        "unknown",
    ]
)
policy_values = st.one_of(
    st.floats(),
    st.integers(),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.lists(st.text(max_size=6), max_size=3),
)
header_values = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"[0-9]{1,13}(\.[0-9]{1,18})?", fullmatch=True),
    st.from_regex(r"[0-9]{1,11}", fullmatch=True),
    st.lists(tokens, min_size=1, max_size=6).map(lambda parts: ".".join(["_INBOX", *parts])),
    st.dictionaries(policy_fields, policy_values, max_size=6).map(json.dumps),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300),
)
# Each of natrio's headers, with values near its own syntax.
natrio_headers = st.fixed_dictionaries(
    {},
    optional={
        wire.H_REPLY: st.one_of(
            st.lists(tokens, min_size=1, max_size=6).map(".".join),
            st.lists(tokens, min_size=1, max_size=6).map(lambda p: ".".join(["_INBOX", *p])),
            st.from_regex(r"_INBOX\.tenant\.[!-~]{1,300}", fullmatch=True),
        ),
        wire.H_DEADLINE: st.from_regex(r"[0-9]{1,13}(\.[0-9]{1,18})?", fullmatch=True),
        wire.H_SUBMITTED: st.from_regex(r"[0-9]{1,13}(\.[0-9]{1,18})?", fullmatch=True),
        wire.H_ITERATION: st.from_regex(r"[0-9]{1,11}", fullmatch=True),
        wire.H_RETRY: st.dictionaries(policy_fields, policy_values, max_size=6).map(json.dumps),
    },
)
header_maps = st.one_of(
    st.none(),
    st.dictionaries(header_names, header_values, max_size=6),
    st.dictionaries(natrio_names, header_values, max_size=5),
    natrio_headers,
    st.binary(max_size=200).map(lambda raw: parse_headers(b"NATS/1.0\r\n" + raw)),
)
prefixes = st.sampled_from(["_INBOX", "_INBOX.tenant", "x"])


@settings(max_examples=400, deadline=None)
@given(subjects, replies, header_maps, prefixes)
def test_a_task_within_the_limits_or_malformed(
    subject: str, reply: str, headers: dict[str, str] | None, prefix: str
) -> None:
    try:
        task = read(message(subject, headers, reply=reply), inbox_prefix=prefix)
    except MalformedTask:
        return
    assert ID.fullmatch(task.run_id)
    assert ID.fullmatch(task.step_id)
    assert (task.task_type, task.group) == ("t", "default")
    assert task.attempt >= 1
    assert task.seq >= 1
    assert 1 <= task.iteration < 10**9
    assert task.deadline is None or 0 < task.deadline <= MAX_DEADLINE
    if task.reply is not None:
        assert task.reply.startswith(prefix + ".")
        assert len(task.reply) <= MAX_REPLY
        check_subject(task.reply, wildcards=False)


@settings(max_examples=400, deadline=None)
@given(natrio_headers, prefixes)
def test_natrio_headers_within_the_limits_or_malformed(
    headers: dict[str, str], prefix: str
) -> None:
    try:
        task = read(message(headers=headers), inbox_prefix=prefix)
    except MalformedTask:
        return
    assert 1 <= task.iteration < 10**9
    assert task.deadline is None or 0 < task.deadline <= MAX_DEADLINE
    if task.reply is not None:
        assert task.reply == headers[wire.H_REPLY]
        assert task.reply.startswith(prefix + ".")
        assert len(task.reply) <= MAX_REPLY
        check_subject(task.reply, wildcards=False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(policy_fields, policy_values, max_size=6))
def test_any_retry_header_is_a_finite_policy_or_malformed(fields: dict[str, object]) -> None:
    try:
        task = read(message(headers={wire.H_RETRY: json.dumps(fields)}))
    except MalformedTask:
        return
    assert task.retry is not None
    for value in (task.retry.initial_interval, task.retry.maximum_interval):
        assert 0 <= value < float("inf")
    assert 1 <= task.retry.backoff_coefficient < float("inf")
    assert 0 <= task.retry.jitter <= 1


# -- protocol: check_subject --------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "a",
        SUBJECT,
        "_INBOX.abc",
        "a*b.c>d",
        "!#$%&'()+,-/:;<=?@[]^_`{|}~",
        "x" * MAX_SUBJECTS_LENGTH,
        ".".join(["a"] * 2000),
    ],
)
def test_subjects_natrio_may_publish_on(subject: str) -> None:
    check_subject(subject)
    check_subject(subject, wildcards=False)


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "a b",
        " a",
        "a ",
        "a\tb",
        "a\r\nb",
        "a\nb",
        "a\x00",
        "a\x7f",
        "\u00e9",
        "a.\udcff",
        "\u00a0",
        "x" * (MAX_SUBJECTS_LENGTH + 1),
    ],
)
def test_subjects_that_are_not_printable_ascii(subject: str) -> None:
    with pytest.raises(ValueError, match="invalid subject"):
        check_subject(subject)


@pytest.mark.parametrize("subject", [".", "..", ".a", "a.", "a..b", "a.b.", "a...b"])
def test_subjects_with_empty_tokens(subject: str) -> None:
    with pytest.raises(ValueError, match="empty token"):
        check_subject(subject)


@pytest.mark.parametrize("subject", ["*", ">", "a.*", "a.>", "*.a", "a.*.b", "a.b.>"])
def test_wildcard_tokens(subject: str) -> None:
    check_subject(subject)
    with pytest.raises(ValueError, match="wildcard token"):
        check_subject(subject, wildcards=False)


def test_the_kind_is_named() -> None:
    with pytest.raises(ValueError, match="invalid reply subject 'a b'"):
        check_subject("a b", kind="reply subject")


@given(st.text(max_size=50))
def test_check_subject_raises_only_value_error(subject: str) -> None:
    try:
        check_subject(subject, wildcards=False)
    except ValueError:
        return
    assert subject.isascii()
    assert subject.isprintable()
    assert " " not in subject
    assert "" not in subject.split(".")
    assert "*" not in subject.split(".")
    assert ">" not in subject.split(".")


# -- protocol: header blocks --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "Bad Name", "a:b", "a\r\nb", "a\nb", "\u00e9", "(x)", "a/b", "a,b", "a\x00", " A"],
)
def test_header_blocks_refuse_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid header name"):
        header_block({"Ok": "1", name: "x"})


@pytest.mark.parametrize(
    "value",
    ["a\r\nInjected: yes", "a\nb", "a\rb", "\r\n", "a\r\n\r\nPUB x 1\r\n", "\n", "\r"],
)
def test_header_blocks_refuse_line_breaks(value: str) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        header_block({"A": "1", "B": value})


def test_header_block_layout() -> None:
    assert header_block({}) == b"NATS/1.0\r\n\r\n"
    block = header_block({"A": "1", "!#$%&'*+-.^_`|~09AZaz": "x: y", "C": ""})
    assert block == b"NATS/1.0\r\nA: 1\r\n!#$%&'*+-.^_`|~09AZaz: x: y\r\nC: \r\n\r\n"
    assert parse_headers(block) == {"A": "1", "!#$%&'*+-.^_`|~09AZaz": "x: y", "C": ""}


# -- protocol: parse_headers --------------------------------------------------------------


def test_repeated_names_are_joined() -> None:
    raw = b"NATS/1.0\r\nA: 1\r\nB: x\r\nA: 2\r\nA: 3\r\n\r\n"
    assert parse_headers(raw) == {"A": "1, 2, 3", "B": "x"}


def test_non_utf8_becomes_replacement_characters() -> None:
    assert parse_headers(b"NATS/1.0\r\nA: \xff\xfe\r\n\xc3: v\r\n\r\n") == {
        "A": "\ufffd\ufffd",
        "\ufffd": "v",
    }


def test_lines_without_a_colon_are_ignored() -> None:
    assert parse_headers(b"NATS/1.0\r\nno colon\r\nA: 1\r\n\r\n") == {"A": "1"}


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (b"", {}),
        (b"NATS/1.0", {}),
        (b"NATS/1.0 ", {}),
        (b"NATS/1.0 abc\r\n\r\n", {}),
        (b"NATS/1.0 404\r\n\r\n", {"Status": "404"}),
        (
            b"NATS/1.0 409 Consumer Deleted\r\n\r\n",
            {"Status": "409", "Description": "Consumer Deleted"},
        ),
        (b"\r\nA: 1", {"A": "1"}),
    ],
)
def test_status_lines(raw: bytes, parsed: dict[str, str]) -> None:
    assert parse_headers(raw) == parsed


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(), st.binary().map(lambda raw: b"NATS/1.0 " + raw)))
def test_parse_headers_never_raises(raw: bytes) -> None:
    headers = parse_headers(raw)
    for name, value in headers.items():
        assert isinstance(name, str)
        assert isinstance(value, str)
        assert "\r\n" not in name
        assert "\r\n" not in value


def test_a_header_value_with_a_lone_line_break_is_malformed() -> None:
    with pytest.raises(MalformedTask, match="line break"):
        read(message(headers={"X-App": "a\nb"}))


@pytest.mark.parametrize("field", ["initial_interval", "maximum_interval", "backoff_coefficient"])
def test_a_retry_policy_with_numbers_too_large_for_a_float_is_malformed(field: str) -> None:
    text = json.dumps({field: 10**400})
    with pytest.raises(MalformedTask, match="Natrio-Retry"):
        read(message(headers={wire.H_RETRY: text}))


def _ack_position_the_long_way(reply: str) -> tuple[int, int] | None:
    # The definition: a subject natrio may publish to, in one of the ack subject layouts.
    if not reply.startswith("$JS.ACK.") or len(reply) > 512:
        return None
    try:
        check_subject(reply, wildcards=False)
        delivered, seq = wire.parse_ack_subject(reply)
    except ValueError:
        return None
    return (delivered, seq) if delivered >= 1 and seq >= 1 else None


_ACK_TOKENS = st.one_of(
    st.sampled_from(["0", "1", "7", "42", "", "*", ">", "a*", "S", "C", "x", "-1", "1e3"]),
    st.text(min_size=0, max_size=6),
)


@given(st.lists(_ACK_TOKENS, min_size=0, max_size=14))
@settings(max_examples=2000)
def test_the_ack_pattern_agrees_with_the_subject_rules(tokens: list[str]) -> None:
    reply = ".".join(["$JS", "ACK", *tokens])
    assert ack_position(reply) == _ack_position_the_long_way(reply)
