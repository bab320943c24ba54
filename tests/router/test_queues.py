"""Queue addresses in the router core (issue 6), driven by events: the store host's link on a queue
address, consumers on their pool's internal address, and queues stored by other routers of the mesh
(fake `remote_changed` calls as the mesh would make them)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshbus.router.addressing import AddressRule, Distribution, DistributionRules, QueueRule, QueueRules
from meshbus.router.core import (
    ACCEPTED,
    RELEASED,
    AttachError,
    ConsumerLink,
    RouterCore,
    parse_queue_address,
    queue_address,
    store_address,
)
from tests.router.conftest import CAPACITY, NOW, RecordingEdge

NOTIFY = QueueRule(prefix="notify")
JOBS = QueueRule(pattern="jobs/*/todo")
QUEUES = QueueRules([NOTIFY, JOBS])
RULES = DistributionRules(
    [
        AddressRule(prefix="notify/multi", distribution=Distribution.MULTICAST),
        AddressRule(prefix="notify/gone", distribution=Distribution.UNAVAILABLE),
    ]
)


class FakeHost:
    """A store host for the rules it is given: attaches a link of its own on each queue address served."""

    def __init__(self, core: RouterCore, edge: RecordingEdge, rules: set[QueueRule]) -> None:
        self.core = core
        self.edge = edge
        self.rules = rules
        self.links: dict[str, ConsumerLink] = {}

    def hosts(self, rule: QueueRule) -> bool:
        return rule in self.rules

    def serve(self, address: str) -> None:
        link = self.links[address] = self.core.attach_store(("store", address), address, self.edge)
        self.core.consumer_credit(link, 10, False, NOW)


def make_core(hosted: set[QueueRule] | None = None) -> tuple[RouterCore, RecordingEdge, FakeHost | None]:
    edge = RecordingEdge()
    core = RouterCore(edge, RULES, "test", "1", QUEUES)
    host = None
    if hosted is not None:
        host = FakeHost(core, edge, hosted)
        core.queue_host = host
    return core, edge, host


@given(st.none() | st.text(), st.text(min_size=1))
def test_pool_and_queue_map_to_an_internal_address_and_back(pool: str | None, address: str) -> None:
    internal = queue_address(pool, address)
    assert internal.startswith("_queue/")
    assert parse_queue_address(internal) == (pool, address)


def test_internal_addresses_are_readable_and_distinguish_the_default_group_from_any_pool() -> None:
    assert queue_address(None, "notify/a") == "_queue/-/notify/a"
    assert queue_address("-", "notify/a") == "_queue/+-/notify/a"
    assert queue_address("billing/eu", "notify/a") == "_queue/+billing%2Feu/notify/a"
    assert parse_queue_address("notify/a") is None
    assert store_address(NOTIFY) == "_store/prefix:notify"
    assert store_address(JOBS) == "_store/pattern:jobs/*/todo"


def test_queue_rules_follow_the_precedence_of_address_rules_and_never_match_internal_addresses() -> None:
    specific = QueueRule(prefix="notify/audit")
    rules = QueueRules([NOTIFY, specific])
    assert rules.lookup("notify/info") == NOTIFY
    assert rules.lookup("notify/audit.info") == specific
    assert rules.lookup("notifyx") is None
    assert QUEUES.lookup("jobs/a/todo") == JOBS
    assert QUEUES.lookup("jobs/a/done") is None
    assert rules.lookup("_queue/-/notify/info") is None


def test_a_consumer_of_a_queue_joins_its_pools_internal_address() -> None:
    core, _, _ = make_core()
    link = core.attach_consumer("c1", "notify/info", pool="audit")
    assert link.address == "_queue/+audit/notify/info"
    assert link.pool is None  # every consumer of the internal address is in that pool
    assert link.entry.distribution is Distribution.BALANCED
    default = core.attach_consumer("c2", "notify/info")
    assert default.address == "_queue/-/notify/info"
    multi = core.attach_consumer("c3", "notify/multi/x", pool="p")
    assert multi.address == "_queue/+p/notify/multi/x", "a queue is balanced: pools give the copies"


def test_an_unavailable_queue_address_is_refused() -> None:
    core, _, _ = make_core()
    with pytest.raises(AttachError, match="configured unavailable"):
        core.attach_consumer("c", "notify/gone/x")


def test_a_store_host_takes_a_queue_address_when_its_entry_is_created() -> None:
    core, edge, host = make_core({NOTIFY})
    assert host is not None
    producer = core.attach_producer("p", "notify/info", CAPACITY)
    store = host.links["notify/info"]
    assert store.address == "notify/info" and store.entry is producer.entry
    assert edge.granted(producer) == [CAPACITY]
    delivery = core.deliver(
        producer, "d1", b"m", complete=True, settled=False, to=None, deadline=None, now=NOW
    )
    assert edge.sent_to(store) == [delivery]
    core.consumer_outcome(store, edge.handle(store, delivery), ACCEPTED, settled=True)
    assert edge.outcome(delivery) == ACCEPTED


def test_a_relay_delivery_to_a_queue_address_without_an_entry_reaches_the_store() -> None:
    core, edge, host = make_core({NOTIFY})
    assert host is not None
    relay = core.attach_producer("p", None, CAPACITY)
    delivery = core.deliver(
        relay, "d1", b"m", complete=True, settled=False, to="notify/new", deadline=None, now=NOW
    )
    assert edge.sent_to(host.links["notify/new"]) == [delivery]
    other = core.deliver(relay, "d2", b"m", complete=True, settled=False, to="plain", deadline=None, now=NOW)
    assert edge.outcome(other) == RELEASED, "other addresses are as before: no consumer, released"


def test_a_store_host_keeps_what_is_sent_to_its_queues_whatever_other_stores_there_are() -> None:
    core, edge, host = make_core({NOTIFY})
    assert host is not None
    producer = core.attach_producer("p", "notify/info", CAPACITY)
    core.remote_changed("notify/info", frozenset({"r2"}))  # another store host has a link on it too
    core.remote_changed("_store/prefix:notify", frozenset({"r2"}))
    assert core.entries["notify/info"].remote == frozenset()
    delivery = core.deliver(
        producer, "d1", b"m", complete=True, settled=False, to=None, deadline=None, now=NOW
    )
    assert edge.sent_to(host.links["notify/info"]) == [delivery]


def test_a_store_host_serves_only_the_rules_it_hosts() -> None:
    core, _, host = make_core({JOBS})
    assert host is not None
    core.attach_producer("p", "notify/info", CAPACITY)
    core.attach_producer("q", "jobs/a/todo", CAPACITY)
    assert list(host.links) == ["jobs/a/todo"]


def test_a_queue_stored_elsewhere_has_the_routers_storing_its_rule_as_remote() -> None:
    core, edge, _ = make_core()
    reachable: list[tuple[str, bool]] = []

    class Watching:
        def local_consumers(self, address: str, present: bool) -> None:
            pass

        def reachable(self, address: str, present: bool) -> None:
            reachable.append((address, present))

    core.watchers.append(Watching())
    early = core.attach_producer("p1", "notify/a", CAPACITY)
    assert edge.granted(early) == [], "no store anywhere yet: no credit"
    core.remote_changed("_store/prefix:notify", frozenset({"r2", "r3"}))
    assert core.entries["notify/a"].remote == {"r2", "r3"}
    assert edge.granted(early) == [CAPACITY]
    assert ("notify/a", True) in reachable
    # An entry created later takes them at once; other rules' queues do not.
    late = core.attach_producer("p2", "notify/b", CAPACITY)
    assert core.entries["notify/b"].remote == {"r2", "r3"}
    assert edge.granted(late) == [CAPACITY]
    core.attach_producer("p3", "jobs/x/todo", CAPACITY)
    assert core.entries["jobs/x/todo"].remote == frozenset()
    # The mesh's own view of a queue address does not override the stores'.
    core.remote_changed("notify/a", frozenset({"r2"}))
    assert core.entries["notify/a"].remote == {"r2", "r3"}
    core.remote_changed("_store/prefix:notify", frozenset({"r3"}))
    assert core.entries["notify/a"].remote == {"r3"}
    core.remote_changed("_store/prefix:notify", frozenset())
    assert core.entries["notify/a"].remote == frozenset()
    assert early in edge.withdrawals and late in edge.withdrawals
    assert ("notify/a", False) in reachable


def test_a_queue_entry_stored_elsewhere_is_forgotten_with_its_last_link() -> None:
    core, _, _ = make_core()
    producer = core.attach_producer("p", "notify/a", CAPACITY)
    core.detach_producer(producer)
    assert "notify/a" not in core.entries
    core.remote_changed("_store/prefix:notify", frozenset({"r2"}))
    assert "notify/a" not in core.entries, "a forgotten entry is not brought back by its rule's stores"


def test_the_stores_internal_addresses_are_balanced_whatever_the_rules_say() -> None:
    rules = DistributionRules(
        [
            AddressRule(prefix="_queue", distribution=Distribution.UNAVAILABLE),
            AddressRule(prefix="_store", distribution=Distribution.MULTICAST),
        ]
    )
    core = RouterCore(RecordingEdge(), rules, "test", "1", QUEUES)
    assert core.attach_consumer("c", "notify/a").entry.distribution is Distribution.BALANCED
    core.remote_changed("_store/prefix:notify", frozenset({"r2"}))
    assert core.entries["_store/prefix:notify"].distribution is Distribution.BALANCED
