"""How a request spends its `retry` budget on the connection's failures: `_Delivery` and `_ConnectionWaits`
driven with a stand-in connection, no sockets and no clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest

from meshbus.amqp.client import ClientConnection, OutcomeUnknown
from meshbus.messaging.exceptions import MessageDeliveryFailure, MessagingError
from meshbus.messaging.transport import _ConnectionWaits, _Delivery

ADDRESS = "openstack.org/om/rpc/anycast/nova/compute"


class Connection:
    """What `_Delivery` and `_ConnectionWaits` see of a `ClientConnection`."""

    def __init__(self) -> None:
        self.connected = False
        self.failed_attempts = 0
        self.opens = 0
        self.on_lost: list[Callable[[str], None]] = []
        self.on_opened: list[Callable[[], None]] = []
        self.sent: list[_Delivery] = []
        self.later: list[Callable[[], None]] = []  # resends, run when the test says

    @property
    def loop(self) -> Connection:
        return self

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append(callback)

    def send(self, address: str, payload: bytes, *, outcome: _Delivery) -> None:
        self.sent.append(outcome)

    def open(self) -> None:
        self.connected, self.failed_attempts, self.opens = True, 0, self.opens + 1
        for callback in self.on_opened:
            callback()

    def fail(self) -> None:
        """A connection dropped, or an attempt to make one failed."""
        self.connected = False
        self.failed_attempts += 1
        for callback in self.on_lost:
            callback("refused")


class Caller:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.error is not None

    def set_exception(self, error: BaseException) -> None:
        self.error = error


def request(connection: Connection, retry: int | None) -> tuple[_Delivery, Caller]:
    waits = _ConnectionWaits(cast(ClientConnection, connection), lambda: "not connected to a router.")
    caller = Caller()
    delivery = _Delivery(waits, ADDRESS, b"payload", retry, caller, lambda: None)
    return delivery, caller


def resend(connection: Connection) -> None:
    later, connection.later = connection.later, []
    for callback in later:
        callback()


def failure(caller: Caller) -> Any:
    assert caller.error is not None, "the request has not failed"
    return caller.error


def test_a_request_sent_while_the_connection_is_being_made_waits_for_that_attempt() -> None:
    connection = Connection()
    delivery, caller = request(connection, retry=0)
    delivery.send()
    assert not caller.done()
    connection.fail()
    assert isinstance(failure(caller), MessageDeliveryFailure)
    assert str(caller.error) == (
        f"{ADDRESS}: not connected to a router. Given up after 1 failed attempt (retry=0)."
    )


def test_a_request_sent_after_an_attempt_failed_counts_that_failure_at_once() -> None:
    connection = Connection()
    connection.fail()
    delivery, caller = request(connection, retry=1)
    delivery.send()
    assert not caller.done()
    connection.fail()
    assert "Given up after 2 failed attempts (retry=1)" in str(failure(caller))


def test_a_request_handed_to_a_connection_no_longer_counts_that_connections_attempts() -> None:
    connection = Connection()
    delivery, caller = request(connection, retry=0)
    delivery.send()  # queued by the connection, and written once it is open
    connection.open()
    assert not delivery.waits._waiting, "a request handed to the connection is still held"
    connection.fail()
    assert not caller.done()


def written_then_dropped(retry: int) -> tuple[Connection, Caller]:
    """A request written on an open connection, which then drops: its outcome is unknown."""
    connection = Connection()
    connection.open()
    delivery, caller = request(connection, retry)
    delivery.send()
    connection.fail()
    delivery.set_exception(OutcomeUnknown("the connection dropped"))  # the drop, as the connection tells it
    return connection, caller


def test_a_drop_counted_by_a_resend_is_not_counted_again_while_it_waits() -> None:
    connection, caller = written_then_dropped(retry=1)
    assert not caller.done()
    resend(connection)  # waits for a connection: the drop was counted once, one attempt is left to fail
    assert not caller.done()
    connection.fail()
    assert "Given up after 2 failed attempts (retry=1)" in str(failure(caller))


def test_an_unknown_outcome_past_the_budget_says_the_resends_were_spent() -> None:
    _, caller = written_then_dropped(retry=0)
    assert isinstance(failure(caller), MessagingError)
    assert str(caller.error).endswith("gave up after 0 resends")


@pytest.mark.parametrize("retry", [None, 3])
def test_without_a_connection_a_request_within_its_budget_is_sent_once_one_is_made(retry: int | None) -> None:
    connection = Connection()
    delivery, caller = request(connection, retry)
    delivery.send()
    connection.fail()
    connection.fail()
    connection.open()
    assert not caller.done()
    assert connection.sent == [delivery]  # queued by the connection, and written once it is open
