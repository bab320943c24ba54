"""Time-outs for many waits at once: the calls and casts a transport has in flight.

Rules of this module:
1. A wait is filed under its deadline rounded up to the next `GRANULE`; one loop timer per granule that
   holds any wait gives up all of them together. A wait is never given up early, and at most `GRANULE` late.
2. It knows nothing of what a wait is: an `Expiring` is told `expired()` once, unless it was discarded first,
   or `closed()` when the transport closes with it still filed.
3. No timer per wait: a uvloop timer made and cancelled costs a cast about 1 us, and a thousand casts in
   flight would be a thousand timers; here filing and discarding a wait cost 0.2 us.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, Protocol

# Seconds: a time-out fires at most this late.
GRANULE: Final = 0.05
# The granule of a wait that never expires: filed with no timer.
NEVER: Final = -1


class Expiring(Protocol):
    def expired(self) -> None: ...

    def closed(self) -> None: ...


class Deadlines:
    """The waits of one loop that have deadlines."""

    __slots__ = ("_granules", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._granules: dict[int, dict[Expiring, None]] = {}

    def add(self, wait: Expiring, timeout: float) -> int:
        """File `wait` to expire `timeout` seconds from now (an infinite time-out: never); the granule to
        discard it from."""
        granule = NEVER if timeout == math.inf else math.ceil((self.loop.time() + timeout) / GRANULE)
        waits = self._granules.get(granule)
        if waits is None:
            waits = self._granules[granule] = {}
            if granule != NEVER:
                self.loop.call_at(granule * GRANULE, self._expire, granule)
        waits[wait] = None
        return granule

    def discard(self, wait: Expiring, granule: int) -> None:
        """`wait` ended before its deadline: it will not be told."""
        waits = self._granules.get(granule)
        if waits is not None:
            waits.pop(wait, None)

    def close(self) -> None:
        """Tell every wait still filed `closed()`: nothing else will end it now."""
        granules, self._granules = self._granules, {}
        for waits in granules.values():
            for wait in waits:
                wait.closed()

    def _expire(self, granule: int) -> None:
        for wait in self._granules.pop(granule, {}):
            wait.expired()
