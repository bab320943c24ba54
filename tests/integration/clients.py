"""Clients for the integration tests: scripted proton Containers in threads, and raw sockets.

1. `Client` is a MessagingHandler with a deadline: a test subclasses it, opens what it needs in `begin()` and
   calls `done()` when it has seen what it waited for. `run(client)` runs it in a Container on a thread and
   re-raises, in the test, whatever failed in the client (an assertion, a time-out, an unexpected error).
2. `Exchange` is the common script: consumers attach, then a producer sends messages; it records what each
   consumer received and the outcome the producer saw for each message.
3. `RawPeer` is a socket the test drives by hand; the AMQP frames it sends and reads are made and decoded by
   an in-memory proton Transport, never by hand.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from proton import Condition, Connection, Delivery, Disposition, Endpoint, Event, Handler, Message, Transport
from proton._io import IO
from proton._reactor import Task
from proton.handlers import MessagingHandler
from proton.reactor import Container, LinkOption

REJECTION = Condition("meshbus-test:refused", "the test consumer refuses this message")
ACCEPT, REJECT, RELEASE = "accept", "reject", "release"


T = TypeVar("T")


def the(value: T | None) -> T:
    """An event's link, delivery, connection...: proton types them optional; the event at hand has them."""
    assert value is not None
    return value


class Client(MessagingHandler):
    """A scripted client; it fails if it has not called `done()` within `timeout` seconds."""

    timeout = 10.0

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.connections: list[Connection] = []
        self.finished = False
        self._container: Container | None = None
        self._deadline: Task | None = None

    @property
    def container(self) -> Container:
        assert self._container is not None, "the client has not started"
        return self._container

    def on_start(self, event: Event) -> None:
        self._container = event.container
        # proton's loop sleeps up to this long when nothing wakes it, as after a socket the peer closed.
        self.container.timeout = 0.2
        self._deadline = self.container.schedule(self.timeout, _Deadline(self))
        self.begin()

    def begin(self) -> None:
        """Open the connections and links the script starts with."""
        raise NotImplementedError

    def connect(self, **kwargs: Any) -> Connection:
        """A connection to the router (never reconnecting: a dropped connection is a finding)."""
        connection = self.container.connect(self.url, reconnect=False, **kwargs)
        self.connections.append(connection)
        return connection

    def later(self, delay: float, action: Callable[[], object]) -> Task:
        """Call `action()` on the client's thread after `delay` seconds."""
        return self.container.schedule(delay, _Call(action))

    def done(self) -> None:
        """The script is over: close every connection; the container stops once they are closed."""
        if self.finished:
            return
        self.finished = True
        if self._deadline is not None:
            self._deadline.cancel()
        for connection in self.connections:
            if not connection.state & Endpoint.LOCAL_CLOSED:
                connection.close()

    def status(self) -> str:
        """The client's progress, for time-out messages: its plain attributes (sizes of the long ones)."""
        shown: dict[str, object] = {}
        for name, value in vars(self).items():
            if name.startswith("_") or name in ("handlers", "connections", "fatal_conditions"):
                continue
            if isinstance(value, list | dict) and len(value) > 10:
                shown[name] = f"<{len(value)} items>"
            elif isinstance(value, int | float | str | list | dict):
                shown[name] = value
        return repr(shown)[:2000]

    # Errors fail the test unless a subclass expects them.
    def on_transport_error(self, event: Event) -> None:
        if not self.finished:
            raise AssertionError(f"transport error: {_describe(the(event.transport).condition)}")

    def on_connection_error(self, event: Event) -> None:
        condition = the(event.connection).remote_condition
        raise AssertionError(f"connection closed by the router: {_describe(condition)}")

    def on_session_error(self, event: Event) -> None:
        condition = the(event.session).remote_condition
        raise AssertionError(f"session closed by the router: {_describe(condition)}")

    def on_link_error(self, event: Event) -> None:
        link = the(event.link)
        raise AssertionError(f"link {link.name} closed by the router: {_describe(link.remote_condition)}")


class _Deadline(Handler):
    def __init__(self, client: Client) -> None:
        self.client = client

    def on_timer_task(self, event: Event) -> None:
        client = self.client
        name = type(client).__name__
        raise TimeoutError(f"{name} did not finish within {client.timeout} s: {client.status()}")


class _Call(Handler):
    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action

    def on_timer_task(self, event: Event) -> None:
        self.action()


def _describe(condition: Condition | None) -> str:
    return "no condition" if condition is None else f"{condition.name}: {condition.description}"


