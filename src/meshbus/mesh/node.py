"""The mesh node: one router's routing protocol, tying hello, link state, paths and mobile addresses together.

Rules of this module:
1. The edge drives it: `link_up`, `link_cost`, `link_down` for its inter-router links, `handle` for each
   protocol message received on one, `local_address_added` / `local_address_removed` from the router core's
   address table, and `tick` no later than `next_tick()`. Time is the `now` passed in (a monotonic clock, in
   seconds); randomness comes from the injected `random.Random` (it only spreads advertisements in time).
2. Actions go out through the `Outbox` the edge implements: `send` a message on a link, `routes_changed`
   with a new `RoutingTable`, `addresses_changed` with the addresses whose routers changed, `report` an event
   for the operator's log.
3. Messages and link events change the state and flood at once. What gains from batching waits
   `batch_delay` for a tick: our own link-state and address updates, and the route computation; except
   after a lost neighbour, whose tick is due at once.
4. Only neighbours (two-way links) are listened to: any message but a hello from another link is dropped.
5. Purge rule: a router unreachable from here whose state has not changed for `purge_after` is forgotten,
   link state and addresses. Until then its state helps a healing partition converge without asking.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meshbus.mesh import linkstate, mobile
from meshbus.mesh.config import MeshConfig
from meshbus.mesh.events import (
    DuplicateRouterId,
    Event,
    Link,
    NeighbourDown,
    NeighbourUp,
    RouterReachable,
    RouterUnreachable,
)
from meshbus.mesh.hello import Neighbours
from meshbus.mesh.linkstate import LinkStateDatabase
from meshbus.mesh.messages import (
    Hello,
    LinkStateRequest,
    LinkStateUpdate,
    Message,
    MobileAddressRequest,
    MobileAddressUpdate,
    RouterAdvertisement,
    Summary,
    newer,
)
from meshbus.mesh.mobile import Changes, MobileAddresses
from meshbus.mesh.path import Route, compute_paths

_NEVER = float("inf")


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """What the forwarding layer needs, as of the last route computation."""

    router_id: str
    routes: Mapping[str, Route]  # every reachable router but this one: cost and next hops (neighbour ids)
    multicast: Mapping[str, frozenset[str]]  # source router -> the neighbours to forward its multicast to
    links: Mapping[str, Link]  # neighbour -> the inter-router link to send it on

    def link_to(self, router_id: str) -> Link | None:
        """The link to send on toward a router, by its canonical next hop (None: not reachable)."""
        route = self.routes.get(router_id)
        return None if route is None else self.links[route.next_hops[0]]

    def multicast_links(self, source: str) -> list[Link]:
        """The links to forward a multicast message on; `source` is the router where it entered the mesh."""
        return [self.links[neighbour] for neighbour in sorted(self.multicast.get(source, ()))]


class Outbox(Protocol):
    """What the mesh asks of the edge."""

    def send(self, link: Link, message: Message) -> None:
        """Send the message on the inter-router link (a flood passes one message object to many links)."""

    def routes_changed(self, table: RoutingTable) -> None:
        """The routes, multicast trees or neighbour links changed: forward by this table from now on."""

    def addresses_changed(self, changes: Mapping[str, frozenset[str]]) -> None:
        """These addresses now have consumers on exactly these other routers (an empty set: on none)."""

    def report(self, event: Event) -> None:
        """Something the operator should see in the log."""


class MeshNode:
    """The routing protocol of one router."""

    def __init__(
        self, router_id: str, instance: int, config: MeshConfig, outbox: Outbox, rng: random.Random
    ) -> None:
        self.router_id = router_id
        self.instance = instance
        self._config = config
        self._outbox = outbox
        self._rng = rng
        self._neighbours = Neighbours(router_id, instance, config)
        self._linkstate = LinkStateDatabase(router_id, instance)
        self._mobile = MobileAddresses(router_id, instance)
        self._table = RoutingTable(router_id, {}, {router_id: frozenset()}, {})
        self._batch_at: float | None = None  # when the batched work is due
        self._graph_changed = False  # since the last route computation
        self._advertise_at: dict[Link, float] = {}  # neighbour link -> when it next gets our summary
        # (request op, origin) -> neighbour link asked -> when: one request per neighbour, so that an answer
        # lost with its link does not keep us from asking another
        self._asked: dict[tuple[str, str], dict[Link, float]] = {}
        self._unreachable_since: dict[str, float] = {}  # known router -> since when unreachable and unchanged
        self._timers_due = _NEVER  # the next summary or purge; exact after a tick, maybe early in between
        self._reported: set[tuple[str, int]] = set()  # (router id, instance) claims reported already

    # -- what the edge and management read ----------------------------------------------------------

    @property
    def table(self) -> RoutingTable:
        return self._table

    def addresses(self) -> dict[str, frozenset[str]]:
        """Every address with consumers on other reachable routers, with those routers."""
        return self._mobile.view()

    def routers_for(self, address: str) -> frozenset[str]:
        return self._mobile.routers(address)

    def known_routers(self) -> set[str]:
        """The routers whose state is held here, reachable or not (yet) purged, this one included."""
        return {*self._linkstate.origins(), *self._mobile.origins()}

    def next_tick(self) -> float:
        """No later than when `tick` next has something to do (possibly already past): call it then."""
        batch = _NEVER if self._batch_at is None else self._batch_at
        return min(self._neighbours.next_deadline(), self._timers_due, batch)

    # -- the edge's events ---------------------------------------------------------------------------

    def link_up(self, link: Link, cost: int, now: float) -> None:
        """An inter-router link opened (its messages flow both ways); `cost` is this end's cost for it."""
        self._neighbours.link_up(link, cost, now)
        self._send_hellos(now)

    def link_cost(self, link: Link, cost: int, now: float) -> None:
        self._neighbours.set_cost(link, cost)
        self._schedule(now)

    def link_down(self, link: Link, now: float) -> None:
        """The inter-router link closed or its connection was lost."""
        self._react(self._neighbours.link_down(link), now)

    def local_address_added(self, address: str, now: float) -> None:
        """The address gained its first consumer on this router."""
        self._mobile.add_local(address)
        self._schedule(now)

    def local_address_removed(self, address: str, now: float) -> None:
        """The address lost its last consumer on this router."""
        self._mobile.remove_local(address)
        self._schedule(now)

    def handle(self, link: Link, message: Message, now: float) -> None:
        """A protocol message arrived on an inter-router link."""
        if isinstance(message, Hello):
            events = self._neighbours.receive(link, message, now)
            self._send_hellos(now)  # first: a new neighbour must hear our hello before our summary
            self._react(events, now)
            return
        sender = self._neighbours.peer(link)
        if sender is None:
            return
        match message:
            case LinkStateUpdate():
                self._on_link_state(message, sender, now)
            case MobileAddressUpdate():
                self._on_addresses(link, message, sender, now)
            case RouterAdvertisement():
                self._on_advertisement(link, message, now)
            case LinkStateRequest(router_ids):
                self._answer(link, (self._linkstate.update_for(origin) for origin in router_ids))
            case MobileAddressRequest(router_ids):
                self._answer(link, (self._mobile.full_update(origin) for origin in router_ids))

    def tick(self, now: float) -> None:
        self._react(self._neighbours.expire(now), now)
        self._send_hellos(now)
        self._advertise(now)
        if self._batch_at is not None and self._batch_at <= now:
            self._batch_at = None
            self._originate()
            if self._graph_changed:
                self._compute(now)
        self._purge(now)
        self._timers_due = min(
            min(self._advertise_at.values(), default=_NEVER),
            min(self._unreachable_since.values(), default=_NEVER) + self._config.purge_after,
        )

    # -- neighbours ----------------------------------------------------------------------------------

    def _react(self, events: list[Event], now: float) -> None:
        for event in events:
            match event:
                case NeighbourUp(link=link):
                    self._schedule(now)
                    self._outbox.send(link, self._summary())
                    self._advertise_at[link] = now + self._advertise_delay()
                    self._timers_due = min(self._timers_due, self._advertise_at[link])
                case NeighbourDown(router_id=neighbour, link=link):
                    # Not batched: what would go on that link has nowhere to go until routes change.
                    self._batch_at = now
                    self._advertise_at.pop(link, None)
                    other = self._neighbours.adjacent().get(neighbour)
                    if other is not None:  # still a neighbour: what the lost link carried may be lost too
                        self._outbox.send(other[0], self._summary())
                case DuplicateRouterId():
                    self._duplicate(event)
                    continue
            self._outbox.report(event)

    def _send_hellos(self, now: float) -> None:
        for link, hello in self._neighbours.due_hellos(now):
            self._outbox.send(link, hello)

    def _duplicate(self, event: DuplicateRouterId) -> None:
        claim = (event.router_id, event.instance)
        if claim not in self._reported:
            self._reported.add(claim)
            self._outbox.report(event)

    # -- updates, requests and summaries -------------------------------------------------------------

    def _on_link_state(self, update: LinkStateUpdate, sender: str, now: float) -> None:
        verdict = self._linkstate.receive(update)
        if verdict is linkstate.Verdict.CLAIMS_OUR_ID:
            self._duplicate(self._claim(update.instance, f"a link-state update at seq {update.seq}"))
        elif verdict is linkstate.Verdict.NEWER:
            self._asked.pop((LinkStateRequest.OP, update.origin), None)
            self._graph_changed = True
            self._schedule(now)
            self._refreshed(update.origin, now)
            self._addresses_changed(self._mobile.drop_older(update.origin, update.instance))
            self._flood(update, sender)

    def _on_addresses(self, link: Link, update: MobileAddressUpdate, sender: str, now: float) -> None:
        verdict, changes = self._mobile.receive(update)
        if verdict is mobile.Verdict.CLAIMS_OUR_ID:
            self._duplicate(self._claim(update.instance, f"an address update at seq {update.seq}"))
        elif verdict is mobile.Verdict.GAP:
            self._ask(link, MobileAddressRequest, [update.origin], now)
        elif verdict is mobile.Verdict.APPLIED:
            self._asked.pop((MobileAddressRequest.OP, update.origin), None)
            self._refreshed(update.origin, now)
            self._addresses_changed(changes)
            self._flood(update, sender)

    def _on_advertisement(self, link: Link, advertisement: RouterAdvertisement, now: float) -> None:
        """Ask the neighbour for whatever it has newer than we do."""
        want_links, want_addresses = [], []
        for entry in advertisement.entries:
            links_version = (entry.instance, entry.ls_seq)
            addresses_version = (entry.instance, entry.mobile_seq)
            if entry.router_id == self.router_id:
                if newer(links_version, self._linkstate.version(self.router_id)) or newer(
                    addresses_version, self._mobile.version(self.router_id)
                ):
                    self._duplicate(self._claim(entry.instance, "a neighbour's summary"))
                continue
            # A router at seq 0 has no links (no addresses) yet: nothing to ask, unless ours are from an older
            # life, which the comparison with (instance, 0) catches.
            if newer(links_version, self._linkstate.version(entry.router_id) or (entry.instance, 0)):
                want_links.append(entry.router_id)
            if newer(addresses_version, self._mobile.version(entry.router_id) or (entry.instance, 0)):
                want_addresses.append(entry.router_id)
        self._ask(link, LinkStateRequest, want_links, now)
        self._ask(link, MobileAddressRequest, want_addresses, now)

    def _ask(
        self,
        link: Link,
        request: type[LinkStateRequest] | type[MobileAddressRequest],
        origins: Iterable[str],
        now: float,
    ) -> None:
        """Ask the neighbour for these origins' state, unless it was asked within the request time-out."""
        fresh = []
        for origin in origins:
            asked = self._asked.setdefault((request.OP, origin), {})
            if asked.get(link, -_NEVER) + self._config.request_timeout <= now:
                asked[link] = now
                fresh.append(origin)
        if fresh:
            self._outbox.send(link, request(tuple(fresh)))

    def _answer(self, link: Link, updates: Iterable[LinkStateUpdate | MobileAddressUpdate | None]) -> None:
        for update in updates:
            if update is not None:
                self._outbox.send(link, update)

    def _summary(self, routers: Iterable[str] | None = None) -> RouterAdvertisement:
        """Our versions of these routers; by default, of ourselves and of every router we reach."""
        entries = []
        for router in (self.router_id, *self._table.routes) if routers is None else routers:
            links_version = self._linkstate.version(router)
            if links_version is None:
                continue
            addresses_version = self._mobile.version(router)
            mobile_seq = (
                addresses_version[1] if addresses_version and addresses_version[0] == links_version[0] else 0
            )
            entries.append(Summary(router, links_version[0], links_version[1], mobile_seq))
        return RouterAdvertisement(tuple(entries))

    def _advertise(self, now: float) -> None:
        due = [link for link, at in self._advertise_at.items() if at <= now]
        if due:
            summary = self._summary()
            for link in due:
                self._outbox.send(link, summary)
                self._advertise_at[link] = now + self._advertise_delay()

    def _advertise_delay(self) -> float:
        return self._config.advertise_interval * self._rng.uniform(0.75, 1.0)

    def _flood(self, message: Message, source: str | None) -> None:
        """Send the message to every neighbour but the one it came from."""
        for neighbour, (link, _) in self._neighbours.adjacent().items():
            if neighbour != source:
                self._outbox.send(link, message)

    def _claim(self, instance: int, what: str) -> DuplicateRouterId:
        return DuplicateRouterId(
            self.router_id,
            instance,
            f"{what} from instance {instance} is ahead of this router's own state, so the other routers "
            "follow that router",
        )

    # -- batched work --------------------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        if self._batch_at is None:
            self._batch_at = now + self._config.batch_delay

    def _originate(self) -> None:
        costs = {neighbour: cost for neighbour, (_, cost) in self._neighbours.adjacent().items()}
        links_update = self._linkstate.originate(costs)
        if links_update is not None:
            self._graph_changed = True
            self._flood(links_update, None)
        addresses_update = self._mobile.originate()
        if addresses_update is not None:
            self._flood(addresses_update, None)

    def _compute(self, now: float) -> None:
        self._graph_changed = False
        graph = self._linkstate.graph()
        paths = compute_paths(graph, self.router_id)
        near = graph.get(self.router_id, {})
        links = {
            neighbour: link
            for neighbour, (link, _) in self._neighbours.adjacent().items()
            if neighbour in near
        }
        table = RoutingTable(self.router_id, paths.routes, paths.multicast, links)
        before, self._table = self._table, table
        for router in sorted(before.routes.keys() - table.routes.keys()):
            self._outbox.report(RouterUnreachable(router))
        arrived = sorted(table.routes.keys() - before.routes.keys())
        for router in arrived:
            self._outbox.report(RouterReachable(router, table.routes[router].cost))
        if arrived:
            # Our neighbours heard of these routers' state only if it changed while they were our neighbours
            # or if we could reach them when they became neighbours: tell them what we hold.
            self._flood(self._summary(arrived), None)
        if table != before:
            self._outbox.routes_changed(table)
        reachable = {}
        for router in table.routes:
            version = self._linkstate.version(router)
            if version is not None:
                reachable[router] = version[0]
        self._addresses_changed(self._mobile.count(reachable))
        for router in self.known_routers() - {self.router_id}:
            if router in table.routes:
                self._unreachable_since.pop(router, None)
            else:
                self._unreachable_since.setdefault(router, now)

    def _refreshed(self, router: str, now: float) -> None:
        """The router's state changed: an unreachable router's purge waits from now."""
        if router not in self._table.routes:
            self._unreachable_since[router] = now
            self._timers_due = min(self._timers_due, now + self._config.purge_after)

    def _purge(self, now: float) -> None:
        limit = self._config.purge_after
        for router in [r for r, since in self._unreachable_since.items() if since + limit <= now]:
            del self._unreachable_since[router]
            self._linkstate.remove(router)
            self._addresses_changed(self._mobile.remove(router))
        timeout = self._config.request_timeout
        for key, asked in list(self._asked.items()):
            for link in [link for link, at in asked.items() if at + timeout <= now]:
                del asked[link]
            if not asked:
                del self._asked[key]

    def _addresses_changed(self, changes: Changes) -> None:
        if changes:
            self._outbox.addresses_changed(changes)
