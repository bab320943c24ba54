"""Outcome sinks: a send's outcome handed to an object of the caller's rather than a future, through a real
router."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from proton import Message

from meshbus.amqp.client import ACCEPTED, Outcome
from tests.amqp.connections import WAIT, consumer_and_producer
from tests.conftest import Router


class Sink:
    """Records what it is handed; `broken`, it raises instead."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.outcomes: list[Outcome | BaseException] = []

    def done(self) -> bool:
        return bool(self.outcomes)

    def set_result(self, outcome: Outcome) -> None:
        if self.broken:
            raise RuntimeError("this sink is broken")
        self.outcomes.append(outcome)

    def set_exception(self, error: BaseException) -> None:
        self.outcomes.append(error)


def test_a_sink_gets_its_outcome_and_one_that_raises_stops_nothing_else(
    default_router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"test-client-sink-{uuid.uuid4().hex[:8]}"
    payload = bytes(Message(address=address, body="work").encode())

    async def scenario() -> tuple[Sink, Outcome]:
        async with consumer_and_producer(default_router, address) as (_, _, client):
            sink = Sink()
            client.send(address, payload, outcome=Sink(broken=True))
            assert client.send(address, payload, outcome=sink) is sink
            last = await asyncio.wait_for(client.send(address, payload), WAIT)
            deadline = asyncio.get_running_loop().time() + WAIT
            while not sink.done():
                assert asyncio.get_running_loop().time() < deadline, "the sink got no outcome"
                await asyncio.sleep(0.01)
            return sink, last

    sink, last = asyncio.run(scenario())
    assert [outcome.state for outcome in sink.outcomes if isinstance(outcome, Outcome)] == [ACCEPTED]
    assert last.state == ACCEPTED
    assert [r.getMessage() for r in caplog.records if r.name == "meshbus.client" and r.exc_info] == [
        "a send's outcome could not be handed over"
    ]
