"""The oslo.messaging driver: oslo's RPC clients and servers, notifiers and notification listeners on a
meshbus router, through meshbus.messaging's transport.

Rules of this module:
1. It translates and nothing more: oslo's targets to wire.py's addresses (the oslo AMQP 1.0 driver's layout,
   so services on that driver, on meshbus.messaging and on this one meet on the router), oslo's requests and
   replies to wire.py's bodies, meshbus errors to oslo's. Delivery (resends, matching replies to calls) is
   the Transport's.
2. One meshbus `Transport` per driver instance: one connection, one reply link, one I/O thread. oslo's threads
   call in through `Transport.run`; receivers run on the I/O thread and hand what arrives to oslo's polling
   thread through an `_Inbox`. Messages are settled (accepted, released) on the I/O thread only.
3. Credit bounds what a server or listener holds: each of its links has `prefetch` credit. An RPC request's
   credit comes back once it has been answered (it is accepted when oslo acknowledges it, as its work
   starts); a notification's once it is acknowledged or requeued (after its endpoints ran).
4. Call monitoring is meshbus.messaging's (the AMQP 1.0 driver's heartbeats): a call with
   `call_monitor_timeout` fails once its server has been silent that long; oslo's servers send heartbeats
   for such calls through `heartbeat()`. `transport_options` (RabbitMQ's) are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote, urlencode

import oslo_messaging
from oslo_config import cfg
from oslo_messaging._drivers import base, common
from oslo_serialization.jsonutils import to_primitive

from meshbus.amqp.client import ClientError, IncomingMessage, LinkRefused
from meshbus.messaging import green, wire
from meshbus.messaging.exceptions import (
    InvalidTarget,
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
)
from meshbus.messaging.target import Target
from meshbus.messaging.transport import (
    DEFAULT_PORT,
    AsyncService,
    AsyncTransport,
    Subscription,
    Transport,
    take,
)

log = logging.getLogger("meshbus.oslo")

GROUP: Final = "oslo_messaging_meshbus"
OPTIONS: Final = [
    cfg.IntOpt(
        "prefetch",
        default=64,
        min=1,
        help="Credit of each link of an RPC server or notification listener: how many requests it holds "
        "unanswered, or notifications unacknowledged, before the router keeps the next ones.",
    ),
    cfg.FloatOpt(
        "send_timeout",
        default=60.0,
        min=0.0,
        help="Seconds a cast or a notification may wait for a server or listener to take it.",
    ),
]
# Seconds a new server or listener waits for the router to confirm its subscriptions.
SUBSCRIBE_TIMEOUT: Final = 60.0


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The driver's options, for oslo-config-generator (`--namespace meshbus.oslo`): a service's sample
    configuration then documents them."""
    return [(GROUP, list(OPTIONS))]


