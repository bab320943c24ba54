"""Fakes shared by the router core's tests: a RecordingEdge that records every action the core asks of
the edge, and a `Router` (a core on test rules with that edge, and short ways to raise its events)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from meshbus.router.addressing import AddressRule, Distribution, DistributionRules
from meshbus.router.core import ACCEPTED, ConsumerLink, Delivery, Outcome, ProducerLink, RouterCore

NOW = 1_700_000_000.0  # expiry times are wall-clock times, so the core works in epoch seconds
CAPACITY = 4
RULES = DistributionRules(  # any other address: balanced
    [
        AddressRule(prefix="multi", distribution=Distribution.MULTICAST),
        AddressRule(prefix="near", distribution=Distribution.CLOSEST),
        AddressRule(prefix="gone", distribution=Distribution.UNAVAILABLE),
    ]
)


@dataclass(eq=False)
class Sent:
    """One copy of a delivery that the core started on a consumer's link."""

    link: ConsumerLink
    delivery: Delivery
    handle: object
    presettled: bool  # the edge settled it on sending: no outcome will come back from the consumer


class RecordingEdge:
    """The core's Edge: records every action; `send` hands back a fresh handle.

    `producer_credit` is the credit each producer's link holds as the producer sees it: flows add to
    it, a withdrawal empties it, and each delivery the producer sends spends one (see `Router.send`).
    """

    def __init__(self) -> None:
        self.sends: list[Sent] = []
        self.settles: list[tuple[Delivery, Outcome]] = []
        self.updates: list[tuple[Delivery, Outcome]] = []
        self.flows: list[tuple[ProducerLink, int]] = []
        self.withdrawals: list[ProducerLink] = []
        self.drains: list[ConsumerLink] = []
        self.producer_credit: dict[ProducerLink, int] = {}

    def send(self, link: ConsumerLink, delivery: Delivery) -> object:
        handle = object()
        self.sends.append(Sent(link, delivery, handle, delivery.settled or link.settle_on_send))
        return handle

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.settles.append((delivery, outcome))

    def update(self, delivery: Delivery, outcome: Outcome) -> None:
        self.updates.append((delivery, outcome))

    def flow(self, link: ProducerLink, credit: int) -> None:
        self.flows.append((link, credit))
        self.producer_credit[link] = self.producer_credit.get(link, 0) + credit

    def withdraw_credit(self, link: ProducerLink) -> None:
        self.withdrawals.append(link)
        self.producer_credit[link] = 0

    def drained(self, link: ConsumerLink) -> None:
        self.drains.append(link)

    # -- what the tests read ---------------------------------------------------------------------

    def sent_to(self, link: ConsumerLink) -> list[Delivery]:
        return [sent.delivery for sent in self.sends if sent.link is link]

    def receivers(self, delivery: Delivery) -> list[ConsumerLink]:
        return [sent.link for sent in self.sends if sent.delivery is delivery]

    def handle(self, link: ConsumerLink, delivery: Delivery) -> object:
        (handle,) = [s.handle for s in self.sends if s.link is link and s.delivery is delivery]
        return handle

    def outcomes(self, delivery: Delivery) -> list[Outcome]:
        return [outcome for settled, outcome in self.settles if settled is delivery]

    def outcome(self, delivery: Delivery) -> Outcome:
        """The one outcome the producer was given for this delivery."""
        (outcome,) = self.outcomes(delivery)
        return outcome

    def granted(self, link: ProducerLink) -> list[int]:
        return [credit for flowed, credit in self.flows if flowed is link]


class Router:
    """A core on the test rules with its recording edge, and short ways to raise its events."""

    def __init__(self, rules: DistributionRules = RULES, router_id: str = "test") -> None:
        self.edge = RecordingEdge()
        self.core = RouterCore(self.edge, rules, router_id, "1")

    def consumer(
        self, address: str | None, credit: int = 0, *, settle_on_send: bool = False, pool: str | None = None
    ) -> ConsumerLink:
        link = self.core.attach_consumer(object(), address, settle_on_send, pool=pool)
        if credit:
            self.credit(link, credit)
        return link

    def producer(self, address: str | None, capacity: int = CAPACITY) -> ProducerLink:
        return self.core.attach_producer(object(), address, capacity)

    def credit(self, link: ConsumerLink, credit: int, *, drain: bool = False, now: float = NOW) -> None:
        self.core.consumer_credit(link, credit, drain, now)

    def send(
        self,
        link: ProducerLink,
        *,
        to: str | None = None,
        settled: bool = False,
        complete: bool = True,
        deadline: float | None = None,
        now: float = NOW,
        ingress: str | None = None,
        trace: tuple[str, ...] = (),
        dest: str | None = None,
    ) -> Delivery:
        """The producer sends a delivery (spending a credit if it has one); `ingress`, `trace` and `dest`: it
        comes from another router."""
        credit = self.edge.producer_credit
        credit[link] = max(credit.get(link, 0) - 1, 0)
        return self.core.deliver(
            link,
            object(),
            b"payload",
            complete=complete,
            settled=settled,
            to=to,
            deadline=deadline,
            now=now,
            ingress=ingress,
            trace=trace,
            dest=dest,
        )

    def settle(self, link: ConsumerLink, delivery: Delivery, outcome: Outcome = ACCEPTED) -> None:
        """The consumer settles its copy of the delivery with this outcome."""
        self.core.consumer_outcome(link, self.edge.handle(link, delivery), outcome, True)


@pytest.fixture
def router() -> Router:
    return Router()


def alternates(links: list[ConsumerLink]) -> bool:
    return all(a is not b for a, b in itertools.pairwise(links))
