"""PullState, the pull window's bookkeeping, without a server."""

from __future__ import annotations

import pytest

from natrio._pull import Action, PullState

PREFIX = "_INBOX.abc."


def make(window: int = 10) -> PullState:
    return PullState(window, PREFIX)


def pull(state: PullState) -> str:
    """Start the pull next_pull() asks for; its reply subject."""
    batch = state.next_pull()
    assert batch > 0
    return state.start(batch)


def deliver(state: PullState, count: int) -> None:
    for _ in range(count):
        state.delivered()


# -- window accounting ----------------------------------------------------------------


def test_first_pull_asks_for_the_whole_window() -> None:
    state = make(10)
    assert state.next_pull() == 10
    assert state.start(10) == PREFIX + "1.10"
    assert (state.requested, state.held, state.pulls) == (10, 0, 1)
    assert state.next_pull() == 0


def test_each_pull_has_its_own_reply_subject() -> None:
    state = make(10)
    first = pull(state)
    deliver(state, 10)
    state.release(4)
    assert pull(state) == PREFIX + "2.4" != first
    assert state.pull_of(first) == (1, 10)
    assert state.pull_of(PREFIX + "2.4") == (2, 4)


def test_deliveries_move_requested_to_held() -> None:
    state = make(10)
    pull(state)
    for n in range(1, 4):
        state.delivered()
        assert (state.held, state.requested, state.received) == (n, 10 - n, n)


def test_re_pull_waits_for_half_the_window() -> None:
    state = make(10)
    pull(state)
    deliver(state, 6)  # 4 still asked for
    state.release(4)
    assert state.next_pull() == 0  # 4 free, threshold 5
    state.release(1)
    assert state.next_pull() == 5
    state.start(5)
    assert state.held + state.requested == 10


def test_room_below_threshold_is_pulled_when_nothing_is_asked_for() -> None:
    state = make(10)
    pull(state)
    deliver(state, 10)
    state.release(6)
    pull(state)  # 6
    state.release(2)  # held 2, requested 6, free 2 < 5: wait for more room
    assert state.next_pull() == 0
    deliver(state, 6)  # nothing asked for any more: pull what there is
    assert state.requested == 0
    assert state.next_pull() == 2


def test_window_of_one() -> None:
    state = make(1)
    pull(state)
    assert state.requested == 1
    state.delivered()
    assert state.next_pull() == 0
    state.release()
    assert state.next_pull() == 1


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        PullState(0)


# -- statuses -------------------------------------------------------------------------


def test_heartbeat_shows_liveness_and_changes_nothing() -> None:
    state = make(10)
    subject = pull(state)
    assert state.on_status(subject, "100", "Idle Heartbeat") is Action.ALIVE
    assert state.requested == 10


@pytest.mark.parametrize("description", ["Request Timeout", "Interest Expired"])
def test_expired_pull_leaves_what_it_did_not_bring(description: str) -> None:
    state = make(10)
    first = pull(state)
    deliver(state, 10)
    state.release(5)
    second = pull(state)  # 5
    state.release(5)
    pull(state)  # 5 more
    deliver(state, 3)  # of either pull: the server fills waiting pulls round-robin
    assert state.requested == 7
    # The second pull ends with 2 of its 5 unfilled: the third's 5 are still asked for.
    assert state.on_status(second, "408", description, 2) is Action.PULL
    assert (state.held, state.requested) == (3, 5)
    assert state.on_status(first, "408", description, 0) is Action.PULL
    assert state.requested == 5


def test_ended_pull_without_a_pending_count_gives_back_its_batch() -> None:
    # 404/408 without pending headers answer no-wait pulls before any delivery.
    state = make(10)
    first = pull(state)
    deliver(state, 10)
    state.release(10)
    second = pull(state)
    assert state.on_status(second, "408", "Requests Pending") is Action.PULL
    assert state.requested == 0
    assert state.on_status(first, "404", "No Messages") is Action.PULL
    assert state.requested == 0


def test_pending_count_never_takes_requested_below_zero() -> None:
    state = make(10)
    subject = pull(state)
    deliver(state, 8)
    assert state.on_status(subject, "408", "Request Timeout", 10) is Action.PULL
    assert state.requested == 0


