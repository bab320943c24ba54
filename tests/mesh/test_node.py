"""One MeshNode fed events by hand, its actions read from a recording Outbox: the node's own rules."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import DuplicateRouterId, Event, Link, NeighbourUp, RouterReachable
from meshbus.mesh.messages import (
    Hello,
    LinkStateRequest,
    LinkStateUpdate,
    Message,
    MobileAddressRequest,
    MobileAddressUpdate,
    RouterAdvertisement,
    Summary,
)
from meshbus.mesh.node import MeshNode, RoutingTable
from meshbus.mesh.path import Route

CONFIG = MeshConfig()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[Link, Message]] = []
        self.tables: list[RoutingTable] = []
        self.changes: list[Mapping[str, frozenset[str]]] = []
        self.events: list[Event] = []

    def send(self, link: Link, message: Message) -> None:
        self.sent.append((link, message))

    def routes_changed(self, table: RoutingTable) -> None:
        self.tables.append(table)

    def addresses_changed(self, changes: Mapping[str, frozenset[str]]) -> None:
        self.changes.append(changes)

    def report(self, event: Event) -> None:
        self.events.append(event)

    def take(self) -> list[tuple[Link, Message]]:
        sent, self.sent = self.sent, []
        return sent


def node_a() -> tuple[MeshNode, Recorder]:
    recorder = Recorder()
    return MeshNode("a", 1, CONFIG, recorder, random.Random(0)), recorder


def neighbour_b(node: MeshNode, recorder: Recorder, link: str = "L1", now: float = 0.0) -> None:
    """Make b (instance 2) a neighbour of a on the link."""
    node.link_up(link, 1, now)
    node.handle(link, Hello("b", 2, ("a",)), now)
    recorder.take()


def test_a_new_link_gets_a_hello_at_once_then_every_interval() -> None:
    node, recorder = node_a()
    node.link_up("L1", 1, 10.0)
    assert recorder.take() == [("L1", Hello("a", 1, ()))]
    assert node.next_tick() == 10.0 + CONFIG.hello_interval
    node.tick(10.2)
    assert recorder.take() == []
    node.tick(node.next_tick())
    assert recorder.take() == [("L1", Hello("a", 1, ()))]


def test_a_new_neighbour_hears_our_hello_then_our_summary() -> None:
    node, recorder = node_a()
    node.link_up("L1", 1, 0.0)
    recorder.take()
    node.handle("L1", Hello("b", 2, ("a",)), 0.1)
    assert recorder.take() == [
        ("L1", Hello("a", 1, ("b",))),
        ("L1", RouterAdvertisement((Summary("a", 1, 0, 0),))),
    ]
    assert recorder.events == [NeighbourUp("b", "L1", 1)]
    assert node.next_tick() == 0.1 + CONFIG.batch_delay


def test_a_summary_makes_us_ask_for_what_is_newer_once_per_neighbour() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    neighbour_b(node, recorder, "L2")  # a second link to b, less used
    summary = RouterAdvertisement((Summary("b", 2, 3, 2), Summary("c", 3, 1, 0), Summary("d", 4, 0, 0)))
    node.handle("L1", summary, 1.0)
    assert recorder.take() == [("L1", LinkStateRequest(("b", "c"))), ("L1", MobileAddressRequest(("b",)))]
    node.handle("L1", summary, 1.5)
    assert recorder.take() == []  # asked already, the answer may be on its way
    node.handle("L2", summary, 1.5)
    assert len(recorder.take()) == 2  # another link may be asked
    node.handle("L1", summary, 1.0 + CONFIG.request_timeout)
    assert len(recorder.take()) == 2  # no answer within the time-out: ask again


def test_requests_are_answered_from_the_database() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    node.local_address_added("x", 0.0)
    node.tick(CONFIG.batch_delay)
    recorder.take()
    node.handle("L1", LinkStateRequest(("a", "unknown")), 1.0)
    node.handle("L1", MobileAddressRequest(("a", "unknown")), 1.0)
    assert recorder.take() == [
        ("L1", LinkStateUpdate("a", 1, 1, (("b", 1),))),
        ("L1", MobileAddressUpdate("a", 1, 1, exist=("x",))),
    ]


def test_our_changes_wait_for_the_batch_and_go_as_one_update() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    node.tick(CONFIG.batch_delay)
    recorder.take()
    node.local_address_added("x", 0.1)
    node.local_address_added("y", 0.101)
    assert recorder.take() == []
    assert node.next_tick() == 0.1 + CONFIG.batch_delay
    node.tick(node.next_tick())
    assert recorder.take() == [("L1", MobileAddressUpdate("a", 1, 1, added=("x", "y")))]


def test_only_neighbours_are_listened_to() -> None:
    node, recorder = node_a()
    node.link_up("L1", 1, 0.0)
    node.handle("L1", Hello("b", 2), 0.0)  # b does not hear us yet
    recorder.take()
    node.handle("L1", LinkStateUpdate("b", 2, 1, (("a", 1),)), 0.1)
    node.handle("L1", LinkStateRequest(("a",)), 0.1)
    assert recorder.take() == []
    assert node.known_routers() == {"a"}
    with pytest.raises(ValueError, match="link 'L9' is not up"):
        node.handle("L9", Hello("b", 2), 0.1)


def test_routes_are_published_when_they_change() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    node.handle("L1", LinkStateUpdate("b", 2, 1, (("a", 3),)), 0.001)
    node.tick(CONFIG.batch_delay)
    [table] = recorder.tables
    assert table.routes == {"b": Route(3, ("b",))} and table.links == {"b": "L1"}
    assert RouterReachable("b", 3) in recorder.events
    assert ("L1", RouterAdvertisement((Summary("b", 2, 1, 0),))) in recorder.take()  # b: what we hold of b
    node.handle("L1", LinkStateUpdate("b", 2, 2, (("a", 3), ("c", 1))), 1.0)  # c does not report b yet
    node.tick(1.0 + CONFIG.batch_delay)
    assert len(recorder.tables) == 1


def test_a_lost_neighbour_changes_the_routes_at_once_not_after_the_batch_delay() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    node.handle("L1", LinkStateUpdate("b", 2, 1, (("a", 1),)), 0.0)
    node.tick(CONFIG.batch_delay)
    assert node.table.routes == {"b": Route(1, ("b",))}
    node.link_down("L1", 1.0)
    assert node.next_tick() <= 1.0  # due now, not at 1.0 + batch_delay
    node.tick(1.0)
    assert node.table.routes == {}


def test_a_gap_in_address_updates_asks_the_neighbour_that_sent_it() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    node.handle("L1", MobileAddressUpdate("c", 3, 2, added=("x",)), 0.5)
    assert recorder.take() == [("L1", MobileAddressRequest(("c",)))]


def test_claims_on_our_id_are_reported_once() -> None:
    node, recorder = node_a()
    neighbour_b(node, recorder)
    for now in (1.0, 2.0):
        node.handle("L1", RouterAdvertisement((Summary("a", 7, 1, 0),)), now)
        node.handle("L1", LinkStateUpdate("a", 7, 3, ()), now)
    [event] = [e for e in recorder.events if isinstance(e, DuplicateRouterId)]
    assert event.router_id == "a" and event.instance == 7
    assert "ahead of this router's own state" in event.detail
