"""Mobile addresses: which addresses have consumers on which routers, propagated through the mesh.

Rules of this module:
1. This router's own addresses are set by the edge (`add_local`: an address gained its first local consumer;
   `remove_local`: it lost its last one); `originate` turns the changes since its last call into one
   incremental update (seq + 1). An address added and removed in between sends nothing.
2. Another router's address set is versioned like its link state (messages.newer). An incremental update
   applies only on top of seq - 1 of the same instance (a new instance starts from an empty set at seq 0);
   an older or equal one is KNOWN (dropped); one further ahead is a GAP: the node asks the neighbour it came
   from for the full set (MAR), and the full update that answers applies whenever it is newer.
3. Flooding rule (node.py applies it): an update APPLIED here is sent on unchanged to every neighbour but the
   one it came from; a full update thus floods as a full update.
4. The view (`routers`, `view`, and the changes each call returns): address -> the other routers with
   consumers for it, counting only the routers the node declares reachable (`count`), and only at the
   instance their link state has. A router's addresses go away the moment it is unreachable, and a restarted
   router's addresses from its previous life never count for the new one.
5. It never sends and never reads a clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass
from enum import Enum

from meshbus.mesh.messages import MobileAddressUpdate, Version, newer

Changes = dict[str, frozenset[str]]  # address -> the routers that have consumers for it now (empty: none)
_NONE: frozenset[str] = frozenset()


class Verdict(Enum):
    APPLIED = "applied"  # stored: flood it on
    KNOWN = "known"  # this version or a later one is here already: drop it
    GAP = "gap"  # updates are missing before this one: ask for the full set
    CLAIMS_OUR_ID = "claims our id"  # another live router uses our id


@dataclass(slots=True, eq=False)
class _Origin:
    instance: int
    seq: int
    addresses: frozenset[str]


class MobileAddresses:
    """This router's addresses, every other router's, and the view of the reachable ones."""

    def __init__(self, router_id: str, instance: int) -> None:
        self.router_id = router_id
        self.instance = instance
        self._seq = 0
        self._local: set[str] = set()
        self._published: frozenset[str] = _NONE
        self._origins: dict[str, _Origin] = {}
        self._reachable: dict[str, int] = {}  # router -> the instance its link state has
        self._index: dict[str, set[str]] = {}  # address -> counted routers with consumers for it

    # -- our own addresses ---------------------------------------------------------------------------

    def add_local(self, address: str) -> None:
        self._local.add(address)

    def remove_local(self, address: str) -> None:
        self._local.discard(address)

    def originate(self) -> MobileAddressUpdate | None:
        """Our changes since the last call, as one incremental update to flood (None: nothing changed)."""
        added = self._local - self._published
        removed = self._published - self._local
        if not added and not removed:
            return None
        self._seq += 1
        self._published = frozenset(self._local)
        return MobileAddressUpdate(
            self.router_id, self.instance, self._seq, tuple(sorted(added)), tuple(sorted(removed))
        )

    # -- other routers' addresses --------------------------------------------------------------------

    def receive(self, update: MobileAddressUpdate) -> tuple[Verdict, Changes]:
        version = (update.instance, update.seq)
        if update.origin == self.router_id:
            verdict = Verdict.CLAIMS_OUR_ID if newer(version, (self.instance, self._seq)) else Verdict.KNOWN
            return verdict, {}
        known = self._origins.get(update.origin)
        if update.exist is not None:
            if not newer(version, self.version(update.origin)):
                return Verdict.KNOWN, {}
            addresses = frozenset(update.exist)
        else:
            if known is not None and known.instance > update.instance:
                return Verdict.KNOWN, {}
            base = _Origin(update.instance, 0, _NONE)  # a new instance starts with no addresses
            if known is not None and known.instance == update.instance:
                base = known
            if update.seq <= base.seq:
                return Verdict.KNOWN, {}
            if update.seq > base.seq + 1:
                return Verdict.GAP, {}
            addresses = (base.addresses - set(update.removed)) | set(update.added)
        return Verdict.APPLIED, self._replace(update.origin, _Origin(update.instance, update.seq, addresses))

    def full_update(self, origin: str) -> MobileAddressUpdate | None:
        """Our copy of the origin's whole address set, as an update (the answer to a request)."""
        if origin == self.router_id:
            return MobileAddressUpdate(origin, self.instance, self._seq, exist=tuple(sorted(self._published)))
        known = self._origins.get(origin)
        if known is None:
            return None
        return MobileAddressUpdate(origin, known.instance, known.seq, exist=tuple(sorted(known.addresses)))

    def version(self, origin: str) -> Version | None:
        if origin == self.router_id:
            return (self.instance, self._seq)
        known = self._origins.get(origin)
        return None if known is None else (known.instance, known.seq)

    def origins(self) -> Collection[str]:
        """The other routers whose addresses are known here."""
        return self._origins.keys()

    def remove(self, origin: str) -> Changes:
        """Forget a router's addresses (it was purged)."""
        return self._replace(origin, None)

    def drop_older(self, origin: str, instance: int) -> Changes:
        """Forget a router's addresses from before this instance (its link state shows it restarted)."""
        known = self._origins.get(origin)
        if known is None or known.instance >= instance:
            return {}
        return self._replace(origin, None)

    # -- the view ------------------------------------------------------------------------------------

    def count(self, reachable: Mapping[str, int]) -> Changes:
        """Count the addresses of exactly these routers (router -> the instance its link state has)."""
        before, self._reachable = self._reachable, dict(reachable)
        changes: Changes = {}
        for origin in before.keys() | reachable.keys():
            known = self._origins.get(origin)
            if known is None:
                continue
            was, now = before.get(origin) == known.instance, reachable.get(origin) == known.instance
            if was != now:
                changes.update(
                    self._reindex(
                        origin, known.addresses if was else _NONE, known.addresses if now else _NONE
                    )
                )
        return changes

    def routers(self, address: str) -> frozenset[str]:
        return frozenset(self._index.get(address, _NONE))

    def view(self) -> dict[str, frozenset[str]]:
        return {address: frozenset(routers) for address, routers in self._index.items()}

    # -- helpers -------------------------------------------------------------------------------------

    def _counts(self, origin: str, known: _Origin | None) -> bool:
        return known is not None and self._reachable.get(origin) == known.instance

    def _replace(self, origin: str, new: _Origin | None) -> Changes:
        old = self._origins.get(origin)
        before = old.addresses if old is not None and self._counts(origin, old) else _NONE
        if new is None:
            self._origins.pop(origin, None)
        else:
            self._origins[origin] = new
        after = new.addresses if new is not None and self._counts(origin, new) else _NONE
        return self._reindex(origin, before, after)

    def _reindex(self, origin: str, before: Set[str], after: Set[str]) -> Changes:
        changes: Changes = {}
        for address in before - after:
            routers = self._index[address]
            routers.discard(origin)
            if not routers:
                del self._index[address]
            changes[address] = frozenset(routers)
        for address in after - before:
            routers = self._index.setdefault(address, set())
            routers.add(origin)
            changes[address] = frozenset(routers)
        return changes