def test_leadership_change_forgets_every_pull() -> None:
    state = make(10)
    pull(state)
    deliver(state, 10)
    state.release(5)
    second = pull(state)
    state.release(5)
    third = pull(state)
    epoch = state.epoch
    assert state.on_status(second, "409", "Leadership Change") is Action.PULL
    assert (state.requested, state.epoch) == (0, epoch + 1)
    # The new leader tells each pull; the others' notices are stale now.
    assert state.on_status(third, "409", "Leadership Change") is Action.STALE
    assert state.epoch == epoch + 1
    assert state.next_pull() == 10


@pytest.mark.parametrize("description", ["Consumer Deleted", "Consumer is push based"])
def test_deleted_consumer_is_gone(description: str) -> None:
    state = make(10)
    subject = pull(state)
    assert state.on_status(subject, "409", description) is Action.GONE
    assert (state.gone, state.requested) == (description, 10)
    state.recreated()
    assert (state.gone, state.requested) == (None, 0)
    assert state.next_pull() == 10
    # The other pulls' notices come too late to matter.
    assert state.on_status(subject, "409", description) is Action.STALE


@pytest.mark.parametrize(
    "description",
    ["Exceeded MaxRequestBatch of 5", "Exceeded MaxWaiting", "Exceeded MaxRequestExpires of 1s"],
)
def test_rejected_pull_backs_off(description: str) -> None:
    state = make(10)
    first = pull(state)
    deliver(state, 10)
    state.release(5)
    rejected = pull(state)  # 5
    state.release(5)
    pull(state)  # 5
    assert state.on_status(rejected, "409", description) is Action.BACK_OFF
    assert state.backoff == pytest.approx(0.1)
    assert (state.requested, state.gone) == (5, None)
    assert state.pull_of(first) == (1, 10)


def test_pull_ended_by_server_shutdown_is_pulled_again() -> None:
    # 409 with a pending count: a waiting pull the server ended, not a rejected one.
    state = make(10)
    subject = pull(state)
    deliver(state, 4)
    assert state.on_status(subject, "409", "Server Shutdown", 6) is Action.PULL
    assert (state.requested, state.backoff) == (0, 0.0)


def test_bad_request_is_gone() -> None:
    state = make(10)
    subject = pull(state)
    assert state.on_status(subject, "400", "Bad Request - Invalid Priority Group") is Action.GONE
    assert state.gone == "400 Bad Request - Invalid Priority Group"


def test_no_responders_back_off_escalates_then_gone() -> None:
    state = make(10)
    delays = []
    for _ in range(2):
        subject = pull(state)
        assert state.on_status(subject, "503") is Action.BACK_OFF
        assert state.requested == 0
        delays.append(state.backoff)
    subject = pull(state)
    assert state.on_status(subject, "503") is Action.GONE
    assert state.gone == "pulls unanswered (503)"
    assert delays == [pytest.approx(0.1), pytest.approx(0.2)]
    # The count starts over once the consumer is recreated.
    state.recreated()
    subject = pull(state)
    assert state.on_status(subject, "503") is Action.BACK_OFF


def test_back_off_is_capped_and_reset_by_a_delivery() -> None:
    state = make(10)
    for _ in range(10):
        subject = pull(state)
        assert state.on_status(subject, "409", "Exceeded MaxWaiting") is Action.BACK_OFF
    assert state.backoff == pytest.approx(2.0)
    subject = pull(state)
    state.delivered()
    assert state.backoff == 0.0
    state.on_status(subject, "503")
    assert state.backoff == pytest.approx(0.1)


def test_unknown_status_ends_the_pull_and_backs_off() -> None:
    state = make(10)
    subject = pull(state)
    assert state.on_status(subject, "412", "Required Api Level") is Action.BACK_OFF
    assert state.requested == 0


# -- 423: another client holds the pin ------------------------------------------------


@pytest.mark.parametrize(
    ("description", "pending", "requested"),
    [
        # A waiting pull ended when its pin went stale: the server says what was left.
        ("Nats-Wrong-Pin-Id", 6, 0),
        # A pull rejected outright (nothing delivered for it): its batch is given back.
        ("Nats-Pin-Id mismatch", None, 0),
    ],
)
def test_pin_mismatch_ends_the_pull_and_forgets_the_pin(
    description: str, pending: int | None, requested: int
) -> None:
    state = make(10)
    state.pin_id = "PIN-A"
    subject = pull(state)
    if pending is not None:
        deliver(state, 10 - pending)
    assert state.on_status(subject, "423", description, pending) is Action.PULL
    assert state.pin_id is None
    assert state.requested == requested
    # Pull on as a standby, without a pin id.
    assert state.next_pull() > 0