class MeshbusDriver(base.BaseDriver):  # type: ignore[misc]  # oslo is untyped
    """The `meshbus://` transport driver (see the module docstring)."""

    def __init__(
        self,
        conf: Any,
        url: Any,
        default_exchange: str | None = None,
        allowed_remote_exmods: list[str] | None = None,
    ) -> None:
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        conf.register_opts(OPTIONS, group=GROUP)
        self.options = conf[GROUP]
        self._url = meshbus_url(url)
        self._default_exchange = default_exchange
        self._transport: Transport | None = self._open()
        self._opening = threading.Lock()
        self._forsaken: list[Transport] = []
        self.closed = False
        green.at_fork_in_child(self._forked)

    @property
    def transport(self) -> Transport:
        """The driver's connection. In a process forked since it was made (oslo.service forks its workers
        after the service made its transports), a new one, made on first use, as the AMQP 1.0 driver did:
        the parent's I/O thread did not come along, and its connection is the parent's."""
        transport = self._transport
        if transport is None:
            with self._opening:
                if self.closed:
                    raise MessagingError("the transport was cleaned up")
                transport = self._transport
                if transport is None:
                    transport = self._transport = self._open()
        return transport

    def _open(self) -> Transport:
        # Values JSON cannot hold are written as oslo's own drivers write them (jsonutils.dumps).
        return Transport(self._url, default_exchange=self._default_exchange, to_primitive=to_primitive)

    def _forked(self) -> None:
        """In the child of a fork: the parent's Transport is never used, closed or freed here (its loop
        still counts as running, in a thread that did not come along), and the lock starts free."""
        if self._transport is not None:
            self._forsaken.append(self._transport)
        self._transport = None
        self._opening = threading.Lock()

    def require_features(self, requeue: bool = False) -> None:
        """Requeue is supported (the message is released to the router)."""

    # -- sending ---------------------------------------------------------------------------------------

    def send(
        self,
        target: Any,
        ctxt: dict[str, Any],
        message: dict[str, Any],
        wait_for_reply: bool | None = None,
        timeout: float | None = None,
        call_monitor_timeout: float | None = None,
        retry: int | None = None,
        transport_options: Any = None,
    ) -> Any:
        """A call (the reply's result, or the remote exception raised) or a cast (once a server took it)."""
        destination = _target(target)
        with _OsloErrors(target):
            address = self.transport.aio.rpc_address(destination)
            if not wait_for_reply:
                try:
                    self.transport.cast(
                        address,
                        message,
                        ctxt,
                        at_least_once=True,
                        timeout=self.options.send_timeout,
                        retry=_retries(retry),
                    )
                except MessageUndeliverable:
                    # As on a broker, a fanout cast nobody listens to is dropped: callers expect no error.
                    if not destination.fanout:
                        raise
                    log.debug("fanout cast to %s: no server listens", address)
                return None
            body = self.transport.wait_for(
                functools.partial(
                    self.transport.aio.start_call,
                    address,
                    message,
                    ctxt,
                    timeout=self.options.send_timeout if timeout is None else timeout,
                    retry=_retries(retry),
                    call_monitor_timeout=call_monitor_timeout,
                )
            )
        failure = body.get("failure")
        if failure is not None:
            raise common.deserialize_remote_exception(failure, self._allowed_remote_exmods)
        return body.get("response")

    def send_notification(
        self, target: Any, ctxt: dict[str, Any], message: dict[str, Any], version: float, retry: int | None
    ) -> None:
        """Returns once the notification is on its way: the transport sends it in the background until a
        listener (or the store) takes it, and logs it if it never is (as oslo's notifier logs what drivers
        raise). It waits only while the transport's backlog is full."""
        topic, _, priority = (target.topic or "").rpartition(".")  # oslo sends to "<topic>.<priority>"
        with _OsloErrors(target):
            topic_target = Target(exchange=target.exchange, topic=topic)
            address = self.transport.aio.notify_address(topic_target, priority)
            self.transport.post(
                address,
                wire.encode_request(address, message, ctxt, envelope=version >= 2.0, default=to_primitive),
                at_least_once=True,
                timeout=self.options.send_timeout,
                retry=_retries(retry),
            )

    # -- listening -------------------------------------------------------------------------------------

    def listen(self, target: Any, batch_size: int, batch_timeout: float | None) -> Any:
        """An RPC server's listener: on the server's own address, its topic's and its topic's fanout."""
        with _OsloErrors(target):
            addresses = self.transport.aio.server_addresses(_target(target))
        listener = _Listener(
            self, addresses, _RpcIncoming, pool=None, credit=self.options.prefetch, target=target
        )
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    def listen_for_notifications(
        self,
        targets_and_priorities: Any,
        pool: str | None,
        batch_size: int | None,
        batch_timeout: float | None,
    ) -> Any:
        """A notification listener; in `pool`, it shares the notifications with the pool's other members."""
        addresses = []
        for target, priority in targets_and_priorities:
            with _OsloErrors(target):
                addresses.append(
                    self.transport.aio.notify_address(
                        Target(exchange=target.exchange, topic=target.topic), priority
                    )
                )
        # A batch must fit in one link's credit, or it could never fill.
        credit = max(self.options.prefetch, batch_size or 1)
        targets = list(dict.fromkeys(target for target, _ in targets_and_priorities))
        listener = _Listener(self, addresses, _NotificationIncoming, pool=pool, credit=credit, target=targets)
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    def cleanup(self) -> None:
        """Close the connection and stop the I/O thread."""
        with self._opening:
            if not self.closed:
                self.closed = True
                if self._transport is not None:
                    self._transport.close()


def meshbus_url(url: Any) -> str:
    """oslo's parsed TransportURL as meshbus.messaging's: its hosts, credentials, virtual host and query
    options."""
    netlocs = []
    for host in url.hosts:
        netloc = ""
        if host.username is not None or host.password is not None:
            netloc = f"{quote(host.username or '', safe='')}:{quote(host.password or '', safe='')}@"
        name = host.hostname or "127.0.0.1"
        netloc += f"[{name}]" if ":" in name else name
        netlocs.append(f"{netloc}:{host.port or DEFAULT_PORT}")
    query = f"?{urlencode(url.query)}" if url.query else ""
    return f"meshbus://{','.join(netlocs)}/{quote(url.virtual_host or '', safe='')}{query}"


def _target(target: Any) -> Target:
    return Target(
        exchange=target.exchange, topic=target.topic, server=target.server, fanout=bool(target.fanout)
    )


