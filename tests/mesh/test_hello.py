"""The hello protocol on its own: two-way discovery, liveness, restarts and duplicate router ids."""

from __future__ import annotations

import pytest

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import DuplicateRouterId, NeighbourDown, NeighbourUp
from meshbus.mesh.hello import Neighbours
from meshbus.mesh.messages import Hello

CONFIG = MeshConfig(hello_interval=0.5, hello_timeout=1.5)


def neighbours_of_a() -> Neighbours:
    neighbours = Neighbours("a", 100, CONFIG)
    neighbours.link_up("L1", 2, 0.0)
    return neighbours


def meet(neighbours: Neighbours, link: str = "L1", router: str = "b", instance: int = 200, now: float = 0.0):
    """b says hello (not hearing a yet), then again hearing a: the events of the second hello."""
    assert neighbours.receive(link, Hello(router, instance), now) == []
    return neighbours.receive(link, Hello(router, instance, ("a",)), now)


def test_a_neighbour_is_up_once_each_hears_the_other() -> None:
    neighbours = neighbours_of_a()
    assert neighbours.due_hellos(0.0) == [("L1", Hello("a", 100, ()))]
    assert neighbours.receive("L1", Hello("b", 200), 0.1) == []
    assert neighbours.peer("L1") is None  # b does not hear a yet
    assert neighbours.due_hellos(0.1) == [("L1", Hello("a", 100, ("b",)))]  # answered at once, not in 0.5 s
    assert neighbours.receive("L1", Hello("b", 200, ("a",)), 0.2) == [NeighbourUp("b", "L1", 2)]
    assert neighbours.peer("L1") == "b"
    assert neighbours.adjacent() == {"b": ("L1", 2)}
    assert neighbours.receive("L1", Hello("b", 200, ("a",)), 0.7) == []


def test_hellos_go_every_interval() -> None:
    neighbours = neighbours_of_a()
    assert len(neighbours.due_hellos(0.0)) == 1
    assert neighbours.due_hellos(0.4) == []
    assert neighbours.next_deadline() == 0.5
    assert len(neighbours.due_hellos(0.5)) == 1


def test_a_silent_neighbour_is_lost_after_the_timeout() -> None:
    neighbours = neighbours_of_a()
    meet(neighbours, now=1.0)
    neighbours.due_hellos(1.0)
    assert neighbours.next_deadline() == 1.5  # the next hello; the silence deadline is 2.5
    assert neighbours.expire(2.49) == []
    assert neighbours.expire(2.5) == [NeighbourDown("b", "L1", "silent for 1.5 s")]
    assert neighbours.peer("L1") is None
    assert neighbours.adjacent() == {}
    assert neighbours.due_hellos(2.5) == [("L1", Hello("a", 100, ()))]  # no longer lists b


def test_a_closed_link_loses_its_neighbour_at_once() -> None:
    neighbours = neighbours_of_a()
    meet(neighbours)
    assert neighbours.link_down("L1") == [NeighbourDown("b", "L1", "connection closed")]
    assert neighbours.due_hellos(0.1) == []
    assert neighbours.next_deadline() == float("inf")
    with pytest.raises(ValueError, match="link 'L1' is not up"):
        neighbours.receive("L1", Hello("b", 200, ("a",)), 0.1)


def test_a_neighbour_that_stops_hearing_us_is_lost() -> None:
    neighbours = neighbours_of_a()
    meet(neighbours)
    assert neighbours.receive("L1", Hello("b", 200), 0.5) == [
        NeighbourDown("b", "L1", "it no longer hears this router")
    ]


def test_another_router_on_the_link_replaces_the_neighbour() -> None:
    neighbours = neighbours_of_a()
    meet(neighbours)
    assert neighbours.receive("L1", Hello("b", 201, ("a",)), 0.5) == [
        NeighbourDown("b", "L1", "replaced by b (instance 201)"),
        NeighbourUp("b", "L1", 2),
    ]


def test_parallel_links_use_the_cheapest() -> None:
    neighbours = neighbours_of_a()
    neighbours.link_up("L2", 1, 0.0)
    meet(neighbours, "L1")
    meet(neighbours, "L2")
    assert neighbours.adjacent() == {"b": ("L2", 1)}
    neighbours.set_cost("L1", 1)
    assert neighbours.adjacent() == {"b": ("L1", 1)}  # the oldest among equals


def test_costs_and_links_are_checked() -> None:
    neighbours = neighbours_of_a()
    with pytest.raises(ValueError, match="link 'L1' is already up"):
        neighbours.link_up("L1", 1, 0.0)
    with pytest.raises(ValueError, match="link 'L2': cost must be an integer >= 1, got 0"):
        neighbours.link_up("L2", 0, 0.0)
    with pytest.raises(ValueError, match="cost must be an integer"):
        neighbours.set_cost("L1", 1.5)  # type: ignore[arg-type]


def test_a_hello_with_our_own_id_is_a_duplicate() -> None:
    neighbours = neighbours_of_a()
    [event] = neighbours.receive("L1", Hello("a", 999, ("a",)), 0.0)
    assert event == DuplicateRouterId(
        "a", 999, "another router (instance 999) says hello on link 'L1'; it is ignored"
    )
    assert "duplicate router id 'a'" in str(event) and "give each router a unique [router] id" in str(event)
    assert neighbours.adjacent() == {}
    [event] = neighbours.receive("L1", Hello("a", 100, ("a",)), 0.0)
    assert event.detail == "this router is connected to itself"  # type: ignore[union-attr]


def test_two_live_instances_of_one_id_are_reported_not_merged() -> None:
    neighbours = neighbours_of_a()
    neighbours.link_up("L2", 1, 0.0)
    meet(neighbours, "L1", instance=200)
    now = 0.0
    reported = []
    while now < 3.0:  # both instances of b keep saying hello
        now += 0.5
        assert neighbours.receive("L1", Hello("b", 200, ("a",)), now) == []
        reported += neighbours.receive("L2", Hello("b", 300, ("a",)), now)
    assert neighbours.adjacent() == {"b": ("L1", 2)}  # the first one stays, the claimant is ignored
    assert reported and all(isinstance(event, DuplicateRouterId) for event in reported)
    assert reported[0].instance == 300  # type: ignore[union-attr]
    first_report = 0.5 + CONFIG.hello_timeout
    assert len(reported) == round((3.0 - first_report) / 0.5) + 1


def test_a_restart_is_not_a_duplicate() -> None:
    """b restarts: its new instance comes on a new link while the old link still looks open."""
    neighbours = neighbours_of_a()
    neighbours.link_up("L2", 1, 0.0)
    meet(neighbours, "L1", instance=200)
    events = []
    for now in (0.5, 1.0, 1.5, 2.0):
        events += neighbours.expire(now)
        events += neighbours.receive("L2", Hello("b", 300, ("a",)), now)
    assert events == [NeighbourDown("b", "L1", "silent for 1.5 s"), NeighbourUp("b", "L2", 1)]
    assert neighbours.adjacent() == {"b": ("L2", 1)}