def test_pin_mismatch_ends_only_its_own_pull() -> None:
    state = make(10)
    state.pin_id = "PIN-A"
    pull(state)
    deliver(state, 10)
    state.release(5)
    rejected = pull(state)  # 5
    state.release(5)
    pull(state)  # 5
    assert state.on_status(rejected, "423", "Nats-Pin-Id mismatch") is Action.PULL
    assert state.requested == 5


def test_pin_mismatch_keeps_a_pin_learnt_since() -> None:
    state = make(10)
    state.pin_id = "PIN-A"
    old = pull(state)  # sent with PIN-A
    deliver(state, 5)
    state.release(5)
    state.pin_id = "PIN-B"  # the server handed out a new pin meanwhile
    pull(state)  # sent with PIN-B
    assert state.on_status(old, "423", "Nats-Wrong-Pin-Id", 5) is Action.PULL
    assert state.pin_id == "PIN-B"
    assert state.requested == 5


def test_pin_mismatch_for_a_pull_sent_with_the_pin_forgets_it() -> None:
    state = make(10)
    state.pin_id = "PIN-A"
    state.pin_id = "PIN-A"  # learning the same pin again changes nothing
    subject = pull(state)
    assert state.on_status(subject, "423", "Nats-Wrong-Pin-Id", 10) is Action.PULL
    assert state.pin_id is None


# -- epochs: forgotten pulls ----------------------------------------------------------


def test_reset_bumps_the_epoch_and_forgets_the_pulls() -> None:
    state = make(10)
    subject = pull(state)
    epoch = state.epoch
    state.reset()
    assert state.epoch == epoch + 1
    assert state.requested == 0
    assert state.pull_of(subject) is None
    assert state.next_pull() == 10


def test_stale_status_is_ignored() -> None:
    # The bug: a forgotten pull's late 408 was charged to the new pull, and a second
    # window went out.
    state = make(10)
    old = pull(state)
    state.reset()  # a quick reconnect: the old pull may still be alive on the server
    new = pull(state)
    assert state.requested == 10
    assert state.on_status(old, "408", "Request Timeout", 10) is Action.STALE
    assert state.on_status(old, "409", "Leadership Change") is Action.STALE
    assert state.on_status(old, "409", "Exceeded MaxWaiting") is Action.STALE
    assert state.on_status(old, "503") is Action.STALE
    assert state.on_status(old, "400", "Bad Request") is Action.STALE
    assert (state.requested, state.backoff, state.gone) == (10, 0.0, None)
    assert state.next_pull() == 0
    assert state.on_status(new, "408", "Request Timeout", 10) is Action.PULL
    assert state.requested == 0


def test_stale_heartbeat_is_not_liveness() -> None:
    state = make(10)
    old = pull(state)
    state.reset()
    new = pull(state)
    assert state.on_status(old, "100", "Idle Heartbeat") is Action.STALE
    assert state.on_status(new, "100", "Idle Heartbeat") is Action.ALIVE


def test_stale_pin_mismatch_keeps_the_pin() -> None:
    state = make(10)
    state.pin_id = "PIN-A"
    old = pull(state)
    state.reset()
    assert state.on_status(old, "423", "Nats-Wrong-Pin-Id", 10) is Action.STALE
    assert state.pin_id == "PIN-A"


def test_data_after_reset_is_held_and_requested_never_goes_negative() -> None:
    # Task messages carry their stream subject, not the pull's: a forgotten pull's
    # deliveries are held like any other, and count off what is asked for, never below 0.
    state = make(4)
    pull(state)
    state.reset()
    deliver(state, 4)  # everything the forgotten pull asked for arrives after all
    assert (state.held, state.requested, state.received) == (4, 0, 4)
    assert state.next_pull() == 0
    state.release(4)
    pull(state)
    deliver(state, 7)  # and more than anything asked for
    assert (state.held, state.requested) == (7, 0)
    assert state.next_pull() == 0


@pytest.mark.parametrize(
    "subject",
    [
        "_INBOX.other.1.10",  # another inbox
        PREFIX + "2.10",  # a pull not sent yet
        PREFIX + "1",  # malformed
        PREFIX + "x.10",
        PREFIX + "1.10.3",
    ],
)
def test_foreign_subject_is_stale(subject: str) -> None:
    state = make(10)
    pull(state)
    assert state.on_status(subject, "408", "Request Timeout", 10) is Action.STALE
    assert state.requested == 10
