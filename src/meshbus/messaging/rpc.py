"""RPC: clients that call and cast, servers that dispatch requests to endpoint objects.

`AsyncRPCClient` and `AsyncRPCServer` run on an `AsyncTransport`'s loop; `RPCClient` and `RPCServer` are
their blocking faces on a `Transport`, the same objects underneath.

Dispatch rules (the oslo.messaging ones): an endpoint serves the namespace and version of its `target`
attribute (default: no namespace, version 1.0). A request goes to the first endpoint of its namespace whose
version is compatible (same major, minor at least the request's) and that has the method; methods whose
names start with `_` are never called. None of the namespace: `UnsupportedVersion`; no such method:
`NoSuchMethod`. An endpoint method is called as `method(ctxt, **args)`; coroutine functions are awaited on
the loop, plain functions run in the server's executor (a thread pool), never on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

from meshbus.amqp.client import IncomingMessage
from meshbus.messaging import exceptions, wire
from meshbus.messaging.exceptions import (
    ExpectedException,
    InvalidTarget,
    NoSuchMethod,
    UnsupportedVersion,
)
from meshbus.messaging.serializer import Serializer
from meshbus.messaging.target import Target
from meshbus.messaging.transport import (
    AsyncService,
    AsyncTransport,
    BlockingService,
    Subscription,
    Transport,
    _Cast,
    take,
)

log = logging.getLogger("meshbus.messaging.rpc")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TIMEOUT: Final = 60.0  # seconds a call waits for its reply, unless told otherwise
DEFAULT_VERSION: Final = "1.0"


def version_is_compatible(available: str, requested: str) -> bool:
    """Whether an endpoint at version `available` serves a request for `requested` (same major version,
    and at least the requested minor and revision)."""
    have = [int(part) for part in available.split(".")]
    want = [int(part) for part in requested.split(".")]
    if have[0] != want[0]:
        return False
    return have[1:] >= want[1:]


def expected_exceptions(*exceptions: type[BaseException]) -> Callable[[F], F]:
    """Declare exceptions an endpoint method raises as part of its API: the server returns them to the
    caller as usual, without logging a traceback."""

    def decorate(method: F) -> F:
        # A coroutine method raises when awaited, so its wrapper must be a coroutine function too (which
        # also keeps the server awaiting it on the loop instead of calling it in the executor).
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def awaiting(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(*args, **kwargs)
                except exceptions as error:
                    raise ExpectedException((type(error), error, error.__traceback__)) from error

            return awaiting  # type: ignore[return-value]

        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except exceptions as error:
                raise ExpectedException((type(error), error, error.__traceback__)) from error

        return wrapper  # type: ignore[return-value]

    return decorate


# -- clients -------------------------------------------------------------------------------------------------


class AsyncRPCClient:
    """Calls and casts to a target, on an `AsyncTransport`.

    - `call` waits for the reply and returns the result (or raises the remote exception, rebuilt as
      `<Type>_Remote` when its module is builtins or in `allowed_remote_modules`, else `RemoteError`).
    - `cast` returns once a server has taken the request (at least once: resent if it was given back) or,
      with `at_least_once=False`, once it is written (pre-settled, fire and forget).
    - A call or cast that nobody serves fails at once with `MessageUndeliverable`.
    - `call_monitor_timeout` (seconds): the server that took a call sends heartbeats while it works on it,
      and the call fails (`MessagingTimeout`) as soon as neither reply nor heartbeat came for that long,
      however long its `timeout`: a server that died mid-call is noticed early.
    - `retry` (None: no limit but the time-out) bounds the failed attempts a request lives through: a
      server's failure (it is sent again), a drop of the connection or a failed attempt to make one while
      it waits for one. With `retry=0`, a call or cast made while no router is reached fails at once with
      `MessageDeliveryFailure`, as in oslo.messaging.
    - `prepare(...)` gives a client with some of the target's fields, the time-out or the retry changed.
    """

    def __init__(
        self,
        transport: AsyncTransport,
        target: Target,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: int | None = None,
        version_cap: str | None = None,
        serializer: Serializer | None = None,
        at_least_once: bool = True,
        allowed_remote_modules: Iterable[str] = (),
        call_monitor_timeout: float | None = None,
    ) -> None:
        self.transport = transport
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.version_cap = version_cap
        self.serializer = serializer or Serializer()
        self.at_least_once = at_least_once
        self.call_monitor_timeout = call_monitor_timeout
        # The library's own errors (NoSuchMethod, UnsupportedVersion...) are always rebuilt at the caller.
        self.allowed_remote_modules = frozenset(allowed_remote_modules) | {exceptions.__name__}

    def prepare(
        self,
        *,
        exchange: str | None = None,
        topic: str | None = None,
        namespace: str | None = None,
        version: str | None = None,
        server: str | None = None,
        fanout: bool | None = None,
        timeout: float | None = None,
        retry: int | None = None,
        version_cap: str | None = None,
        at_least_once: bool | None = None,
        call_monitor_timeout: float | None = None,
    ) -> AsyncRPCClient:
        prepared = AsyncRPCClient.__new__(AsyncRPCClient)
        prepared.__dict__.update(self.__dict__)
        prepared.target = self.target.replace(
            exchange=exchange, topic=topic, namespace=namespace, version=version, server=server, fanout=fanout
        )
        for name, value in (
            ("timeout", timeout),
            ("retry", retry),
            ("version_cap", version_cap),
            ("at_least_once", at_least_once),
            ("call_monitor_timeout", call_monitor_timeout),
        ):
            if value is not None:
                setattr(prepared, name, value)
        return prepared

    def can_send_version(self, version: str | None = None) -> bool:
        """Whether `version` (default: the target's) is within the version cap."""
        wanted = version or self.target.version
        return self.version_cap is None or wanted is None or version_is_compatible(self.version_cap, wanted)

    async def call(self, ctxt: Any, method: str, **kwargs: Any) -> Any:
        return self._result(ctxt, await self._start_call(ctxt, method, kwargs))

    async def cast(self, ctxt: Any, method: str, **kwargs: Any) -> None:
        await self._start_cast(ctxt, method, kwargs)

    # Started on the loop by both faces; the blocking one reads the result in its caller's thread.
    def _start_call(self, ctxt: Any, method: str, kwargs: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        if self.target.fanout:
            raise InvalidTarget(f"a call cannot go to every server (fanout): cast it instead ({self.target})")
        return self.transport.start_call(
            self.transport.rpc_address(self.target),
            self._request(ctxt, method, kwargs),
            self._context(ctxt),
            timeout=self.timeout,
            retry=self.retry,
            call_monitor_timeout=self.call_monitor_timeout,
        )

    def _result(self, ctxt: Any, body: dict[str, Any]) -> Any:
        failure = body.get("failure")
        if failure is not None:
            raise wire.deserialize_exception(failure, self.allowed_remote_modules)
        return self.serializer.deserialize_entity(ctxt, body.get("response"))

    def _start_cast(self, ctxt: Any, method: str, kwargs: dict[str, Any]) -> _Cast:
        address = self.transport.rpc_address(self.target)
        request, context = self._request(ctxt, method, kwargs), self._context(ctxt)
        return self.transport._start_request_cast(
            address, request, context, self.at_least_once, self.timeout, self.retry
        )

    def _request(self, ctxt: Any, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.version_cap is not None and not self.can_send_version():
            raise UnsupportedVersion(self.target.version or DEFAULT_VERSION, method)
        request: dict[str, Any] = {
            "method": method,
            "args": {name: self.serializer.serialize_entity(ctxt, value) for name, value in kwargs.items()},
        }
        if self.target.namespace is not None:
            request["namespace"] = self.target.namespace
        if self.target.version is not None:
            request["version"] = self.target.version
        return request

    def _context(self, ctxt: Any) -> dict[str, Any]:
        return self.serializer.serialize_context(ctxt)


class RPCClient:
    """The blocking face of `AsyncRPCClient` (same arguments, same behaviour), safe from many threads."""

    def __init__(self, transport: Transport, target: Target, **options: Any) -> None:
        self.transport = transport
        self.aio = AsyncRPCClient(transport.aio, target, **options)

    @property
    def target(self) -> Target:
        return self.aio.target

    def prepare(self, **overrides: Any) -> RPCClient:
        prepared = RPCClient.__new__(RPCClient)
        prepared.transport = self.transport
        prepared.aio = self.aio.prepare(**overrides)
        return prepared

    def can_send_version(self, version: str | None = None) -> bool:
        return self.aio.can_send_version(version)

    def call(self, ctxt: Any, method: str, **kwargs: Any) -> Any:
        return self.aio._result(ctxt, self.transport.wait_for(self.aio._start_call, ctxt, method, kwargs))

    def cast(self, ctxt: Any, method: str, **kwargs: Any) -> None:
        self.transport.wait_for(self.aio._start_cast, ctxt, method, kwargs)


# -- dispatch -----------------------------------------------------------------------------------------------


class Dispatcher:
    """Finds the endpoint method a request names (see the module docstring for the rules)."""

    def __init__(self, endpoints: Iterable[object]) -> None:
        self.endpoints = [(getattr(endpoint, "target", None) or Target(), endpoint) for endpoint in endpoints]
        self._found: dict[tuple[Any, Any, Any], tuple[Callable[..., Any], bool]] = {}

    def find(self, request: dict[str, Any]) -> tuple[Callable[..., Any], bool]:
        """The method a request names, and whether it is a coroutine function."""
        key = (request.get("method"), request.get("namespace"), request.get("version"))
        found = self._found.get(key)
        if found is None:
            method = self._search(*key)
            found = self._found[key] = (method, inspect.iscoroutinefunction(method))
        return found

    def _search(self, method: Any, namespace: Any, version: Any) -> Callable[..., Any]:
        if not isinstance(method, str) or not method:
            raise NoSuchMethod(str(method))
        version = version or DEFAULT_VERSION
        served = False
        for target, endpoint in self.endpoints:
            if target.namespace != namespace:
                continue
            if not version_is_compatible(target.version or DEFAULT_VERSION, version):
                continue
            served = True
            found = getattr(endpoint, method, None)
            if not method.startswith("_") and callable(found):
                return found  # type: ignore[no-any-return]
        if served:
            raise NoSuchMethod(method)
        raise UnsupportedVersion(version, method)


class AsyncRPCServer(AsyncService):
    """Serves requests to `target` (topic and server name required) with `endpoints`, on an
    `AsyncTransport`. It listens on three addresses: its own (calls to this server), the topic's anycast
    (shared with the other servers of the topic) and the topic's fanout.

    A request is acknowledged (accepted) as soon as it arrives; at most `max_in_progress` run at once (the
    router holds the rest). `stop()` stops taking requests; `wait()` waits for those in progress. While a
    call whose caller asked for monitoring runs, its caller gets a heartbeat every half of the caller's
    `call_monitor_timeout`."""

    def __init__(
        self,
        transport: AsyncTransport,
        target: Target,
        endpoints: Iterable[object],
        *,
        serializer: Serializer | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_in_progress: int = 64,
    ) -> None:
        super().__init__(transport, executor)
        self.target = target
        self.dispatcher = Dispatcher(endpoints)
        self.serializer = serializer or Serializer()
        self.max_in_progress = max_in_progress
        self.addresses = transport.server_addresses(target)

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(address, self._on_request, self.max_in_progress) for address in self.addresses]

    def _on_request(self, message: IncomingMessage) -> None:
        incoming = take(message, "an RPC request")
        if incoming is None:
            return
        message.accept(hold_credit=True)
        heartbeats = self._heartbeats(incoming)
        try:
            method, is_coroutine = self.dispatcher.find(incoming.body)
        except (NoSuchMethod, UnsupportedVersion) as error:
            failure = wire.serialize_exception(error)
            self._finish(message, heartbeats, incoming.reply_route, self._reply(incoming, failure=failure))
            return
        if is_coroutine:
            self.run(self._handle_coroutine(incoming, message, heartbeats, method))
            return
        # A plain method runs in a worker with everything around it but the sending.
        self.run_in_worker(
            functools.partial(self._handle_plain, incoming, method),
            functools.partial(self._finish, message, heartbeats, incoming.reply_route),
        )

    def _handle_plain(self, incoming: wire.Incoming, method: Callable[..., Any]) -> bytes | None:
        """In a worker thread: the call, and the reply it makes (None for a cast)."""
        try:
            ctxt, args = self._arguments(incoming)
            result = self.serializer.serialize_entity(ctxt, method(ctxt, **args))
        except Exception as error:
            return self._reply(incoming, failure=self._failure(incoming, error))
        return self._reply(incoming, result=result)

    async def _handle_coroutine(
        self,
        incoming: wire.Incoming,
        message: IncomingMessage,
        heartbeats: asyncio.Task[None] | None,
        method: Callable[..., Any],
    ) -> None:
        try:
            ctxt, args = self._arguments(incoming)
            result = self.serializer.serialize_entity(ctxt, await method(ctxt, **args))
            reply = self._reply(incoming, result=result)
        except Exception as error:
            reply = self._reply(incoming, failure=self._failure(incoming, error))
        self._finish(message, heartbeats, incoming.reply_route, reply)

    def _arguments(self, incoming: wire.Incoming) -> tuple[Any, dict[str, Any]]:
        ctxt = self.serializer.deserialize_context(incoming.context)
        args = {
            name: self.serializer.deserialize_entity(ctxt, value)
            for name, value in (incoming.body.get("args") or {}).items()
        }
        return ctxt, args

    def _failure(self, incoming: wire.Incoming, error: Exception) -> str:
        if isinstance(error, ExpectedException):
            return wire.serialize_exception(error.exc_info[1])
        log.exception("%s: %s failed", self.target, incoming.body.get("method"))
        return wire.serialize_exception(error)

    @staticmethod
    def _reply(incoming: wire.Incoming, *, result: Any = None, failure: str | None = None) -> bytes | None:
        route = incoming.reply_route
        if route is None:
            return None  # a cast
        return wire.encode_reply(*route, result=result, failure=failure)

    def _finish(
        self,
        message: IncomingMessage,
        heartbeats: asyncio.Task[None] | None,
        route: tuple[str, wire.MessageId] | None,
        reply: bytes | None,
    ) -> None:
        """On the loop: send the reply, stop the heartbeats, give the credit back."""
        if reply is not None:
            self.transport.reply(reply, route=route)
        if heartbeats is not None:
            heartbeats.cancel()
        message.finished()

    def _heartbeats(self, incoming: wire.Incoming) -> asyncio.Task[None] | None:
        """For a monitored call, a task sending its caller a heartbeat every half of its monitor interval."""
        monitor, route = incoming.call_monitor_timeout, incoming.reply_route
        if monitor is None or route is None:
            return None
        heartbeat = wire.encode_heartbeat(*route, ttl=monitor)

        async def beat() -> None:
            while True:
                await asyncio.sleep(monitor / 2)
                self.transport.reply(heartbeat, at_least_once=False)

        return self.transport.loop.create_task(beat())


class RPCServer(BlockingService):
    """The blocking face of `AsyncRPCServer` (same arguments): endpoint methods run in a thread pool of
    `max_workers` threads (coroutine functions on the transport's loop)."""

    def __init__(
        self,
        transport: Transport,
        target: Target,
        endpoints: Iterable[object],
        *,
        max_workers: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(transport, max_workers, "meshbus-rpc")
        self.aio = AsyncRPCServer(transport.aio, target, endpoints, executor=self.executor, **options)