def _retries(retry: int | None) -> int | None:
    """oslo's retry (None or -1: no limit) as the Transport's (None: until the time-out)."""
    return None if retry is None or retry < 0 else retry


class _OsloErrors:
    """meshbus errors raised as the oslo exceptions services catch. A class: a @contextmanager's generator
    cost each send 2 us."""

    __slots__ = ("target",)

    def __init__(self, target: Any) -> None:
        self.target = target

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, MessagingTimeout):
            raise oslo_messaging.MessagingTimeout(str(error)) from error
        if isinstance(error, InvalidTarget):
            raise oslo_messaging.InvalidTarget(str(error), self.target) from error
        if isinstance(error, MessagingError | ClientError):
            # Nobody serves the address, the message was refused or its outcome is unknown (the connection
            # dropped): in each case the message says which.
            raise oslo_messaging.MessageDeliveryFailure(str(error)) from error


def _call_soon(transport: Transport, callback: Callable[..., None], *args: Any) -> None:
    """Run `callback` on the driver's I/O thread; oslo's settle and reply methods must not raise."""
    try:
        transport.call_soon_threadsafe(callback, *args)
    except MessagingError:
        log.warning("a message was settled or answered after its driver was cleaned up: nothing sent")


# -- listeners ---------------------------------------------------------------------------------------------


class _Inbox:
    """Messages handed from the I/O thread (`put`) to oslo's polling thread (`take`, one thread at a time),
    woken through a `Wakeup` (not a condition: see green.Wakeup). Under eventlet, the polling thread is a
    green one: it waits through its hub, and shares only a real lock with the I/O thread (see green.py)."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._wakeup = green.Wakeup()
        self._lock = green.shared_lock()  # an item is either put before `stop` or refused
        self.stopped = False

    def put(self, item: Any) -> bool:
        """False once stopped: the caller gives the message back."""
        with self._lock:
            if self.stopped:
                return False
            self._items.append(item)
        self._wakeup.wake()
        return True

    def take(self, timeout: float | None, batch_size: int, batch_timeout: float | None) -> list[Any]:
        """Up to `batch_size` items, waiting `timeout` for the first and `batch_timeout` (None: as long as
        it takes) for the batch to fill; what there is at once when stopped."""
        items = self._items
        if not self._wait_until(lambda: bool(items), timeout) or not items:
            return []
        if batch_size > 1:
            self._wait_until(lambda: len(items) >= batch_size, batch_timeout)
        return [items.popleft() for _ in range(min(batch_size, len(items)))]

    def _wait_until(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Until `ready()` or stopped (True), or `timeout` seconds have passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (ready() or self.stopped):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._wakeup.wait(remaining)
        return True

    def stop(self) -> list[Any]:
        """Stop taking items (`take` returns at once); the items left."""
        with self._lock:
            self.stopped = True
            left = list(self._items)
        self._wakeup.wake()
        return left


class _Listener(base.PollStyleListener):  # type: ignore[misc]  # oslo is untyped
    """A server's or listener's subscriptions, polled by oslo (through its PollStyleListenerAdapter)."""

    def __init__(
        self,
        driver: MeshbusDriver,
        addresses: list[str],
        incoming: Callable[[_Listener, wire.Incoming, IncomingMessage], Any],
        *,
        pool: str | None,
        credit: int,
        target: Any,
    ) -> None:
        super().__init__()
        self.driver = driver
        self._incoming = incoming
        self._inbox = _Inbox()
        self._poller_set = False  # whether oslo's polling thread was made one that waits its turn
        self._subscriptions = _Subscriptions(
            driver.transport.aio,
            [Subscription(address, self._on_message, credit, pool) for address in addresses],
        )
        # ServerListenError is raised here, not left to oslo: 18.x's servers would make one of a
        # TransportDriverError but read a `target` attribute they lack, and raise AttributeError instead.
        try:
            driver.transport.run(asyncio.wait_for(self._subscriptions.start(), SUBSCRIBE_TIMEOUT))
        except LinkRefused as error:
            raise oslo_messaging.ServerListenError(target, error) from error
        except TimeoutError:
            connection = driver.transport.aio.connection
            raise oslo_messaging.ServerListenError(
                target,
                f"the router did not confirm the subscriptions to {', '.join(addresses)} within "
                f"{SUBSCRIBE_TIMEOUT} s ({connection.last_error or 'no answer'}): is a router running at "
                f"{', '.join(map(str, connection.hosts))}?",
            ) from None

    def _on_message(self, message: IncomingMessage) -> None:
        """On the I/O thread: decode, hand over to oslo's polling thread."""
        decoded = take(message, "an oslo.messaging request or notification")
        if decoded is None:
            return
        if not self._inbox.put(self._incoming(self, decoded, message)):
            message.release()  # stopped: another server or listener may take it

    def poll(
        self, timeout: float | None = None, batch_size: int | None = 1, batch_timeout: float | None = None
    ) -> list[Any]:
        if not self._poller_set:
            self._poller_set = True
            # oslo made this thread for this listener alone, to hand what it polls to oslo's executor: as the
            # library's own threads, it waits for its turn when woken (4.1 -> 1.25 context switches per call
            # in a server). Not under eventlet: there it is a green thread of the service's own OS thread.
            if not green.active():
                green.yield_on_wakeup()
        return self._inbox.take(timeout, batch_size or 1, batch_timeout)

    def stop(self) -> None:
        self._inbox.stop()
        # The links' credit is drained, as meshbus.messaging's servers do: the router offers this server
        # nothing more, instead of each message being released and sent again. What is in work is still
        # settled until `cleanup`. (A driver cleaned up meanwhile has no links left to drain.)
        with contextlib.suppress(MessagingError):
            self.driver.transport.run(self._subscriptions.stop())

    def cleanup(self) -> None:
        """Give back what was never polled and close the subscriptions (oslo calls this once the server's
        work is done, so nothing polled is still unsettled)."""
        left = self._inbox.stop()
        if self.driver.closed:
            return

        async def close() -> None:
            for item in left:
                item.raw.release()
            await self._subscriptions.stop()
            await self._subscriptions.wait()

        self.driver.transport.run(close())


