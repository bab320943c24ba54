"""kill -9 of the router holding the store, in a loop, in the middle of a line of routers A - B - C: only B
stores the queue; producers on A and a consumer on C work throughout while B is killed and started again on
its store 20 times. Every message A accepted reaches C at least once, whatever round it was sent in.

B connects to A and to C (not they to it), so a B started again finds them at the ports they kept."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshbus.amqp.client import ClientConnection, Host, IncomingMessage
from tests.conftest import Config, Router
from tests.mesh_routers.conftest import INTER_ROUTER_LISTENER, TIMERS, WAIT, reachable
from tests.store.crash_clients import ADDRESS, Tally, drain, produce

ROUNDS = 20
PRODUCERS = 2
UP = (0.2, 0.6)  # seconds B lives on in a round once messages flow through it again


def start(router: Callable[[Config], Router], router_id: str, store: Path | None, to: list[Router]) -> Router:
    """Router `router_id`, its store in file `store` (None: it stores nothing), connected to `to`."""
    config: dict[str, Any] = {
        "router": {"id": router_id},
        "mesh": TIMERS,
        "listener": [{}, {"role": "inter-router"}],
        "store": {"enabled": False} if store is None else {"path": str(store)},
        "connector": [],
    }
    for other in to:
        found = other.wait_for_log(INTER_ROUTER_LISTENER, WAIT)
        assert found is not None, f"no inter-router listener:\n{other.log()}"
        host, port = found.group(1), int(found.group(2))
        config["connector"].append({"host": host, "port": port, "role": "inter-router"})
    return router(config)


def see_b(a: Router, c: Router, since: tuple[int, int]) -> None:
    """Wait until A and C have logged B reachable since their marks `since`."""
    for one, mark in zip((a, c), since, strict=True):
        assert one.wait_for_log(reachable("B"), WAIT, mark), f"B not reachable again:\n{one.log(mark)}"


class Consumer:
    """The consumer's handler: it accepts what it receives or, while `holding`, keeps it unsettled until
    `settle_held()`, so that B is killed with a backlog in its store and deliveries out to C."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.arrived = asyncio.Event()
        self.holding = False
        self._held: list[IncomingMessage] = []

    def __call__(self, message: IncomingMessage) -> None:
        self.tally.record(message)
        if self.holding:
            self._held.append(message)
        else:
            message.accept()
        self.arrived.set()

    def settle_held(self) -> None:
        self.holding = False
        for message in self._held:
            message.accept()
        self._held.clear()


class Rounds:
    """What each round saw, for the failure messages: the producers' send counts at the kill, and the
    tally's counts."""

    def __init__(self) -> None:
        self.sent: list[dict[str, int]] = []
        self.counts: list[str] = []

    def end(self, tally: Tally) -> None:
        self.sent.append(dict(tally.sent))
        self.counts.append(
            f"round {len(self.counts)}: {len(tally.accepted)} accepted, {len(tally.received)} received "
            f"({tally.deliveries} deliveries)"
        )

    def of(self, body: str) -> int:
        """The round in which message `body` ({label}-{n}) was sent (ROUNDS: after the last kill)."""
        label, n = body.rsplit("-", 1)
        return next((r for r, sent in enumerate(self.sent) if sent.get(label, 0) > int(n)), len(self.sent))

    def report(self) -> str:
        return "\n".join(self.counts)


async def flowing(tally: Tally, round_: int, rounds: Rounds) -> None:
    """Wait until B has accepted a message from A and C has received one since this call."""
    accepted, deliveries = len(tally.accepted), tally.deliveries
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while len(tally.accepted) == accepted or tally.deliveries == deliveries:
        assert loop.time() < deadline, (
            f"round {round_}: nothing flowed through B within {WAIT} s of A and C seeing it again "
            f"({len(tally.accepted) - accepted} accepted, {tally.deliveries - deliveries} received)\n"
            + rounds.report()
        )
        await asyncio.sleep(0.05)


async def crash_loop(
    start_b: Callable[[], Router], a: Router, c: Router, tally: Tally, rounds: Rounds, rng: random.Random
) -> None:
    consumer, connection = Consumer(tally), ClientConnection([Host(c.host, c.port)])
    await connection.receive(ADDRESS, consumer, credit=100).ready()
    producers = [asyncio.create_task(produce(a, f"p{p}", tally)) for p in range(PRODUCERS)]
    try:
        for round_ in range(ROUNDS):
            marks = a.mark(), c.mark()
            b = await asyncio.to_thread(start_b)
            await asyncio.to_thread(see_b, a, c, marks)
            await flowing(tally, round_, rounds)
            consumer.holding = rng.random() < 0.5
            await asyncio.sleep(rng.uniform(*UP))
            b.kill()
            consumer.settle_held()  # after the kill: the store does not learn of these settlements
            rounds.end(tally)
    finally:
        for task in producers:
            task.cancel()
        for task in producers:
            with contextlib.suppress(BaseException):
                await task
    marks = a.mark(), c.mark()
    await asyncio.to_thread(start_b)
    await asyncio.to_thread(see_b, a, c, marks)
    await drain(tally, consumer.arrived)
    await connection.close()


def test_every_accepted_message_survives_kill_9_of_the_store_holding_router_in_a_mesh(
    router: Callable[[Config], Router], tmp_path: Path
) -> None:
    a = start(router, "A", None, [])
    c = start(router, "C", None, [])
    tally, rounds = Tally(), Rounds()
    asyncio.run(
        crash_loop(
            lambda: start(router, "B", tmp_path / "B.db", [a, c]), a, c, tally, rounds, random.Random(6)
        )
    )
    lost = tally.accepted - tally.received
    accepted = len(tally.accepted)
    by_round = sorted({rounds.of(body) for body in lost})
    assert accepted > ROUNDS * 100, f"too little traffic to mean anything: {accepted} accepted"
    assert not lost, (
        f"{len(lost)} of {accepted} accepted messages were lost, sent in rounds {by_round}, e.g. "
        f"{sorted(lost)[:5]}\n{rounds.report()}"
    )