class Running:
    """A client running on its own thread."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=type(client).__name__, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            Container(self.client).run()
        except BaseException as error:  # handed to the test's thread by join()
            self.error = error

    def join(self) -> None:
        """Wait for the client to finish; raise what failed in it."""
        self.thread.join(self.client.timeout + 10)
        if self.thread.is_alive():
            raise AssertionError(f"{type(self.client).__name__} is stuck: {self.client.status()}")
        if self.error is not None:
            raise self.error
        assert self.client.finished, f"{type(self.client).__name__} stopped early: {self.client.status()}"


ClientT = TypeVar("ClientT", bound=Client)


def run(client: ClientT) -> ClientT:
    """Run the client to its end on a Container thread; return it for the test to inspect."""
    Running(client).join()
    return client


# -- the common exchange ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the producer saw for one message."""

    state: int  # Delivery.ACCEPTED, REJECTED, RELEASED or MODIFIED
    condition: Condition | None
    failed: bool
    undeliverable: bool
    seconds: float  # from send to settlement

    @property
    def name(self) -> str:
        return _STATE_NAMES.get(self.state, str(self.state))


_STATE_NAMES: dict[int, str] = {
    Disposition.ACCEPTED: "accepted",
    Disposition.REJECTED: "rejected",
    Disposition.RELEASED: "released",
    Disposition.MODIFIED: "modified",
}


class Exchange(Client):
    """Consumers attach to `address` (each settling as its policy says), then a producer sends `messages`.

    The producer's link targets `address`, or is an anonymous-relay link (null target) when `anonymous` is
    true; then each message's `to` is set to `address`. With `hold`, consumers settle nothing until all the
    messages have reached them, each `copies` times in all. The client is done when the producer has every
    message settled. A subclass may give consumers' links options (`receiver_options`).
    """

    def __init__(
        self,
        url: str,
        address: str,
        messages: Sequence[Message],
        consumers: Sequence[str] = (ACCEPT,),
        *,
        anonymous: bool = False,
        hold: bool = False,
        copies: int = 1,
        credit: int = 10,
    ) -> None:
        super().__init__(url, prefetch=credit, auto_accept=False)
        self.address = address
        self.messages = list(messages)
        self.policies = list(consumers)
        self.anonymous = anonymous
        self.hold = hold
        self.copies = copies
        self.received: list[list[Message]] = [[] for _ in consumers]
        self.outcomes: list[Outcome | None] = [None] * len(self.messages)
        self._receivers: dict[Any, int] = {}
        self._held: list[tuple[int, Delivery]] = []
        self._sent: dict[Any, tuple[int, float]] = {}
        self._next = 0
        self._producing = False

    def begin(self) -> None:
        for index in range(len(self.policies)):
            receiver = self.container.create_receiver(
                self.connect(), self.address, name=f"consumer-{index}", options=self.receiver_options(index)
            )
            self._receivers[receiver] = index
        if not self.policies:
            self._open_producer()

    def receiver_options(self, index: int) -> list[LinkOption]:
        """Options for consumer `index`'s link: none here."""
        return []

    def _open_producer(self) -> None:
        self._producing = True
        target = None if self.anonymous else self.address
        self.producer = self.container.create_sender(self.connect(), target, name="producer")

    def on_link_opened(self, event: Event) -> None:
        attached = all(receiver.state & Endpoint.REMOTE_ACTIVE for receiver in self._receivers)
        if the(event.link).is_receiver and attached and not self._producing:
            self._open_producer()

    def on_sendable(self, event: Event) -> None:
        sender = the(event.sender)
        while sender.credit > 0 and self._next < len(self.messages):
            message = self.messages[self._next]
            if self.anonymous:
                message.address = self.address
            delivery = sender.send(message)
            self._sent[delivery] = (self._next, time.monotonic())
            self._next += 1

    def on_message(self, event: Event) -> None:
        index = self._receivers[event.receiver]
        self.received[index].append(event.message)
        delivery = the(event.delivery)
        if not self.hold:
            self._settle(index, delivery)
            return
        self._held.append((index, delivery))
        if len(self._held) == len(self.messages) * self.copies:
            for held_index, delivery in self._held:
                self._settle(held_index, delivery)

    def _settle(self, index: int, delivery: Delivery) -> None:
        policy = self.policies[index]
        if policy == ACCEPT:
            self.accept(delivery)
        elif policy == RELEASE:
            self.release(delivery, delivered=False)
        else:
            delivery.local.condition = REJECTION
            self.reject(delivery)

    def on_settled(self, event: Event) -> None:
        delivery = the(event.delivery)
        if delivery not in self._sent:
            return
        index, sent_at = self._sent[delivery]
        remote = delivery.remote
        self.outcomes[index] = Outcome(
            delivery.remote_state,
            remote.condition,
            bool(remote.failed),
            bool(remote.undeliverable),
            time.monotonic() - sent_at,
        )
        if all(outcome is not None for outcome in self.outcomes):
            self.done()

    def settled_outcomes(self) -> list[Outcome]:
        assert all(outcome is not None for outcome in self.outcomes)
        return [outcome for outcome in self.outcomes if outcome is not None]

    def bodies(self, consumer: int) -> list[Any]:
        return [message.body for message in self.received[consumer]]


