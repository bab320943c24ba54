"""What the mesh reports to its operator: one small value per event worth a log line.

Rules of this module: each event reads as an English sentence through `str()`, naming the routers and the
link concerned; the edge decides how to log it (the mesh configures no logging). `Link` is the edge's handle
of an inter-router link: opaque to the mesh, used only as a dictionary key and in messages.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeAlias

Link: TypeAlias = Hashable


@dataclass(frozen=True, slots=True)
class NeighbourUp:
    router_id: str
    link: Link
    cost: int

    def __str__(self) -> str:
        return f"neighbour {self.router_id} up on link {self.link!r} (cost {self.cost})"


@dataclass(frozen=True, slots=True)
class NeighbourDown:
    router_id: str
    link: Link
    reason: str

    def __str__(self) -> str:
        return f"neighbour {self.router_id} down on link {self.link!r}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DuplicateRouterId:
    """Two live routers claim one id. They are never merged: the detail says which one the mesh follows."""

    router_id: str
    instance: int  # the instance of the other claimant
    detail: str

    def __str__(self) -> str:
        return f"duplicate router id {self.router_id!r}: {self.detail}; give each router a unique [router] id"


@dataclass(frozen=True, slots=True)
class RouterReachable:
    router_id: str
    cost: int

    def __str__(self) -> str:
        return f"router {self.router_id} reachable (cost {self.cost})"


@dataclass(frozen=True, slots=True)
class RouterUnreachable:
    router_id: str

    def __str__(self) -> str:
        return f"router {self.router_id} unreachable"


Event = NeighbourUp | NeighbourDown | DuplicateRouterId | RouterReachable | RouterUnreachable
