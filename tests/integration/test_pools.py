"""Consumer pools through a real router: a receiver names its pool in a link property (`meshbus:pool`); on a
balanced or closest address each pool, and the receivers without a pool, get every message once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from proton import Condition, Event, Link, Message, symbol
from proton.reactor import LinkOption

from tests.conftest import Router
from tests.integration.clients import (
    ACCEPT,
    REJECT,
    REJECTION,
    RELEASE,
    Client,
    Exchange,
    numbered,
    run,
    the,
    unique,
)

POOL = symbol("meshbus:pool")


class InPool(LinkOption):
    """Attach the receiver with a `meshbus:pool` link property of this value."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def apply(self, link: Link) -> None:
        link.properties = {POOL: self.pool}


class PoolExchange(Exchange):
    """An Exchange whose consumer `i` is in pool `pools[i]` (None: no pool); it records the link properties
    the router attached each consumer's link with."""

    def __init__(
        self,
        url: str,
        address: str,
        messages: Sequence[Message],
        pools: Sequence[str | None],
        policies: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, address, messages, policies or [ACCEPT] * len(pools), **kwargs)
        self.pools = list(pools)
        self.echoed: dict[int, Any] = {}

    def receiver_options(self, index: int) -> list[LinkOption]:
        pool = self.pools[index]
        return [] if pool is None else [InPool(pool)]

    def on_link_opened(self, event: Event) -> None:
        link = the(event.link)
        if link in self._receivers:
            self.echoed[self._receivers[link]] = link.remote_properties
        super().on_link_opened(event)

    def shares(self) -> list[int]:
        return [len(received) for received in self.received]

    def pool_bodies(self, pool: str | None) -> Counter[Any]:
        """Every body the consumers of the pool received, with how many times."""
        return Counter(
            body for index, name in enumerate(self.pools) if name == pool for body in self.bodies(index)
        )


def sent_bodies(messages: Sequence[Message]) -> Counter[Any]:
    return Counter(message.body for message in messages)


def test_each_pool_gets_every_message_and_its_members_share_them(default_router: Router) -> None:
    # Consumers hold their deliveries unsettled until all have arrived: "fewest unsettled" then means turns.
    messages = numbered("pooled", 20)
    exchange = run(
        PoolExchange(default_router.url, unique("test/pools"), messages, ["a", "a", "b"], hold=True, copies=2)
    )
    assert exchange.shares() == [10, 10, 20]
    assert exchange.pool_bodies("a") == exchange.pool_bodies("b") == sent_bodies(messages)
    assert {o.name for o in exchange.settled_outcomes()} == {"accepted"}
    assert exchange.echoed == {0: {POOL: "a"}, 1: {POOL: "a"}, 2: {POOL: "b"}}


def test_receivers_without_a_pool_share_the_messages_beside_a_pool(default_router: Router) -> None:
    messages = numbered("beside", 20)
    url, address = default_router.url, unique("test/pools")
    exchange = run(PoolExchange(url, address, messages, [None, None, "a"], hold=True, copies=2))
    assert exchange.shares() == [10, 10, 20]
    assert exchange.pool_bodies(None) == exchange.pool_bodies("a") == sent_bodies(messages)
    assert not exchange.echoed[0]  # no pool asked, none echoed


def test_closest_gives_each_pool_every_message_once(default_router: Router) -> None:
    messages = numbered("near", 20)
    exchange = run(PoolExchange(default_router.url, unique("test/closest"), messages, ["a", "a", "b"]))
    print("closest shares:", exchange.shares())
    assert exchange.pool_bodies("a") == exchange.pool_bodies("b") == sent_bodies(messages)
    assert {o.name for o in exchange.settled_outcomes()} == {"accepted"}


@pytest.mark.parametrize(
    ("policies", "expected"),
    [((ACCEPT, REJECT), "rejected"), ((RELEASE, ACCEPT), "accepted"), ((RELEASE, RELEASE), "released")],
    ids=["one-pool-rejects", "one-pool-releases", "both-release"],
)
def test_producer_gets_one_outcome_for_the_pools_copies(
    default_router: Router, policies: tuple[str, str], expected: str
) -> None:
    messages = numbered("outcome", 5)
    exchange = run(PoolExchange(default_router.url, unique("test/pools"), messages, ["a", "b"], policies))
    assert exchange.bodies(0) == exchange.bodies(1) == [m.body for m in messages]
    outcomes = exchange.settled_outcomes()
    assert [o.name for o in outcomes] == [expected] * 5
    if expected == "rejected":
        assert {(the(o.condition).name, the(o.condition).description) for o in outcomes} == {
            (REJECTION.name, REJECTION.description)
        }


def test_multicast_ignores_pools(default_router: Router) -> None:
    messages = numbered("fanout", 5)
    exchange = run(PoolExchange(default_router.url, unique("test/multicast"), messages, ["a", "a", None]))
    for consumer in range(3):
        assert exchange.bodies(consumer) == [m.body for m in messages], f"receiver {consumer}"
    assert not any(exchange.echoed.values())  # the router says no pool is in effect


class MalformedPool(Client):
    """A receiver whose `meshbus:pool` is a number; it records the condition the router detached it with."""

    def __init__(self, url: str, address: str) -> None:
        super().__init__(url)
        self.address = address
        self.condition: Condition | None = None

    def begin(self) -> None:
        self.container.create_receiver(self.connect(), self.address, options=InPool(7))

    def on_link_error(self, event: Event) -> None:
        self.condition = the(event.link).remote_condition
        self.done()


def test_a_pool_that_is_not_a_string_is_refused(default_router: Router) -> None:
    address = unique("test/pools")
    client = run(MalformedPool(default_router.url, address))
    condition = the(client.condition)
    assert condition.name == "amqp:invalid-field"
    description = the(condition.description)
    assert "'meshbus:pool' must be a string" in description
    assert address in description
