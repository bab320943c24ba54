"""Link state: every router's neighbours and link costs, versioned, in one database per router.

Rules of this module:
1. This router's own link state is set from its neighbours (`originate`); a change raises its seq and gives
   the update to flood. Another router's state is replaced only by a newer version (`receive`): a later
   instance (that router restarted, so its seq starts again) or a later seq of the same instance.
2. Flooding rule (node.py applies it): an update that `receive` finds NEWER is sent on to every neighbour but
   the one it came from; anything else stops here. Each router floods each version at most once, so a flood
   ends whatever the shape of the mesh.
3. An update with our own id and a version above ours comes from another live router using our id
   (CLAIMS_OUR_ID: the node reports a duplicate); one below ours is a stale copy of our previous life (KNOWN).
4. `graph()` keeps only the links both ends report, at the larger of the two ends' costs. Both ends thus see
   the same symmetric graph, which the multicast trees rely on (path.py), and a cost raised on one end only
   (say, on the connector) takes effect whatever the other end says.
5. It never sends and never reads a clock; when an unreachable router's state is forgotten is node.py's rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from meshbus.mesh.messages import LinkStateUpdate, Version, newer

Graph = dict[str, dict[str, int]]  # router -> neighbour -> cost, symmetric


class Verdict(Enum):
    NEWER = "newer"  # stored: flood it on
    KNOWN = "known"  # this version or a later one is here already: drop it
    CLAIMS_OUR_ID = "claims our id"  # another live router uses our id


@dataclass(slots=True, eq=False)
class _State:
    instance: int
    seq: int
    links: dict[str, int]  # neighbour -> cost, as the origin sees them


class LinkStateDatabase:
    """The link states of all routers known here, this router's own included."""

    def __init__(self, router_id: str, instance: int) -> None:
        self.router_id = router_id
        self._states = {router_id: _State(instance, 0, {})}

    def originate(self, links: Mapping[str, int]) -> LinkStateUpdate | None:
        """Set our own links (neighbour -> cost); the update to flood if they changed."""
        own = self._states[self.router_id]
        if own.links == links:
            return None
        own.seq += 1
        own.links = dict(links)
        return self.update_for(self.router_id)

    def receive(self, update: LinkStateUpdate) -> Verdict:
        version = (update.instance, update.seq)
        if update.origin == self.router_id:
            return Verdict.CLAIMS_OUR_ID if newer(version, self.version(self.router_id)) else Verdict.KNOWN
        if not newer(version, self.version(update.origin)):
            return Verdict.KNOWN
        self._states[update.origin] = _State(update.instance, update.seq, dict(update.links))
        return Verdict.NEWER

    def version(self, origin: str) -> Version | None:
        state = self._states.get(origin)
        return None if state is None else (state.instance, state.seq)

    def update_for(self, origin: str) -> LinkStateUpdate | None:
        """Our copy of the origin's link state, as an update (the answer to a request)."""
        state = self._states.get(origin)
        if state is None:
            return None
        return LinkStateUpdate(origin, state.instance, state.seq, tuple(sorted(state.links.items())))

    def origins(self) -> Collection[str]:
        return self._states.keys()

    def remove(self, origin: str) -> None:
        if origin == self.router_id:
            raise ValueError(f"router {origin}: its own link state cannot be removed")
        self._states.pop(origin, None)

    def graph(self) -> Graph:
        """The links both ends report, each at the larger of its two ends' costs."""
        graph: Graph = {}
        for origin, state in self._states.items():
            edges: dict[str, int] = {}
            graph[origin] = edges
            for neighbour, cost in state.links.items():
                far = self._states.get(neighbour)
                back = far.links.get(origin) if far is not None else None
                if back is not None:
                    edges[neighbour] = max(cost, back)
        return graph
