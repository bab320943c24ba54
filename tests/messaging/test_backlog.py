"""Casts sent in the background (what notifiers send): the transport's backlog on its own, driven by futures
on a loop; then through a real router, held by a plain AMQP receiver that settles only when told to."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from proton.utils import BlockingConnection

import meshbus.messaging.transport as transport_module
from meshbus.messaging import MessageDeliveryFailure, MessagingTimeout, Transport, wire
from meshbus.messaging.deadlines import GRANULE, Deadlines
from meshbus.messaging.transport import _Backlog, _Cast
from tests.conftest import Router
from tests.messaging.conftest import WAIT, url_of

LIMIT = 4


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(transport_module, "BACKLOG_LIMIT", LIMIT)
    return LIMIT


# -- the backlog's bookkeeping, no I/O ------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connected() -> None:
    """A transport's `offline()` while it has its connection."""


def posted(backlog: _Backlog, count: int, timeout: float = WAIT) -> list[_Cast]:
    return [backlog.post("there", timeout) for _ in range(count)]


def test_posters_wait_at_the_limit_until_half_is_taken(loop: asyncio.AbstractEventLoop, limit: int) -> None:
    backlog = _Backlog(Deadlines(loop), connected)
    sent = posted(backlog, limit - 1)
    assert backlog.room().done()
    sent += posted(backlog, 1)
    room = backlog.room()
    assert not room.done()
    sent.pop().taken()
    assert not room.done(), "woken before half was taken"
    sent.pop().taken()
    assert room.done()


def test_empty_once_every_message_is_taken_or_given_up(loop: asyncio.AbstractEventLoop) -> None:
    backlog = _Backlog(Deadlines(loop), connected)
    assert backlog.empty().done()
    first, second = posted(backlog, 2)
    empty = backlog.empty()
    first.taken()
    assert not empty.done()
    second.set_exception(MessageDeliveryFailure("refused"))
    assert empty.done()


def test_the_first_failure_is_kept_with_a_count_of_the_others(loop: asyncio.AbstractEventLoop) -> None:
    backlog = _Backlog(Deadlines(loop), connected)
    for n, sent in enumerate(posted(backlog, 3)):
        sent.set_exception(MessageDeliveryFailure(f"refused {n}"))
        sent.taken()  # an outcome after the end changes nothing
    failure = backlog.take_failure()
    assert str(failure) == "refused 0"
    assert failure is not None and failure.__notes__ == [
        "(2 more sent in the background were not taken either)"
    ]
    assert backlog.take_failure() is None
    assert backlog.count == 0


def test_what_is_not_taken_by_its_deadline_is_given_up(loop: asyncio.AbstractEventLoop) -> None:
    backlog = _Backlog(Deadlines(loop), connected)
    (soon,), (later,) = posted(backlog, 1, timeout=0.01), posted(backlog, 1, timeout=WAIT)
    loop.run_until_complete(asyncio.sleep(0.01 + 2 * GRANULE))  # the deadline, and a granule to spare
    assert (soon.done(), later.done()) == (True, False)
    failure = backlog.take_failure()
    assert isinstance(failure, MessagingTimeout)
    assert str(failure) == "there: not taken within 0.01 s"


def test_a_waiter_that_gave_up_does_not_stop_the_next(loop: asyncio.AbstractEventLoop, limit: int) -> None:
    backlog = _Backlog(Deadlines(loop), connected)
    sent = posted(backlog, limit)
    backlog.room().cancel()  # a task waiting for room was cancelled
    backlog.empty().cancel()
    room, empty = backlog.room(), backlog.empty()
    for each in sent:
        each.taken()
    assert room.done() and empty.done()


# -- through a router ---------------------------------------------------------------------------------


class Held:
    """A plain AMQP receiver on an address of its own, which settles only when told to."""

    def __init__(self, router: Router) -> None:
        self.address = f"held/{uuid.uuid4().hex}"
        self.connection = BlockingConnection(f"{router.host}:{router.port}", timeout=WAIT)
        self.receiver = self.connection.create_receiver(self.address, credit=100)

    def receive(self, count: int = 1) -> None:
        for _ in range(count):
            self.receiver.receive(WAIT)

    def settle(self, outcome: str, count: int = 1) -> None:
        """`accept` or `reject` the oldest `count` received, and write it."""
        for _ in range(count):
            getattr(self.receiver, outcome)()
        # A blocking connection writes only while it waits; asking for its pending output makes the frames.
        connection = self.connection.conn
        assert connection is not None and connection.transport is not None
        transport = connection.transport
        self.connection.wait(lambda: transport.pending() == 0)


