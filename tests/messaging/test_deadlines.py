"""Deadlines on a clock driven by hand: when waits expire, that discarded ones never do, and that closing
tells every wait left."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, cast

import pytest

from meshbus.messaging.deadlines import GRANULE, Deadlines


class Clock:
    """What `Deadlines` asks of a loop (`time`, `call_at`), driven by `advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> None:
        self.timers.append((when, callback, args))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((timer for timer in self.timers if timer[0] <= self.now), key=lambda timer: timer[0])
        self.timers = [timer for timer in self.timers if timer[0] > self.now]
        for _, callback, args in due:
            callback(*args)


class Wait:
    def __init__(self, expired: list[Wait]) -> None:
        self._expired = expired
        self.told_closed = False

    def expired(self) -> None:
        self._expired.append(self)

    def closed(self) -> None:
        self.told_closed = True


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def deadlines(clock: Clock) -> Deadlines:
    return Deadlines(cast(asyncio.AbstractEventLoop, clock))


def test_a_wait_expires_once_at_most_a_granule_late(clock: Clock, deadlines: Deadlines) -> None:
    expired: list[Wait] = []
    wait = Wait(expired)
    deadlines.add(wait, 0.12)
    clock.advance(0.12 - 1e-6)
    assert expired == []
    clock.advance(GRANULE)
    assert expired == [wait]
    clock.advance(10.0)
    assert expired == [wait]


def test_waits_of_one_granule_share_one_timer(clock: Clock, deadlines: Deadlines) -> None:
    expired: list[Wait] = []
    waits = [Wait(expired) for _ in range(3)]
    for offset, wait in enumerate(waits):
        deadlines.add(wait, 1.01 + offset * GRANULE / 5)  # 1001.01 to 1001.03: one granule
    assert len(clock.timers) == 1
    clock.advance(1.03 + GRANULE)
    assert expired == waits


def test_a_discarded_wait_is_never_told(clock: Clock, deadlines: Deadlines) -> None:
    expired: list[Wait] = []
    kept, discarded = Wait(expired), Wait(expired)
    deadlines.add(kept, 1.0)
    deadlines.discard(discarded, deadlines.add(discarded, 1.0))
    deadlines.discard(discarded, 12345)  # twice, or under a granule that already expired: nothing happens
    clock.advance(2.0)
    assert expired == [kept]


def test_later_waits_expire_later(clock: Clock, deadlines: Deadlines) -> None:
    expired: list[Wait] = []
    late, soon = Wait(expired), Wait(expired)
    deadlines.add(late, 5.0)
    deadlines.add(soon, 1.0)
    clock.advance(2.0)
    assert expired == [soon]
    clock.advance(4.0)
    assert expired == [soon, late]


def test_an_infinite_time_out_never_expires(clock: Clock, deadlines: Deadlines) -> None:
    expired: list[Wait] = []
    wait = Wait(expired)
    deadlines.discard(wait, deadlines.add(wait, math.inf))  # discarding it changes nothing either
    deadlines.add(wait, math.inf)
    assert clock.timers == []
    clock.advance(1e9)
    assert expired == []


def test_closing_tells_every_wait_left_infinite_ones_too_and_none_expires_after(
    clock: Clock, deadlines: Deadlines
) -> None:
    expired: list[Wait] = []
    soon, never, discarded = Wait(expired), Wait(expired), Wait(expired)
    deadlines.add(soon, 1.0)
    deadlines.add(never, math.inf)
    deadlines.discard(discarded, deadlines.add(discarded, 1.0))
    deadlines.close()
    assert (soon.told_closed, never.told_closed, discarded.told_closed) == (True, True, False)
    clock.advance(2.0)
    assert expired == []
