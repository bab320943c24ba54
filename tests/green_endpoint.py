"""The RPC and notification endpoint of the eventlet peers (tests/messaging/eventlet_peer.py, the
library's; tests/oslo/eventlet_peer.py, the plugin's), imported once eventlet has patched their process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import eventlet
from eventlet import patcher

CALLERS = 20  # green threads calling at once
WAIT = 15.0  # seconds anything in a peer may take; the test's subprocess time-out is longer

real_threading = patcher.original("threading")
MAIN_THREAD = real_threading.get_ident()


class Endpoint:
    def __init__(self) -> None:
        self.arrived = 0
        self.everyone_in = eventlet.event.Event()  # a green primitive shared by the endpoint's calls
        self.os_threads: set[int] = set()
        self.casts: list[int] = []
        self.notified: list[tuple[str, int]] = []
        self.slow_started = 0

    def gather(self, ctxt: dict[str, Any], number: int) -> int:
        """Returns only once CALLERS calls are in progress at once: green threads serve them concurrently."""
        self.os_threads.add(real_threading.get_ident())
        self.arrived += 1
        if self.arrived == CALLERS:
            self.everyone_in.send(True)
        with eventlet.Timeout(WAIT):
            self.everyone_in.wait()
        return number * 2

    def slow(self, ctxt: dict[str, Any], seconds: float) -> str:
        self.slow_started += 1
        eventlet.sleep(seconds)
        return "slept"

    def note(self, ctxt: dict[str, Any], number: int) -> None:
        self.casts.append(number)

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: int, metadata: Any) -> None:
        self.notified.append((event_type, payload))

    def on_main_thread(self) -> list[bool]:
        """For each OS thread an endpoint method ran on, whether it was the main one."""
        return [thread == MAIN_THREAD for thread in self.os_threads]


def wait_until(ready: Any) -> None:
    with eventlet.Timeout(WAIT):
        while not ready():
            eventlet.sleep(0.01)


class Ticker:
    """A green thread that counts while the hub runs: a call that blocked the hub would stop it."""

    def __init__(self) -> None:
        self.ticks = 0
        eventlet.spawn_n(self._run)

    def _run(self) -> None:
        while True:
            self.ticks += 1
            eventlet.sleep(0.01)


def gather_all(call: Callable[[int], int]) -> list[int]:
    """`call(number)` (of `Endpoint.gather`) from CALLERS green threads at once; the answers, sorted."""
    return sorted(eventlet.GreenPool(CALLERS).imap(call, range(CALLERS)))
