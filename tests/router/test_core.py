"""RouterCore driven by events through a recording Edge: no sockets, no clock.

Each test raises the events the protocol edge would raise (attaches, credit, deliveries, outcomes,
time) and reads the actions the core asked of the edge (send, settle, update, flow, withdraw, drained).
The state machine at the end checks the settlement and credit rules over random event sequences.
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from meshbus.router.addressing import AddressRule, Distribution, DistributionRules
from meshbus.router.core import (
    ACCEPTED,
    CONSUMER_LOST,
    EXPIRED,
    MODIFIED_KIND,
    REJECTED_KIND,
    RELEASED,
    AttachError,
    ConsumerLink,
    Delivery,
    Outcome,
    ProducerLink,
    rejected,
)
from tests.router.conftest import CAPACITY, NOW, Router, Sent, alternates

DYNAMIC_PREFIX = "_dynamic/test/1."
MODIFIED = Outcome(MODIFIED_KIND, delivery_failed=True)
REJECTED = rejected("amqp:internal-error", "consumer failed")


# -- credit ------------------------------------------------------------------------------------------


def test_producer_gets_credit_only_once_a_consumer_attaches(router):
    producer = router.producer("work")
    assert router.edge.flows == []
    router.consumer("work")
    assert router.edge.granted(producer) == [CAPACITY]
    router.consumer("work")
    assert router.edge.granted(producer) == [CAPACITY]  # a second consumer adds none


def test_credit_is_withdrawn_when_the_last_consumer_goes_and_comes_back_with_the_next(router):
    producer = router.producer("work")
    first, second = router.consumer("work"), router.consumer("work")
    router.core.detach_consumer(first, NOW)
    assert router.edge.withdrawals == []
    router.core.detach_consumer(second, NOW)
    assert router.edge.withdrawals == [producer]
    assert producer.credit == 0
    router.consumer("work")
    assert router.edge.granted(producer) == [CAPACITY, CAPACITY]


def test_anonymous_producer_gets_credit_at_once(router):
    producer = router.producer(None)
    assert router.edge.granted(producer) == [CAPACITY]


def test_credit_is_replenished_in_batches_as_deliveries_move_on(router):
    router.consumer("work", credit=100)
    producer = router.producer("work", capacity=8)
    for _ in range(8):
        router.send(producer)
        assert router.edge.producer_credit[producer] >= 8 - 8 // 4  # the producer never runs short
    assert router.edge.producer_credit[producer] == 8
    assert router.edge.granted(producer) == [8, 2, 2, 2, 2]


def test_producer_holds_at_most_capacity_for_a_consumer_without_credit(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    for _ in range(CAPACITY):
        router.send(producer)
    assert router.edge.producer_credit[producer] == 0
    assert producer.held == CAPACITY == len(consumer.queue)
    assert router.edge.granted(producer) == [CAPACITY]
    router.credit(consumer, 2)
    assert len(router.edge.sent_to(consumer)) == 2
    assert router.edge.producer_credit[producer] == 2  # credit for exactly the deliveries that left
    assert producer.held == 2


def test_refused_arrival_gives_its_credit_back(router):
    router.consumer("work")
    producer = router.producer("work")
    router.edge.producer_credit[producer] -= 1  # the producer spent one on a message the edge refused
    router.core.refused_arrival(producer)
    assert router.edge.producer_credit[producer] == CAPACITY


# -- distribution ------------------------------------------------------------------------------------


def test_balanced_picks_the_consumer_with_fewest_unsettled(router):
    consumers = [router.consumer("work", credit=10) for _ in range(3)]
    producer = router.producer("work")
    first = [router.send(producer) for _ in range(3)]
    assert {link for d in first for link in router.edge.receivers(d)} == set(consumers)
    freed = consumers[2]
    for _ in range(2):  # twice running: taking turns would not pick the same consumer again
        router.settle(freed, router.edge.sent_to(freed)[-1])
        assert router.edge.receivers(router.send(producer)) == [freed]


def test_balanced_passes_over_a_consumer_without_credit_while_another_can_take(router):
    stopping = router.consumer("work")  # no credit (a stopped server drained it), nothing unsettled
    ready = router.consumer("work", credit=10)
    producer = router.producer("work")
    for _ in range(4):
        delivery = router.send(producer)
        assert router.edge.receivers(delivery) == [ready]
        router.settle(ready, delivery)  # both are idle again: a tie but for the credit
    assert not stopping.queue


def test_what_waits_for_a_consumer_that_drains_goes_to_the_others_that_do_not(router):
    stopping = router.consumer("work", credit=1)
    producer = router.producer("work")
    first, *waiting = [router.send(producer) for _ in range(3)]  # one sent, two wait for credit
    ready, paused = router.consumer("work"), router.consumer("work")
    router.credit(paused, 0, drain=True)
    router.credit(stopping, 0, drain=True)  # a server that stops: it takes nothing more
    assert not stopping.queue and not paused.queue
    assert list(ready.queue) == waiting  # no credit yet: they wait there, the least loaded not draining
    router.credit(ready, 5)
    assert router.edge.sent_to(ready) == waiting
    assert router.edge.sent_to(stopping) == [first]  # what it took, it still settles
    router.settle(stopping, first)
    assert router.edge.outcome(first) == ACCEPTED


def test_balanced_counts_queued_deliveries_as_load_when_no_consumer_can_take(router):
    first, second = router.consumer("work"), router.consumer("work")  # no credit: deliveries wait in queues
    producer = router.producer("work")
    for _ in range(4):
        router.send(producer)
    assert (len(first.queue), len(second.queue)) == (2, 2)


def test_balanced_ties_rotate(router):
    consumers = [router.consumer("work", credit=10) for _ in range(3)]
    producer = router.producer("work")
    order = []
    for _ in range(6):
        delivery = router.send(producer)
        (link,) = router.edge.receivers(delivery)
        router.settle(link, delivery)  # every consumer is idle again: all tie
        order.append(link)
    assert alternates(order)
    assert all(order.count(link) == 2 for link in consumers)


def test_closest_prefers_consumers_with_credit_and_rotates_among_them(router):
    idle = router.consumer("near/x")
    ready = router.consumer("near/x", credit=10)
    producer = router.producer("near/x")
    for _ in range(3):
        assert router.edge.receivers(router.send(producer)) == [ready]
    router.credit(idle, 10)
    order = [link for _ in range(4) for link in router.edge.receivers(router.send(producer))]
    assert alternates(order)
    assert set(order) == {idle, ready}


def test_closest_passes_over_a_consumer_busy_with_a_stream(router):
    first, second = router.consumer("near/x", credit=5), router.consumer("near/x", credit=5)
    producer = router.producer("near/x")
    big = router.send(producer, complete=False)
    (busy,) = router.edge.receivers(big)
    free = second if busy is first else first
    small = [router.send(producer) for _ in range(3)]
    assert router.edge.sent_to(free) == small  # none waits behind the stream


def test_multicast_sends_to_every_consumer(router):
    consumers = [router.consumer("multi/x", credit=5) for _ in range(3)]
    producer = router.producer("multi/x")
    delivery = router.send(producer)
    assert router.edge.receivers(delivery) == consumers


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ((ACCEPTED, ACCEPTED, ACCEPTED), ACCEPTED),
        ((RELEASED, ACCEPTED, MODIFIED), ACCEPTED),
        ((ACCEPTED, REJECTED, ACCEPTED), REJECTED),
        ((REJECTED, rejected("amqp:other", "second"), ACCEPTED), REJECTED),  # the first rejection
        ((RELEASED, MODIFIED, RELEASED), RELEASED),
    ],
)
def test_multicast_outcome_is_aggregated_once_every_copy_is_settled(router, outcomes, expected):
    consumers = [router.consumer("multi/x", credit=5) for _ in range(3)]
    producer = router.producer("multi/x")
    delivery = router.send(producer)
    for link, outcome in zip(consumers, outcomes, strict=True):
        assert router.edge.settles == []
        router.settle(link, delivery, outcome)
    assert router.edge.outcome(delivery) == expected


def test_multicast_copies_never_received_count_as_released(router):
    taker = router.consumer("multi/x", credit=5)
    absent = router.consumer("multi/x")  # no credit: its copy waits
    producer = router.producer("multi/x")
    taken, untaken = router.send(producer), router.send(producer)
    router.settle(taker, taken)
    router.settle(taker, untaken, RELEASED)
    router.core.detach_consumer(absent, NOW)
    assert router.edge.outcome(taken) == ACCEPTED
    assert router.edge.outcome(untaken) == RELEASED


def test_multicast_does_not_pass_on_unsettled_states(router):
    consumer = router.consumer("multi/x", credit=5)
    router.consumer("multi/x", credit=5)
    delivery = router.send(router.producer("multi/x"))
    router.core.consumer_outcome(consumer, router.edge.handle(consumer, delivery), ACCEPTED, False)
    assert router.edge.updates == []


# -- unicast outcomes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome",
    [
        ACCEPTED,
        rejected("app:bad-request", "field 'x' is missing"),
        RELEASED,
        Outcome(MODIFIED_KIND, delivery_failed=True, undeliverable_here=True),
    ],
)
def test_unicast_passes_the_consumers_exact_outcome(router, outcome):
    consumer = router.consumer("work", credit=5)
    delivery = router.send(router.producer("work"))
    router.settle(consumer, delivery, outcome)
    assert router.edge.outcome(delivery) == outcome


def test_unicast_passes_unsettled_states_as_updates(router):
    consumer = router.consumer("work", credit=5)
    delivery = router.send(router.producer("work"))
    router.core.consumer_outcome(consumer, router.edge.handle(consumer, delivery), ACCEPTED, False)
    assert router.edge.updates == [(delivery, ACCEPTED)]
    assert router.edge.settles == []
    router.settle(consumer, delivery, ACCEPTED)
    assert router.edge.outcome(delivery) == ACCEPTED


@pytest.mark.parametrize("consumer_ends", ["settling", "detaching"])
def test_producer_settling_first_hears_nothing_more(router, consumer_ends):
    consumer = router.consumer("work", credit=5)
    producer = router.producer("work")
    delivery = router.send(producer)
    router.core.producer_settled(producer, delivery.handle)
    router.core.consumer_outcome(consumer, router.edge.handle(consumer, delivery), ACCEPTED, False)
    if consumer_ends == "settling":
        router.settle(consumer, delivery)
    else:
        router.core.detach_consumer(consumer, NOW)
    assert router.edge.updates == router.edge.settles == []


def test_a_delivery_its_producer_settled_while_queued_is_still_delivered_at_most_once(router):
    consumer = router.consumer("work")  # no credit yet: the delivery waits in the router
    producer = router.producer("work")
    delivery = router.send(producer)
    router.core.producer_settled(producer, delivery.handle)
    router.credit(consumer, 1)
    (sent,) = router.edge.sends
    assert sent.delivery is delivery and sent.presettled  # forwarded, and as at-most-once
    assert router.edge.updates == router.edge.settles == []


# -- no consumer, bad addresses ----------------------------------------------------------------------


def test_unsettled_delivery_to_an_address_without_consumer_is_released_at_once(router):
    producer = router.producer(None)
    delivery = router.send(producer, to="nobody")
    assert router.edge.outcome(delivery) == RELEASED
    assert router.core.counters.released_no_consumer == 1
    assert router.edge.producer_credit[producer] == CAPACITY


def test_presettled_delivery_to_an_address_without_consumer_is_dropped_and_counted(router):
    producer = router.producer(None)
    router.send(producer, to="nobody", settled=True)
    assert router.edge.settles == []
    assert router.core.counters.dropped_no_consumer == 1
    assert router.edge.producer_credit[producer] == CAPACITY


def test_anonymous_delivery_without_to_is_rejected(router):
    router.consumer("work", credit=5)
    delivery = router.send(router.producer(None), to=None)
    outcome = router.edge.outcome(delivery)
    assert outcome.kind == REJECTED_KIND
    assert outcome.error is not None and outcome.error[0] == "amqp:precondition-failed"
    assert router.edge.sends == []


def test_dynamic_addresses_are_unique_and_closest():
    router = Router(DistributionRules([], default=Distribution.MULTICAST))
    first, second = router.consumer(None, credit=5), router.consumer(None, credit=5)
    assert first.address != second.address
    assert first.address.startswith(DYNAMIC_PREFIX)
    assert first.entry.distribution is second.entry.distribution is Distribution.CLOSEST
    reply = router.send(router.producer(None), to=second.address)
    assert router.edge.receivers(reply) == [second]


def test_dynamic_target_is_not_subject_to_the_address_rules():
    router = Router(DistributionRules([AddressRule(pattern="#", distribution=Distribution.UNAVAILABLE)]))
    producer = router.core.attach_producer(object(), None, CAPACITY, dynamic=True)
    assert producer.entry is not None and producer.entry.distribution is Distribution.CLOSEST
    assert producer.address == producer.entry.address


@pytest.mark.parametrize("attach", ["consumer", "producer"])
def test_unavailable_address_refuses_attaches_with_not_found(router, attach):
    with pytest.raises(AttachError, match="'gone/x'") as refused:
        if attach == "consumer":
            router.consumer("gone/x")
        else:
            router.producer("gone/x")
    assert refused.value.condition == "amqp:not-found"
    assert router.core.entries == {}


# -- expiry ------------------------------------------------------------------------------------------


def test_delivery_expired_on_arrival_is_settled_undeliverable_here(router):
    router.consumer("work", credit=5)
    delivery = router.send(router.producer("work"), deadline=NOW - 1)
    assert router.edge.sends == []
    outcome = router.edge.outcome(delivery)
    assert outcome == EXPIRED
    assert outcome.kind == MODIFIED_KIND and outcome.undeliverable_here
    assert router.core.counters.expired == 1


def test_queued_delivery_expires_on_tick(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    delivery = router.send(producer, deadline=NOW + 5)
    router.core.tick(NOW + 4)
    assert router.edge.settles == []
    router.core.tick(NOW + 5)
    assert router.edge.outcome(delivery) == EXPIRED
    assert router.edge.producer_credit[producer] == CAPACITY
    router.credit(consumer, 5, now=NOW + 6)
    assert router.edge.sends == []


def test_queued_delivery_expired_by_the_time_credit_comes_is_not_sent(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    stale = router.send(producer, deadline=NOW + 5)
    fresh = router.send(producer, deadline=NOW + 50)
    router.credit(consumer, 5, now=NOW + 6)
    assert router.edge.sent_to(consumer) == [fresh]
    assert router.edge.outcome(stale) == EXPIRED
    assert router.core.counters.expired == 1


def test_expired_delivery_is_not_handed_on_when_its_consumer_leaves(router):
    leaving = router.consumer("work")
    producer = router.producer("work")
    delivery = router.send(producer, deadline=NOW + 5)
    staying = router.consumer("work", credit=5)
    router.core.tick(NOW + 4)
    router.core.detach_consumer(leaving, NOW + 5.5)  # after NOW + 5, before the next tick
    router.core.tick(NOW + 6)
    assert router.edge.sent_to(staying) == []
    assert router.edge.outcome(delivery) == EXPIRED


# -- consumers leaving, drain, streaming -------------------------------------------------------------


def test_queued_deliveries_of_a_leaving_consumer_go_to_another(router):
    leaving = router.consumer("work")
    producer = router.producer("work")
    queued = [router.send(producer), router.send(producer)]
    staying = router.consumer("work", credit=5)
    router.core.detach_consumer(leaving, NOW)
    assert router.edge.sent_to(staying) == queued
    assert router.edge.settles == []


def test_queued_deliveries_of_the_last_consumer_are_released(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    queued = [router.send(producer), router.send(producer)]
    router.core.detach_consumer(consumer, NOW)
    assert [router.edge.outcome(d) for d in queued] == [RELEASED, RELEASED]
    assert router.edge.withdrawals == [producer]


def test_unsettled_deliveries_of_a_leaving_consumer_come_back_delivery_failed(router):
    leaving = router.consumer("work", credit=5)
    producer = router.producer("work")
    delivery = router.send(producer)
    other = router.consumer("work", credit=5)
    router.core.detach_consumer(leaving, NOW)
    outcome = router.edge.outcome(delivery)
    assert outcome == CONSUMER_LOST
    assert outcome.kind == MODIFIED_KIND and outcome.delivery_failed and not outcome.undeliverable_here
    assert router.edge.sent_to(other) == []  # its fate is unknown: only the producer may resend it


def test_drain_with_nothing_queued_is_answered_at_once(router):
    consumer = router.consumer("work", credit=5)
    router.credit(consumer, 5, drain=True)
    assert router.edge.drains == [consumer]
    assert consumer.credit == 0


def test_drain_sends_what_is_queued_first(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    delivery = router.send(producer)
    router.credit(consumer, 3, drain=True)
    assert router.edge.sent_to(consumer) == [delivery]
    assert router.edge.drains == [consumer]


@pytest.mark.parametrize("held_by", ["stream", "blocked socket"])
def test_drain_is_answered_once_the_link_is_free(router, held_by):
    consumer = router.consumer("work", credit=5)
    producer = router.producer("work")
    if held_by == "stream":
        router.send(producer, complete=False)
    else:
        consumer.blocked = True  # as the edge marks a link whose socket is full
        router.send(producer)
    router.credit(consumer, 4, drain=True)
    if held_by == "stream":
        router.core.stream_finished(consumer, NOW)
    else:
        router.core.unblock(consumer, NOW)
    assert len(router.edge.sent_to(consumer)) == 1
    assert router.edge.drains == [consumer]


def test_stream_holds_the_consumer_link_until_finished(router):
    consumer = router.consumer("work", credit=5)
    producer = router.producer("work")
    big = router.send(producer, complete=False)
    small = router.send(producer)
    assert router.edge.sent_to(consumer) == [big]
    router.core.stream_finished(consumer, NOW)
    assert router.edge.sent_to(consumer) == [big, small]


@pytest.mark.parametrize(
    ("settle_on_send", "last", "expected"), [(False, ACCEPTED, ACCEPTED), (True, REJECTED, REJECTED)]
)
def test_multicast_waits_for_the_other_copies_when_a_consumer_leaves_mid_stream(
    router, settle_on_send, last, expected
):
    leaving = router.consumer("multi/x", credit=5, settle_on_send=settle_on_send)
    staying = router.consumer("multi/x", credit=5)
    delivery = router.send(router.producer("multi/x"), complete=False)
    router.core.detach_consumer(leaving, NOW)
    assert router.edge.settles == []  # the staying consumer has not said anything yet
    router.settle(staying, delivery, last)
    assert router.edge.outcome(delivery) == expected


def test_abort_drops_queued_copies_and_settles_nothing(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    delivery = router.send(producer, complete=False)
    router.core.abort(delivery)
    router.credit(consumer, 5)
    assert router.edge.sends == router.edge.settles == []
    assert router.edge.producer_credit[producer] == CAPACITY


def test_refuse_rejects_to_the_producer_and_drops_queued_copies(router):
    consumer = router.consumer("work")
    producer = router.producer("work")
    delivery = router.send(producer, complete=False)
    too_large = rejected("amqp:link:message-size-exceeded", "message larger than the limit of 10 bytes")
    router.core.refuse(delivery, too_large)
    router.credit(consumer, 5)
    assert router.edge.sends == []
    assert router.edge.outcome(delivery) == too_large
    assert router.core.counters.rejected == 1
    assert router.edge.producer_credit[producer] == CAPACITY


# -- producers leaving, settle-on-send ---------------------------------------------------------------


@pytest.mark.parametrize("address", ["work", "multi/x"])
def test_outcomes_after_the_producer_left_are_not_sent_to_it(router, address):
    consumer = router.consumer(address, credit=1)
    producer = router.producer(address)
    sent, queued = router.send(producer), router.send(producer)
    router.core.detach_producer(producer)
    router.core.consumer_outcome(consumer, router.edge.handle(consumer, sent), ACCEPTED, False)
    router.settle(consumer, sent)
    router.credit(consumer, 1)  # what was on its way still reaches the consumer
    router.core.detach_consumer(consumer, NOW)
    assert router.edge.sent_to(consumer) == [sent, queued]
    assert router.edge.updates == router.edge.settles == []


def test_settle_on_send_consumer_settles_the_producer_as_accepted_when_sent(router):
    consumer = router.consumer("work", settle_on_send=True)
    producer = router.producer("work")
    delivery = router.send(producer)
    assert router.edge.settles == []  # queued: not yet sent
    router.credit(consumer, 1)
    assert router.edge.outcome(delivery) == ACCEPTED
    assert consumer.inflight == {}


# -- pools -------------------------------------------------------------------------------------------


def pools_of(links: list[ConsumerLink]) -> Counter[str | None]:
    """How many of the links are in each pool."""
    return Counter(link.pool for link in links)


@pytest.mark.parametrize("address", ["work", "near/x"])
def test_each_pool_gets_every_message_shared_among_its_members(router, address):
    a1, a2 = router.consumer(address, credit=10, pool="a"), router.consumer(address, credit=10, pool="a")
    b = router.consumer(address, credit=10, pool="b")
    producer = router.producer(address)
    deliveries = [router.send(producer, settled=True) for _ in range(4)]
    for delivery in deliveries:
        assert pools_of(router.edge.receivers(delivery)) == {"a": 1, "b": 1}
    assert len(router.edge.sent_to(a1)) == len(router.edge.sent_to(a2)) == 2
    assert router.edge.sent_to(b) == deliveries


def test_consumers_without_a_pool_are_one_group_beside_the_pools(router):
    plain = [router.consumer("work", credit=10) for _ in range(2)]
    pooled = router.consumer("work", credit=10, pool="a")
    producer = router.producer("work")
    deliveries = [router.send(producer, settled=True) for _ in range(4)]
    for delivery in deliveries:
        assert pools_of(router.edge.receivers(delivery)) == {"a": 1, None: 1}
    assert [len(router.edge.sent_to(link)) for link in plain] == [2, 2]
    assert router.edge.sent_to(pooled) == deliveries


def test_consumers_all_in_one_pool_are_served_as_without_pools(router):
    first, second = router.consumer("work", credit=10, pool="a"), router.consumer("work", credit=10, pool="a")
    producer = router.producer("work")
    deliveries = [router.send(producer) for _ in range(2)]
    assert {link for d in deliveries for link in router.edge.receivers(d)} == {first, second}
    link = router.edge.receivers(deliveries[0])[0]
    router.core.consumer_outcome(link, router.edge.handle(link, deliveries[0]), ACCEPTED, False)
    assert router.edge.updates == [(deliveries[0], ACCEPTED)]  # unsettled states pass as for unicast
    router.settle(link, deliveries[0], MODIFIED)
    assert router.edge.outcome(deliveries[0]) == MODIFIED  # the exact outcome, not an aggregate


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ((ACCEPTED, ACCEPTED), ACCEPTED),
        ((ACCEPTED, REJECTED), REJECTED),
        ((RELEASED, ACCEPTED), ACCEPTED),
        ((MODIFIED, RELEASED), RELEASED),
    ],
)
def test_outcome_over_pools_is_aggregated_once_every_pool_settled(router, outcomes, expected):
    a, b = router.consumer("work", credit=5, pool="a"), router.consumer("work", credit=5)
    delivery = router.send(router.producer("work"))
    router.core.consumer_outcome(a, router.edge.handle(a, delivery), ACCEPTED, False)
    assert router.edge.updates == []  # as for multicast: only the aggregate reaches the producer
    for link, outcome in zip((a, b), outcomes, strict=True):
        assert router.edge.settles == []
        router.settle(link, delivery, outcome)
    assert router.edge.outcome(delivery) == expected


def test_multicast_ignores_pools(router):
    consumers = [router.consumer("multi/x", credit=5, pool=pool) for pool in ("a", "a", None)]
    delivery = router.send(router.producer("multi/x"))
    assert router.edge.receivers(delivery) == consumers
    assert [link.pool for link in consumers] == [None, None, None]  # the edge echoes no pool


def test_queued_copy_of_a_leaving_pool_member_goes_to_a_member_of_the_same_pool(router):
    a1, a2 = router.consumer("work", pool="a"), router.consumer("work", pool="a")  # no credit: copies queue
    other = router.consumer("work", credit=5, pool="b")
    delivery = router.send(router.producer("work"))
    (holder,) = [link for link in (a1, a2) if delivery in link.queue]
    mate = a2 if holder is a1 else a1
    router.core.detach_consumer(holder, NOW)
    router.credit(mate, 5)
    assert router.edge.receivers(delivery) == [other, mate]
    router.settle(other, delivery, REJECTED)
    router.settle(mate, delivery)
    assert router.edge.outcome(delivery) == REJECTED


@pytest.mark.parametrize(("other_outcome", "expected"), [(ACCEPTED, ACCEPTED), (MODIFIED, RELEASED)])
def test_queued_copy_of_a_pool_that_empties_counts_as_released(router, other_outcome, expected):
    leaving = router.consumer("work", pool="a")  # no credit: its copy waits
    other = router.consumer("work", credit=5)
    delivery = router.send(router.producer("work"))
    router.settle(other, delivery, other_outcome)
    assert router.edge.settles == []
    router.core.detach_consumer(leaving, NOW)
    assert router.edge.receivers(delivery) == [other]  # not a second copy to the remaining group
    assert router.edge.outcome(delivery) == expected


def test_pools_merge_back_into_one_group_when_a_pool_empties(router):
    a = router.consumer("work", credit=5, pool="a")
    b = router.consumer("work", credit=5, pool="b")
    producer = router.producer("work")
    router.core.detach_consumer(b, NOW)
    delivery = router.send(producer)
    assert router.edge.receivers(delivery) == [a]
    router.settle(a, delivery, MODIFIED)
    assert router.edge.outcome(delivery) == MODIFIED  # one copy again: the exact outcome


def test_pooled_consumers_keep_the_credit_rules(router):
    producer = router.producer("work")
    first, second = router.consumer("work", pool="a"), router.consumer("work", pool="b")
    assert router.edge.granted(producer) == [CAPACITY]
    router.core.detach_consumer(first, NOW)
    router.core.detach_consumer(second, NOW)
    assert router.edge.withdrawals == [producer]


# -- random event sequences --------------------------------------------------------------------------

ADDRESSES = ("multi/m", "near/n", "work/w")
PICK = st.integers(0, 63)  # which link or delivery a rule acts on, modulo how many there are
T = TypeVar("T")


def pick(items: list[T], index: int) -> T:
    return items[index % len(items)]


class ForwardingMachine(RuleBasedStateMachine):
    """Random attaches, detaches, credit, deliveries, outcomes and ticks against the settlement and
    credit rules: each unsettled delivery is settled back exactly once, after every copy of it is
    done with, unless its producer settled first or left; no producer link holds more than its
    capacity; a producer has credit only while its address has a consumer, and is never left
    without credit while the router holds nothing of it; outside multicast, a delivery reaches at most
    one consumer of each pool. Deliveries are complete (not streamed)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.now = NOW
        self.producers: list[ProducerLink] = []
        self.consumers: list[ConsumerLink] = []
        self.awaiting: list[Delivery] = []  # unsettled deliveries whose producer waits for the outcome
        self.open: list[Sent] = []  # copies whose consumer owes an outcome
        self.pools_reached: dict[Delivery, set[str | None]] = {}
        self.checked_sends = self.checked_settles = self.checked_updates = 0

    @initialize(
        address=st.sampled_from(ADDRESSES),
        credit=st.integers(1, 3),
        anonymous=st.booleans(),
        capacity=st.integers(1, 3),
    )
    def start_with_a_path(self, address: str, credit: int, anonymous: bool, capacity: int) -> None:
        # Most random sequences would otherwise never get a message from a producer to a consumer.
        self.attach_consumer(address, credit, settle_on_send=False, pool=None)
        self.attach_producer(None if anonymous else address, capacity)

    @rule(address=st.sampled_from([*ADDRESSES, None]), capacity=st.integers(1, 4))
    def attach_producer(self, address: str | None, capacity: int) -> None:
        self.producers.append(self.router.producer(address, capacity))

    @precondition(lambda self: self.producers)
    @rule(index=PICK)
    def detach_producer(self, index: int) -> None:
        link = pick(self.producers, index)
        self.producers.remove(link)
        self.router.core.detach_producer(link)
        self.awaiting = [d for d in self.awaiting if d.link is not link]

    @rule(
        address=st.sampled_from([*ADDRESSES, None]),
        credit=st.integers(0, 3),
        settle_on_send=st.booleans(),
        pool=st.sampled_from([None, "a", "b"]),
    )
    def attach_consumer(
        self, address: str | None, credit: int, settle_on_send: bool, pool: str | None
    ) -> None:
        link = self.router.consumer(address, credit, settle_on_send=settle_on_send, pool=pool)
        self.consumers.append(link)

    @precondition(lambda self: self.consumers)
    @rule(index=PICK)
    def detach_consumer(self, index: int) -> None:
        link = pick(self.consumers, index)
        self.consumers.remove(link)
        self.open = [sent for sent in self.open if sent.link is not link]
        self.router.core.detach_consumer(link, self.now)

    @precondition(lambda self: self.consumers)
    @rule(index=PICK, credit=st.integers(0, 3), drain=st.booleans())
    def give_credit(self, index: int, credit: int, drain: bool) -> None:
        self.router.credit(pick(self.consumers, index), credit, drain=drain, now=self.now)

    @precondition(lambda self: self.consumers)
    @rule(index=PICK, blocked=st.booleans())
    def socket(self, index: int, blocked: bool) -> None:
        link = pick(self.consumers, index)
        if blocked:
            link.blocked = True  # as the edge marks a link whose socket is full
        else:
            self.router.core.unblock(link, self.now)

    @precondition(lambda self: any(self.router.edge.producer_credit.get(p) for p in self.producers))
    @rule(
        index=PICK,
        count=st.integers(1, 3),
        settled=st.booleans(),
        to=PICK,
        lifetime=st.none() | st.integers(0, 3),
    )
    def deliver(self, index: int, count: int, settled: bool, to: int, lifetime: int | None) -> None:
        """A producer that has credit sends up to `count` deliveries."""
        link = pick([p for p in self.producers if self.router.edge.producer_credit.get(p)], index)
        targets = [c.address for c in self.consumers] + ["nobody", None]  # `to`, for anonymous links
        deadline = None if lifetime is None else self.now + lifetime
        for _ in range(min(count, self.router.edge.producer_credit[link])):
            delivery = self.router.send(
                link, to=pick(targets, to), settled=settled, deadline=deadline, now=self.now
            )
            if not settled:
                self.awaiting.append(delivery)

    @precondition(lambda self: self.open)
    @rule(
        index=PICK, outcome=st.sampled_from([ACCEPTED, RELEASED, MODIFIED, REJECTED]), settled=st.booleans()
    )
    def consumer_outcome(self, index: int, outcome: Outcome, settled: bool) -> None:
        sent = pick(self.open, index)
        if settled:
            self.open.remove(sent)
        self.router.core.consumer_outcome(sent.link, sent.handle, outcome, settled)

    @precondition(lambda self: self.awaiting)
    @rule(index=PICK)
    def producer_settles(self, index: int) -> None:
        delivery = self.awaiting.pop(index % len(self.awaiting))
        self.router.core.producer_settled(delivery.link, delivery.handle)

    @rule(seconds=st.integers(0, 3))
    def tick(self, seconds: int) -> None:
        self.now += seconds
        self.router.core.tick(self.now)

    @invariant()
    def settlement_rules_hold(self) -> None:
        edge = self.router.edge
        for sent in edge.sends[self.checked_sends :]:
            assert sent.delivery.deadline is None or sent.delivery.deadline > self.now, "sent after expiry"
            if not sent.presettled:
                self.open.append(sent)
            if sent.link.entry.distribution is not Distribution.MULTICAST:
                reached = self.pools_reached.setdefault(sent.delivery, set())
                assert sent.link.pool not in reached, "two copies to one pool"
                reached.add(sent.link.pool)
        for delivery, _ in edge.settles[self.checked_settles :]:
            assert delivery in self.awaiting, "settled twice, or to a producer that settled or left"
            self.awaiting.remove(delivery)
            assert not any(sent.delivery is delivery for sent in self.open), "settled before every copy"
        for delivery, _ in edge.updates[self.checked_updates :]:
            assert delivery in self.awaiting, "update to a producer that settled or left"
        self.checked_sends, self.checked_settles = len(edge.sends), len(edge.settles)
        self.checked_updates = len(edge.updates)

    @invariant()
    def groups_partition_the_consumers_by_pool(self) -> None:
        for entry in self.router.core.entries.values():
            if entry.group is not None:
                assert entry.group.consumers is entry.consumers and not entry.pools
                assert {link.pool for link in entry.consumers} <= {entry.group.pool}
            else:
                assert len(entry.pools) >= 2
                assert len({group.pool for group in entry.pools}) == len(entry.pools)
                for group in entry.pools:
                    assert group.consumers and all(link.pool == group.pool for link in group.consumers)
                members = [id(link) for group in entry.pools for link in group.consumers]
                assert sorted(members) == sorted(id(link) for link in entry.consumers)

    @invariant()
    def credit_rules_hold(self) -> None:
        for link in self.producers:
            credit = self.router.edge.producer_credit.get(link, 0)
            assert credit == link.credit
            assert credit + link.held <= link.capacity
            if link.entry is not None and not link.entry.consumers:
                assert credit == 0, "credit for an address without consumer"
            else:
                assert credit > 0 or link.held > 0, "producer starved"

    def teardown(self) -> None:
        # Once every consumer is gone, every delivery still awaited must have been settled back.
        while self.consumers:
            self.detach_consumer(0)
            self.settlement_rules_hold()  # before the next goes: it may have been handed deliveries
        assert not self.awaiting, "deliveries never settled back to their producer"


ForwardingMachine.TestCase.settings = settings(max_examples=600, stateful_step_count=40, deadline=None)
test_forwarding_rules = ForwardingMachine.TestCase
