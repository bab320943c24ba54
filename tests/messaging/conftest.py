"""Fixtures for the meshbus.messaging tests, which run against real router processes.

1. `api` runs a test twice: with the blocking classes (`Transport`, `RPCClient`, `RPCServer`, `Notifier`,
   `NotificationListener`) and with their asyncio twins on a loop the fixture runs in a thread of its own.
   Either way the test calls them as plain functions: `OnLoop` runs an asyncio object's coroutines on that
   loop and waits for them. `blocking` and `aio` are the two faces alone, for tests of one of them.
2. Whatever a test opens through a face (transports, started servers and listeners) is stopped and closed
   when the test ends: servers and listeners first, then their transports.
3. `topic` is a topic of the test's own: tests sharing the router never see each other's messages.
4. `Inbox` collects what endpoints receive, from whatever thread; a test waits for it with a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import pytest

from meshbus.messaging import (
    AsyncNotificationListener,
    AsyncNotifier,
    AsyncRPCClient,
    AsyncRPCServer,
    AsyncTransport,
    NotificationListener,
    Notifier,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from tests.conftest import Router

T = TypeVar("T")

WAIT = 10.0  # seconds a test waits for something that should happen at once
RUN_TIMEOUT = 60.0  # seconds a coroutine run for a test may take


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self) -> None: ...


class Api:
    """Opens the library's objects in one face for a test, and closes them all when it ends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._services: list[Service] = []
        self._transports: list[Any] = []

    def transport(self, url: str | None = None) -> Any:
        """A transport to `url` (default: the shared router); has `.aio` (the AsyncTransport) and `.run`."""
        raise NotImplementedError

    def client(self, transport: Any, target: Target, **options: Any) -> Any:
        raise NotImplementedError

    def notifier(self, transport: Any, publisher_id: str | None = None, **options: Any) -> Any:
        raise NotImplementedError

    def server(self, transport: Any, target: Target, endpoints: Iterable[object], **options: Any) -> Any:
        """An RPC server, started: `start()` raising (a refused link) raises here."""
        raise NotImplementedError

    def listener(
        self, transport: Any, targets: Iterable[Target], endpoints: Iterable[object], **options: Any
    ) -> Any:
        """A notification listener, started."""
        raise NotImplementedError

    def _opened(self, transport: T) -> T:
        self._transports.append(transport)
        return transport

    def _start(self, service: Service) -> None:
        self._services.append(service)
        service.start()

    def close(self) -> None:
        try:
            for service in self._services:
                service.stop()
            for service in self._services:
                service.wait()
        finally:
            for transport in self._transports:
                transport.close()


class BlockingApi(Api):
    """The blocking classes, each transport with its I/O thread."""

    def transport(self, url: str | None = None) -> Transport:
        return self._opened(Transport(url or self.url))

    def client(self, transport: Transport, target: Target, **options: Any) -> RPCClient:
        return RPCClient(transport, target, **options)

    def notifier(self, transport: Transport, publisher_id: str | None = None, **options: Any) -> Notifier:
        return Notifier(transport, publisher_id, **options)

    def server(
        self, transport: Transport, target: Target, endpoints: Iterable[object], **options: Any
    ) -> RPCServer:
        server = RPCServer(transport, target, endpoints, **options)
        self._start(server)
        return server

    def listener(
        self, transport: Transport, targets: Iterable[Target], endpoints: Iterable[object], **options: Any
    ) -> NotificationListener:
        listener = NotificationListener(transport, targets, endpoints, **options)
        self._start(listener)
        return listener


class OnLoop:
    """An asyncio object of the library, called from the test's thread: its coroutines run on the face's
    loop and are waited for; the clients and notifiers its methods return (`prepare`) are wrapped too."""

    def __init__(self, aio: Any, face: AsyncioApi) -> None:
        self.aio = aio
        self._face = face

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._face.run(coroutine)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.aio, name)
        if not callable(attribute):
            return attribute

        def blocking(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if inspect.iscoroutine(result):
                return self._face.run(result)
            if isinstance(result, AsyncRPCClient | AsyncNotifier):
                return OnLoop(result, self._face)
            return result

        return blocking


class AsyncioApi(Api):
    """The asyncio classes on a plain asyncio loop (the blocking ones run uvloop) in the face's thread."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-asyncio", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the face's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(RUN_TIMEOUT)

    def transport(self, url: str | None = None) -> OnLoop:
        async def connect() -> AsyncTransport:
            return AsyncTransport(url or self.url)

        return self._opened(OnLoop(self.run(connect()), self))

    def client(self, transport: OnLoop, target: Target, **options: Any) -> OnLoop:
        return OnLoop(AsyncRPCClient(transport.aio, target, **options), self)

    def notifier(self, transport: OnLoop, publisher_id: str | None = None, **options: Any) -> OnLoop:
        return OnLoop(AsyncNotifier(transport.aio, publisher_id, **options), self)

    def server(
        self, transport: OnLoop, target: Target, endpoints: Iterable[object], **options: Any
    ) -> OnLoop:
        server = OnLoop(AsyncRPCServer(transport.aio, target, endpoints, **options), self)
        self._start(server)
        return server

    def listener(
        self, transport: OnLoop, targets: Iterable[Target], endpoints: Iterable[object], **options: Any
    ) -> OnLoop:
        listener = OnLoop(AsyncNotificationListener(transport.aio, targets, endpoints, **options), self)
        self._start(listener)
        return listener

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT)
            self.loop.close()


def url_of(router: Router) -> str:
    return f"meshbus://{router.host}:{router.port}/"


@pytest.fixture
def blocking(default_router: Router) -> Iterator[BlockingApi]:
    face = BlockingApi(url_of(default_router))
    yield face
    face.close()


@pytest.fixture
def aio(default_router: Router) -> Iterator[AsyncioApi]:
    face = AsyncioApi(url_of(default_router))
    yield face
    face.close()


@pytest.fixture(params=["blocking", "asyncio"])
def api(request: pytest.FixtureRequest) -> Api:
    """Each face in turn (see the module docstring)."""
    face: Api = request.getfixturevalue("aio" if request.param == "asyncio" else "blocking")
    return face


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', request.node.name).strip('-')}-{uuid.uuid4().hex[:8]}"


class Inbox:
    """What endpoints received, from any thread."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._changed = threading.Condition()

    def put(self, item: Any) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    @property
    def items(self) -> list[Any]:
        with self._changed:
            return list(self._items)

    def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """The items, once there are at least `count` of them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._items) >= count, timeout):
                raise AssertionError(f"{count} items expected within {timeout} s, got {self._items}")
            return list(self._items)
