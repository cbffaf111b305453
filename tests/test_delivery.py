"""One delivery without a server (natrio._dispatch.delivery): settled exactly once, ``+WPI``
only while unsettled, released exactly once when the last hold is let go."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from natrio import Message
from natrio._dispatch.delivery import (
    MAX_UNSETTLED_DELAY,
    UNSETTLED_DELAY,
    Delivery,
    unsettled_delay,
)
from natrio._dispatch.policy import nak_payload

ACK = "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.1700000000000000000.0"
UNSETTLED_NAK = b'-NAK {"delay": 1000000000}'
SETTLEMENTS = (b"+ACK", b"+TERM")


def is_settlement(payload: bytes) -> bool:
    return payload in SETTLEMENTS or payload.startswith(b"-NAK")


class Harness:
    """A delivery with a list-appending ``send`` and a counting ``on_release``."""

    def __init__(self, now: float = 100.0) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.released: list[Delivery] = []
        msg = Message("natrio.task.t.default.r.s", b"input", ACK, None)
        self.delivery = Delivery(
            msg, object(), "default", send=self.send, on_release=self.released.append, now=now
        )

    def send(self, subject: str, payload: bytes) -> None:
        self.sent.append((subject, payload))

    @property
    def payloads(self) -> list[bytes]:
        assert all(subject == ACK for subject, _ in self.sent)
        return [payload for _, payload in self.sent]


Settle = Callable[[Delivery], bool]

SETTLERS: list[tuple[str, Settle, bytes]] = [
    ("ack", Delivery.ack, b"+ACK"),
    ("term", Delivery.term, b"+TERM"),
    ("nak", lambda d: d.nak(), b"-NAK"),
    ("nak(0)", lambda d: d.nak(0), b"-NAK"),
    ("nak(2.5)", lambda d: d.nak(2.5), b'-NAK {"delay": 2500000000}'),
    ("nak(-1)", lambda d: d.nak(-1), b"-NAK"),
    ("nak(inf)", lambda d: d.nak(float("inf")), nak_payload(float("inf"))),
    ("nak(nan)", lambda d: d.nak(float("nan")), b'-NAK {"delay": 1000000000}'),
]
SETTLER_IDS = [name for name, _, _ in SETTLERS]


def test_a_new_delivery() -> None:
    harness = Harness(now=42.0)
    delivery = harness.delivery
    assert not delivery.settled
    assert not delivery.released
    assert not delivery.running
    assert not delivery.cancelled_by_shutdown
    assert delivery.last_progress == 42.0
    assert (delivery.scope, delivery.ctx) == (None, None)
    assert delivery.group == "default"
    assert harness.sent == []
    assert harness.released == []


@pytest.mark.parametrize(("name", "settle", "payload"), SETTLERS, ids=SETTLER_IDS)
def test_the_first_settlement_is_the_only_one(name: str, settle: Settle, payload: bytes) -> None:
    harness = Harness()
    delivery = harness.delivery
    assert settle(delivery) is True
    assert delivery.settled
    assert harness.payloads == [payload]
    for _, other, _ in SETTLERS:
        assert other(delivery) is False
    assert settle(delivery) is False
    assert harness.payloads == [payload]
    assert not delivery.released
    assert harness.released == []


def test_a_nak_payload_is_finite() -> None:
    harness = Harness()
    harness.delivery.nak(float("inf"))
    assert harness.payloads == [b'-NAK {"delay": 604800000000000}']


def test_in_progress_only_while_unsettled() -> None:
    harness = Harness(now=1.0)
    delivery = harness.delivery
    delivery.in_progress(2.0)
    delivery.in_progress(3.0)
    assert harness.payloads == [b"+WPI", b"+WPI"]
    assert delivery.last_progress == 3.0
    delivery.ack()
    delivery.in_progress(4.0)
    assert harness.payloads == [b"+WPI", b"+WPI", b"+ACK"]
    assert delivery.last_progress == 4.0


def test_the_last_let_go_naks_an_unsettled_delivery_and_releases() -> None:
    harness = Harness()
    delivery = harness.delivery
    delivery.let_go()
    assert harness.payloads == [UNSETTLED_NAK]
    assert nak_payload(UNSETTLED_DELAY) == UNSETTLED_NAK
    assert harness.released == [delivery]
    assert delivery.released
    assert delivery.settled


def test_the_last_let_go_of_a_settled_delivery_sends_nothing() -> None:
    harness = Harness()
    delivery = harness.delivery
    delivery.term()
    delivery.let_go()
    assert harness.payloads == [b"+TERM"]
    assert harness.released == [delivery]


def test_holds_are_counted() -> None:
    harness = Harness()
    delivery = harness.delivery
    delivery.hold()
    delivery.hold()
    delivery.let_go()
    delivery.let_go()
    assert harness.released == []
    assert not delivery.released
    assert harness.payloads == []
    delivery.ack()
    delivery.let_go()
    assert harness.released == [delivery]
    assert harness.payloads == [b"+ACK"]


def test_a_hold_keeps_an_unsettled_delivery_open() -> None:
    harness = Harness()
    delivery = harness.delivery
    delivery.hold()  # a pipelined recording
    delivery.let_go()  # the runner is done
    assert harness.payloads == []
    assert not delivery.settled
    delivery.let_go()  # the recording failed without settling
    assert harness.payloads == [UNSETTLED_NAK]
    assert harness.released == [delivery]


def test_after_release() -> None:
    harness = Harness()
    delivery = harness.delivery
    delivery.let_go()
    delivery.let_go()
    delivery.let_go()
    assert harness.released == [delivery]
    with pytest.raises(RuntimeError, match="released"):
        delivery.hold()
    assert delivery.released
    assert delivery.ack() is False
    assert delivery.nak(5) is False
    assert delivery.term() is False
    delivery.in_progress(200.0)
    assert harness.payloads == [UNSETTLED_NAK]
    assert harness.released == [delivery]


# -- any sequence of operations -----------------------------------------------------------


class DeliveryMachine(RuleBasedStateMachine):
    """Random ack/nak/term/hold/let_go/in_progress against a model of holds."""

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness()
        self.holds = 1
        self.settled = False

    @property
    def delivery(self) -> Delivery:
        return self.harness.delivery

    def settle(self, first: bool) -> None:
        assert first is not self.settled
        self.settled = True

    @rule()
    def ack(self) -> None:
        self.settle(self.delivery.ack())

    @rule()
    def term(self) -> None:
        self.settle(self.delivery.term())

    @rule(delay=st.floats() | st.just(0.0))
    def nak(self, delay: float) -> None:
        self.settle(self.delivery.nak(delay))

    @rule(now=st.floats(allow_nan=False))
    def in_progress(self, now: float) -> None:
        before = len(self.harness.sent)
        self.delivery.in_progress(now)
        assert self.delivery.last_progress == now
        assert len(self.harness.sent) == before + (0 if self.settled else 1)

    @precondition(lambda self: self.holds > 0)
    @rule()
    def hold(self) -> None:
        self.delivery.hold()
        self.holds += 1

    @precondition(lambda self: self.holds == 0)
    @rule()
    def hold_after_release(self) -> None:
        with pytest.raises(RuntimeError):
            self.delivery.hold()

    @rule()
    def let_go(self) -> None:
        self.delivery.let_go()
        if self.holds > 0:
            self.holds -= 1
        if self.holds == 0:
            self.settled = True

    @invariant()
    def at_most_one_settlement(self) -> None:
        payloads = self.harness.payloads
        settlements = [i for i, payload in enumerate(payloads) if is_settlement(payload)]
        assert len(settlements) == (1 if self.settled else 0)
        assert self.delivery.settled == self.settled
        assert all(payload == b"+WPI" for payload in payloads if not is_settlement(payload))
        if settlements:  # +WPI only before the settlement
            assert b"+WPI" not in payloads[settlements[0] :]

    @invariant()
    def released_once_when_the_holds_are_gone(self) -> None:
        assert len(self.harness.released) == (1 if self.holds == 0 else 0)
        assert self.delivery.released == (self.holds == 0)
        if self.delivery.released:
            assert self.delivery.settled
            assert self.harness.released == [self.delivery]


DeliveryMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
TestDeliveryMachine = DeliveryMachine.TestCase


def test_an_unsettled_delivery_backs_off_with_its_delivery_count() -> None:
    assert [unsettled_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert unsettled_delay(40) == MAX_UNSETTLED_DELAY
    assert unsettled_delay(0) == UNSETTLED_DELAY