def unique(prefix: str) -> str:
    """An address no other test uses (they share a router)."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def numbered(prefix: str, count: int) -> list[Message]:
    """Messages with distinct bodies `prefix-0` ... `prefix-<count-1>`."""
    return [Message(body=f"{prefix}-{n}") for n in range(count)]


# -- raw sockets -----------------------------------------------------------------------------------------


class RawPeer:
    """A client socket driven by the test; proton makes the frames it sends and reads the router's bytes."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, receive_buffer: int | None = None) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # set before connecting, so the window is small from the start
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.socket.settimeout(timeout)
        self.socket.connect((host, port))
        self.transport = Transport()  # client mode, no SASL layer: the plain AMQP header
        self.connection = Connection()
        self.connection.container = "meshbus-test-raw-peer"
        self.transport.bind(self.connection)
        self.received = bytearray()
        # Where the router's log stood before this connection (see `Router.mark`): an earlier connection
        # from the same port, the port since reused, logged its lines before it.
        self.log_since = 0

    def subscribe(self, address: str, credit: int) -> None:
        """Have `open()` also attach a receiving link on `address` with this much credit."""
        receiver = self.connection.session().receiver(f"raw-{address}")
        receiver.source.address = address
        receiver.flow(credit)
        receiver.session.open()
        receiver.open()

    def open(self) -> None:
        """Send the AMQP header and an Open frame (and whatever else proton has queued)."""
        self.connection.open()
        self.send(self.output())

    def output(self) -> bytes:
        """The bytes proton has made for what was opened or sent since the last call."""
        out = bytearray()
        while (pending := self.transport.pending()) > 0:
            out += the(self.transport.peek(pending))
            self.transport.pop(pending)
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def read_until_closed(self, timeout: float) -> bool:
        """Collect the router's bytes until it closes the socket (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.socket.settimeout(remaining)
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.received += data
        return False

    def decode(self) -> None:
        """Feed everything received to the proton transport: `connection` then shows what the router said."""
        data = bytes(self.received)
        while data:
            capacity = self.transport.capacity()
            if capacity <= 0:
                break
            self.transport.push(data[:capacity])
            data = data[capacity:]

    def close(self) -> None:
        self.socket.close()


# -- many connections -----------------------------------------------------------------------------------


class PollSelector(IO.Selector):
    """The selector of proton's Container, for a thousand sockets: poll() instead of select() (which fails
    past descriptor 1023), and the next deadline found once per wait rather than on every update (proton's
    way is quadratic in the number of connections). Install it with `IO.Selector = PollSelector` before
    creating the Container; `close_all()` closes the sockets a failed client left open."""

    instances: ClassVar[weakref.WeakSet[PollSelector]] = weakref.WeakSet()

    def __init__(self) -> None:
        super().__init__()
        PollSelector.instances.add(self)

    def update_deadline(self) -> None:
        """Nothing: `select` finds the next deadline."""

    def select(self, timeout: float | None) -> tuple[list[Any], list[Any], list[Any]]:
        now = time.time()
        waits = [selectable.deadline - now for selectable in self._selectables if selectable.deadline]
        if timeout is not None:
            waits.append(timeout)
        poller = select.poll()
        owners: dict[int, Any] = {}
        for selectable in self._reading | self._writing:
            fd = selectable.fileno()
            owners[fd] = selectable
            wanted = select.POLLIN if selectable in self._reading else 0
            poller.register(fd, wanted | (select.POLLOUT if selectable in self._writing else 0))
        events = poller.poll(max(0.0, min(waits)) * 1000 if waits else None)
        readable, writable = [], []
        broken = select.POLLERR | select.POLLHUP | select.POLLNVAL
        for fd, happened in events:
            selectable = owners[fd]
            if selectable in self._reading and happened & (select.POLLIN | broken):
                readable.append(selectable)
            if selectable in self._writing and happened & (select.POLLOUT | broken):
                writable.append(selectable)
        now = time.time()
        expired = [s for s in self._selectables if s.deadline and now > s.deadline]
        return readable, writable, expired

    @classmethod
    def close_all(cls) -> None:
        for selector in list(cls.instances):
            for selectable in list(selector._selectables):
                selectable.close()