class _Subscriptions(AsyncService):
    """A server's or listener's receivers (all attached, or none), with the library's life cycle."""

    def __init__(self, transport: AsyncTransport, subscriptions: list[Subscription]) -> None:
        super().__init__(transport, executor=None)
        self._subscriptions = subscriptions

    def subscriptions(self) -> list[Subscription]:
        return self._subscriptions


class _NotificationIncoming(base.IncomingMessage):  # type: ignore[misc]  # oslo is untyped
    """A notification: acknowledged (accepted) once its endpoints ran, or requeued (released)."""

    def __init__(self, listener: _Listener, decoded: wire.Incoming, message: IncomingMessage) -> None:
        super().__init__(decoded.context, decoded.body)
        self.transport = listener.driver.transport
        self.raw = message  # (`self.message` is oslo's: the decoded body)
        self._settled = False

    def acknowledge(self) -> None:
        self._settle(self.raw.accept)

    def requeue(self) -> None:
        self._settle(self.raw.release)

    def _settle(self, how: Callable[[], None]) -> None:
        if not self._settled:
            self._settled = True
            _call_soon(self.transport, how)


class _RpcIncoming(base.RpcIncomingMessage):  # type: ignore[misc]  # oslo is untyped
    """An RPC request: accepted when acknowledged, its credit held until it is answered."""

    def __init__(self, listener: _Listener, decoded: wire.Incoming, message: IncomingMessage) -> None:
        super().__init__(decoded.context, decoded.body, decoded.message_id)
        self.client_timeout = decoded.call_monitor_timeout  # oslo's server then calls heartbeat()
        self.transport = listener.driver.transport
        self.raw = message  # (`self.message` is oslo's: the decoded body)
        self._route = decoded.reply_route  # None: a cast, which has no one to answer
        self._acknowledged = self._answered = False

    def acknowledge(self) -> None:
        if not self._acknowledged:
            self._acknowledged = True
            _call_soon(self.transport, functools.partial(self.raw.accept, hold_credit=True))

    def requeue(self) -> None:
        if not self._acknowledged:
            self._acknowledged = self._answered = True
            _call_soon(self.transport, self.raw.release)

    def heartbeat(self) -> None:
        """Tell a caller that monitors its call that the server still works on it."""
        if self._route is not None and self.client_timeout and not self._answered:
            heartbeat = wire.encode_heartbeat(*self._route, ttl=self.client_timeout)
            _call_soon(self.transport, self.transport.aio.reply, heartbeat)

    def reply(self, reply: Any = None, failure: Any = None) -> None:
        if self._answered:
            return
        self.acknowledge()
        self._answered = True
        payload = None
        if self._route is not None:
            if failure is not None:
                if isinstance(failure, BaseException):
                    failure = (type(failure), failure, failure.__traceback__)
                serialized = common.serialize_remote_exception(failure)
                payload = wire.encode_reply(*self._route, failure=serialized)
            else:
                payload = wire.encode_reply(*self._route, result=reply, default=to_primitive)
        _call_soon(self.transport, self._replied, payload)

    def _replied(self, payload: bytes | None) -> None:
        """On the I/O thread: send the reply, give the request's credit back."""
        if payload is not None:
            self.transport.aio.reply(payload, route=self._route)
        self.raw.finished()
