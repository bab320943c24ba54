"""Balanced, closest and multicast addresses across four routers in a square A - B - C - D - A, with exact
counts, and outcomes back across the mesh: a producer on A, consumers on the other routers (and on A for
multicast). Clients are the library's `ClientConnection`s, all on one asyncio loop in the test's thread."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
from proton import Message

from meshbus.amqp.client import ACCEPTED, MODIFIED, REJECTED, ClientConnection, Host, IncomingMessage, Outcome
from tests.conftest import Router
from tests.mesh_routers.conftest import WAIT, Mesh

MESSAGES = 60
END = "end"  # multicast: sent after the counted messages, so a consumer that has it has all of them


@pytest.fixture
def square(mesh: Mesh) -> Mesh:
    """Links A-B, B-C, C-D, D-A, cost 1 each: B and D are one hop from A, C two (by B or by D)."""
    mesh.start("A")
    mesh.start("C")
    mesh.start("B", to={"A": 1, "C": 1})
    mesh.start("D", to={"A": 1, "C": 1})
    mesh.converged()
    return mesh


def encode(address: str, body: str) -> bytes:
    # `to` is needed when the client sends on its anonymous-relay link.
    encoded: bytes = Message(address=address, body=body).encode()
    return encoded


def body_of(message: IncomingMessage) -> str:
    decoded = Message()
    decoded.decode(message.payload)
    body = decoded.body
    assert isinstance(body, str), f"a test message with a {type(body).__name__} body"
    return body


def connect(router: Router) -> ClientConnection:
    return ClientConnection([Host(router.host, router.port)])


class Consumer:
    """A connection to one router receiving from `address`; with `hold`, it settles nothing until told."""

    def __init__(self, router: Router, address: str, *, hold: bool = False) -> None:
        self.connection = connect(router)
        self.bodies: list[str] = []
        self.held: list[IncomingMessage] = []
        self.hold = hold
        self.receiver = self.connection.receive(address, self._take, credit=MESSAGES * 2)
        # Attached after `address` (see `ready`): once a producer elsewhere reaches this one, the mesh
        # has told its router about `address` too, the updates of one router arriving in order.
        self.probe = f"probe/{uuid.uuid4().hex}"

    async def ready(self) -> None:
        await self.receiver.ready()
        probe = self.connection.receive(self.probe, lambda message: message.accept())
        await probe.ready()

    def _take(self, message: IncomingMessage) -> None:
        self.bodies.append(body_of(message))
        if self.hold:
            self.held.append(message)
        else:
            message.accept()

    async def received(self, body: str, what: str) -> None:
        await eventually(lambda: body in self.bodies, lambda: what)

    def accept_held(self) -> None:
        held, self.held = self.held, []
        for message in held:
            message.accept()


async def reaches(producer: ClientConnection, consumers: Iterable[Consumer]) -> None:
    """Send to each consumer's probe address until it is accepted: the producer's router then knows the
    consumers' routers have the address under test (addresses are released while unknown)."""
    deadline = time.monotonic() + WAIT
    for consumer in consumers:
        while (await producer.send(consumer.probe, encode(consumer.probe, "probe"))).state != ACCEPTED:
            assert time.monotonic() < deadline, f"{consumer.probe} still unknown to the producer's router"
            await asyncio.sleep(0.05)


async def eventually(condition: Callable[[], bool], what: Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what()}"
        await asyncio.sleep(0.01)


async def close(connections: Iterable[ClientConnection]) -> None:
    await asyncio.gather(*(connection.close() for connection in connections))


def test_balanced_spreads_over_consumers_on_three_routers_each_message_once(square: Mesh) -> None:
    async def scenario() -> None:
        address = f"mesh/balanced/{uuid.uuid4().hex}"
        # Consumers hold what they get until every message arrived, so their unsettled counts grow and
        # balancing must use every router; then all are accepted.
        consumers = {router_id: Consumer(square[router_id], address, hold=True) for router_id in "BCD"}
        producer = connect(square["A"])
        try:
            await asyncio.gather(*(consumer.ready() for consumer in consumers.values()))
            await reaches(producer, consumers.values())
            bodies = [f"balanced-{n}" for n in range(MESSAGES)]
            sends = [producer.send(address, encode(address, body)) for body in bodies]

            def shares() -> dict[str, int]:
                return {router_id: len(consumer.bodies) for router_id, consumer in consumers.items()}

            await eventually(
                lambda: sum(shares().values()) >= MESSAGES, lambda: f"{MESSAGES} messages in all: {shares()}"
            )
            for consumer in consumers.values():
                consumer.accept_held()
            outcomes = await asyncio.gather(*sends)
            received = Counter(body for consumer in consumers.values() for body in consumer.bodies)
            assert received == Counter(bodies), f"each message exactly once (shares {shares()})"
            assert [outcome.state for outcome in outcomes] == [ACCEPTED] * MESSAGES
            assert all(shares().values()), f"every router's consumer had a share: {shares()}"
        finally:
            await close([producer, *(consumer.connection for consumer in consumers.values())])

    asyncio.run(asyncio.wait_for(scenario(), WAIT * 3))