@pytest.fixture
def held(default_router: Router) -> Iterator[Held]:
    receiver = Held(default_router)
    yield receiver
    receiver.connection.close()


@pytest.fixture
def sending(default_router: Router) -> Iterator[Transport]:
    opened = Transport(url_of(default_router))
    yield opened
    opened.close()


def post(sending: Transport, address: str) -> None:
    message = wire.encode_request(address, {"method": "note"}, {})
    sending.post(address, message, at_least_once=True, timeout=WAIT, retry=None)


def waits_until(work: Callable[[], None], release: Callable[[], None], what: str) -> None:
    """`work`, in a thread, still waits a moment after it began, and returns once `release()` has run."""
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive(), f"{what} did not wait"
    release()
    thread.join(WAIT)
    assert not thread.is_alive(), f"{what} still waits"


def test_a_post_returns_before_it_is_taken_and_flush_waits_for_it(sending: Transport, held: Held) -> None:
    post(sending, held.address)
    held.receive()  # delivered, not yet settled
    waits_until(sending.flush, lambda: held.settle("accept"), "flush")


def test_a_post_waits_while_the_backlog_is_full(sending: Transport, held: Held, limit: int) -> None:
    for _ in range(limit):
        post(sending, held.address)
    held.receive(limit)
    waits_until(lambda: post(sending, held.address), lambda: held.settle("accept", limit // 2), "a post")


def test_a_refused_post_is_logged_and_raised_by_the_next_flush(
    sending: Transport, held: Held, caplog: pytest.LogCaptureFixture
) -> None:
    post(sending, held.address)
    held.receive()
    held.settle("reject")
    with pytest.raises(MessageDeliveryFailure, match="rejected"):
        sending.flush()
    assert [r.levelno for r in caplog.records if r.name == "meshbus.messaging"] == [logging.WARNING]
    sending.flush()


def test_close_waits_for_the_backlog_to_be_taken(default_router: Router, held: Held) -> None:
    closing = Transport(url_of(default_router))
    post(closing, held.address)
    held.receive()
    waits_until(closing.close, lambda: held.settle("accept"), "close")


def test_close_drops_what_is_not_taken_in_time_and_says_so(
    default_router: Router,
    held: Held,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(transport_module, "CLOSE_LINGER", 0.1)
    closing = Transport(url_of(default_router))
    post(closing, held.address)
    held.receive()
    closing.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "meshbus.messaging"]
    assert warnings == ["closing with 1 messages sent in the background not yet taken: they are dropped"]


# -- a cast's end, told to whoever waits for it --------------------------------------------------------------


def test_a_cast_calls_its_done_callback_once(loop: asyncio.AbstractEventLoop) -> None:
    told: list[_Cast] = []
    cast = _Cast(Deadlines(loop), connected, "there", WAIT)
    cast.add_done_callback(told.append)
    cast.taken()
    cast.set_exception(MessageDeliveryFailure("an outcome after the end changes nothing"))
    assert told == [cast]
    assert cast.done()
    cast.result()  # taken: raises nothing
    cast.add_done_callback(told.append)  # added after the end: called at once
    assert told == [cast, cast]


def test_a_cast_that_ended_before_its_future_was_asked_for(loop: asyncio.AbstractEventLoop) -> None:
    cast = _Cast(Deadlines(loop), connected, "there", WAIT)
    refused = MessageDeliveryFailure("refused")
    cast.set_exception(refused)
    assert cast.future.exception() is refused
    with pytest.raises(MessageDeliveryFailure):
        cast.result()


def test_a_cancelled_future_gives_its_cast_up(loop: asyncio.AbstractEventLoop) -> None:
    cast = _Cast(Deadlines(loop), connected, "there", WAIT)
    cast.future.cancel()
    assert cast.done()  # its delivery sends nothing more
    cast.taken()  # and what comes after changes nothing
    assert cast.future.cancelled()
