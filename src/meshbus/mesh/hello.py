"""Neighbour discovery and liveness: who is at the far end of each inter-router link, and whether it lives.

Rules of this module:
1. A link is opened and closed by the edge (`link_up`, `link_down`); what is at its far end is learned only
   from hellos. The router at the far end is a *neighbour* once each side has heard the other: its hello on
   this link lists our id in `seen` (two-way).
2. A neighbour is lost when the edge closes the link (at once), when it is silent for `hello_timeout`, when
   its hellos stop listing us, or when another router (or a restarted one) speaks on the link.
3. Duplicate router ids are reported, never merged: a hello carrying our own id, or a second instance of a
   neighbour's id on another link while the first still speaks. The claimant is ignored; it is reported once
   both have spoken for longer than a time-out, so a restart whose old connection is not yet noticed dead is
   not mistaken for a duplicate (its old instance falls silent, and the new one is then accepted).
4. It returns events and the hellos to send; it never sends, and it never reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import DuplicateRouterId, Event, Link, NeighbourDown, NeighbourUp
from meshbus.mesh.messages import Hello


@dataclass(slots=True, eq=False)
class _LinkState:
    cost: int
    next_hello: float
    peer: str | None = None  # the router heard at the far end within the time-out
    peer_instance: int = 0
    heard_at: float = 0.0
    two_way: bool = False  # the peer hears us too: it is a neighbour on this link
    claimant: tuple[str, int] | None = None  # a refused (router id, instance) heard on this link
    claimed_since: float = 0.0


def _check_cost(link: Link, cost: int) -> int:
    if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
        raise ValueError(f"inter-router link {link!r}: cost must be an integer >= 1, got {cost!r}")
    return cost


class Neighbours:
    """The hello protocol on all of one router's inter-router links."""

    def __init__(self, router_id: str, instance: int, config: MeshConfig) -> None:
        self.router_id = router_id
        self.instance = instance
        self._config = config
        self._links: dict[Link, _LinkState] = {}
        # Cached for the node, which reads them after every event: exact after due_hellos (the deadline may be
        # early in between, which costs an idle tick at most); the neighbours until a two-way state changes.
        self._deadline = float("inf")
        self._adjacent: dict[str, tuple[Link, int]] | None = None

    # -- the edge's events ---------------------------------------------------------------------------

    def link_up(self, link: Link, cost: int, now: float) -> None:
        if link in self._links:
            raise ValueError(f"inter-router link {link!r} is already up")
        self._links[link] = _LinkState(_check_cost(link, cost), next_hello=now)
        self._deadline = min(self._deadline, now)

    def link_down(self, link: Link) -> list[Event]:
        events = self._forget(self._state(link), link, "connection closed")
        del self._links[link]
        return events

    def set_cost(self, link: Link, cost: int) -> None:
        self._state(link).cost = _check_cost(link, cost)
        self._adjacent = None

    def receive(self, link: Link, hello: Hello, now: float) -> list[Event]:
        state = self._state(link)
        if hello.router_id == self.router_id:
            detail = (
                "this router is connected to itself"
                if hello.instance == self.instance
                else f"another router (instance {hello.instance}) says hello on link {link!r}; it is ignored"
            )
            return [DuplicateRouterId(hello.router_id, hello.instance, detail)]
        rival = self._rival(link, hello, now)
        if rival is not None:
            return self._refuse(state, link, rival, hello, now)
        events: list[Event] = []
        state.claimant = None
        if state.peer is not None and (state.peer, state.peer_instance) != (hello.router_id, hello.instance):
            events += self._forget(state, link, f"replaced by {hello.router_id} (instance {hello.instance})")
        if state.peer is None:
            state.peer, state.peer_instance = hello.router_id, hello.instance
            state.next_hello = now  # answer at once, so that the far end hears us without waiting an interval
            self._deadline = min(self._deadline, now)
        state.heard_at = now
        two_way = self.router_id in hello.seen
        if two_way and not state.two_way:
            events.append(NeighbourUp(hello.router_id, link, state.cost))
        elif state.two_way and not two_way:
            events.append(NeighbourDown(hello.router_id, link, "it no longer hears this router"))
        if two_way != state.two_way:
            state.two_way = two_way
            self._adjacent = None
        return events

    # -- time ----------------------------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """Forget the peers silent for the hello time-out."""
        events: list[Event] = []
        timeout = self._config.hello_timeout
        for link, state in self._links.items():
            if state.peer is not None and state.heard_at + timeout <= now:  # as in next_deadline
                events += self._forget(state, link, f"silent for {timeout:g} s")
        return events

    def due_hellos(self, now: float) -> list[tuple[Link, Hello]]:
        due = []
        deadline = float("inf")
        for link, state in self._links.items():
            if state.next_hello <= now:
                state.next_hello = now + self._config.hello_interval
                due.append((link, Hello(self.router_id, self.instance, (state.peer,) if state.peer else ())))
            deadline = min(deadline, state.next_hello)
            if state.peer is not None:
                deadline = min(deadline, state.heard_at + self._config.hello_timeout)
        self._deadline = deadline
        return due

    def next_deadline(self) -> float:
        """No later than when `due_hellos` or `expire` next has something to do."""
        return self._deadline

    # -- what the rest of the mesh reads -------------------------------------------------------------

    def peer(self, link: Link) -> str | None:
        """The neighbour at the far end of the link, if it is one (two-way)."""
        state = self._state(link)
        return state.peer if state.two_way else None

    def adjacent(self) -> Mapping[str, tuple[Link, int]]:
        """Each neighbour with the link to use for it: the cheapest of its links, the oldest among equals."""
        if self._adjacent is None:
            best: dict[str, tuple[Link, int]] = {}
            for link, state in self._links.items():
                if state.two_way and state.peer is not None:
                    known = best.get(state.peer)
                    if known is None or state.cost < known[1]:
                        best[state.peer] = (link, state.cost)
            self._adjacent = best
        return self._adjacent

    # -- helpers -------------------------------------------------------------------------------------

    def _state(self, link: Link) -> _LinkState:
        state = self._links.get(link)
        if state is None:
            raise ValueError(f"inter-router link {link!r} is not up (link_up first)")
        return state

    def _forget(self, state: _LinkState, link: Link, reason: str) -> list[Event]:
        events: list[Event] = []
        if state.two_way and state.peer is not None:
            events.append(NeighbourDown(state.peer, link, reason))
            self._adjacent = None
        state.peer, state.peer_instance, state.two_way = None, 0, False
        return events

    def _rival(self, link: Link, hello: Hello, now: float) -> _LinkState | None:
        """Another link whose live peer has the hello's router id but another instance."""
        for other, state in self._links.items():
            if (
                other != link
                and state.peer == hello.router_id
                and state.peer_instance != hello.instance
                and state.heard_at + self._config.hello_timeout > now
            ):
                return state
        return None

    def _refuse(
        self, state: _LinkState, link: Link, rival: _LinkState, hello: Hello, now: float
    ) -> list[Event]:
        claimant = (hello.router_id, hello.instance)
        if state.claimant != claimant:
            state.claimant, state.claimed_since = claimant, now
            return []
        if now - state.claimed_since < self._config.hello_timeout:
            return []  # maybe a restart: the old instance may still fall silent
        return [
            DuplicateRouterId(
                hello.router_id,
                hello.instance,
                f"instance {hello.instance} says hello on link {link!r} while instance {rival.peer_instance} "
                "still does on another link; the first is kept",
            )
        ]