def test_closest_goes_to_the_lowest_cost_router(square: Mesh) -> None:
    async def scenario() -> None:
        address = f"test/closest/{uuid.uuid4().hex}"
        near, far = Consumer(square["B"], address), Consumer(square["C"], address)  # cost 1 and 2 from A
        producer = connect(square["A"])
        try:
            await asyncio.gather(near.ready(), far.ready())
            await reaches(producer, [near, far])
            bodies = [f"closest-{n}" for n in range(MESSAGES)]
            outcomes = await asyncio.gather(*(producer.send(address, encode(address, b)) for b in bodies))
            assert [outcome.state for outcome in outcomes] == [ACCEPTED] * MESSAGES
            assert Counter(near.bodies) == Counter(bodies), "all to B, one hop from A"
            assert far.bodies == [], "none to C, two hops from A"
        finally:
            await close([producer, near.connection, far.connection])

    asyncio.run(asyncio.wait_for(scenario(), WAIT * 3))


def test_multicast_gives_every_consumer_on_every_router_each_message_once(square: Mesh) -> None:
    async def scenario() -> None:
        address = f"test/multicast/{uuid.uuid4().hex}"
        # Two consumers on C: the copy that reaches C is given to each.
        places = {"A": "A", "B": "B", "C": "C", "C2": "C", "D": "D"}
        consumers = {name: Consumer(square[router_id], address) for name, router_id in places.items()}
        producer = connect(square["A"])
        try:
            await asyncio.gather(*(consumer.ready() for consumer in consumers.values()))
            await reaches(producer, [consumers[name] for name in ("B", "C", "C2", "D")])
            bodies = [f"multicast-{n}" for n in range(MESSAGES)]
            outcomes = await asyncio.gather(*(producer.send(address, encode(address, b)) for b in bodies))
            assert [outcome.state for outcome in outcomes] == [ACCEPTED] * MESSAGES
            await producer.send(address, encode(address, END))
            for name, consumer in consumers.items():
                await consumer.received(END, f"the end marker at consumer {name}")
            for name, consumer in consumers.items():
                assert Counter(consumer.bodies) == Counter([*bodies, END]), f"consumer {name}"
        finally:
            await close([producer, *(consumer.connection for consumer in consumers.values())])

    asyncio.run(asyncio.wait_for(scenario(), WAIT * 3))


def test_each_consumers_outcome_reaches_the_producer_two_hops_away(square: Mesh) -> None:
    refusal = ("mesh-test:refused", "the consumer on C refuses this one")

    async def scenario() -> None:
        address = f"mesh/outcomes/{uuid.uuid4().hex}"
        consumer = Consumer(square["C"], address, hold=True)
        producer = connect(square["A"])
        try:
            await consumer.ready()
            await reaches(producer, [consumer])
            bodies = [f"outcome-{n}" for n in range(30)]
            sends = [producer.send(address, encode(address, body)) for body in bodies]
            await eventually(lambda: len(consumer.held) == len(bodies), lambda: f"{len(consumer.held)} held")
            for message in consumer.held:
                kind = int(body_of(message).rsplit("-", 1)[1]) % 3
                if kind == 0:
                    message.accept()
                elif kind == 1:
                    message.reject(*refusal)
                else:
                    message.modify(delivery_failed=True, undeliverable_here=True)
            outcomes = await asyncio.gather(*sends)
            for n, outcome in enumerate(outcomes):
                expected = [
                    Outcome(ACCEPTED),
                    Outcome(REJECTED, error=refusal),
                    Outcome(MODIFIED, delivery_failed=True, undeliverable_here=True),
                ][n % 3]
                assert outcome == expected, f"message {n}"
        finally:
            await close([producer, consumer.connection])

    asyncio.run(asyncio.wait_for(scenario(), WAIT * 3))
