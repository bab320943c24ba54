"""The routing protocol's messages: what routers tell each other, as small frozen values.

Rules of this module:
1. One frozen dataclass (slots) per message. `message.to_dict()` gives a plain map (str keys; str, int, list
   and map values) that travels as an AMQP map body; `decode(body)` checks such a map and builds the message,
   raising `MessageError` naming the message and the field.
2. Every message travels one hop, on one inter-router link. A hello, a request or an advertisement speaks for
   the router at the far end of the link; an update names the `origin` whose state it carries, because
   updates are flooded on from router to router.
3. A router's state is versioned by (instance, seq): `instance` is fixed for a router process's life and grows
   across restarts (the edge uses its start time in nanoseconds), `seq` counts changes within an instance.
   `newer` is the one comparison of versions.
4. Nothing here knows links, timers or state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

Version = tuple[int, int]  # (instance, seq)


def newer(version: Version, than: Version | None) -> bool:
    """Whether `version` supersedes `than` (None: nothing known yet): a later instance, or a later seq."""
    return than is None or version > than


class MessageError(ValueError):
    """A map that is not a well-formed mesh message."""


@dataclass(frozen=True, slots=True)
class Hello:
    """Sent on every inter-router link each hello interval: who I am, and whom I hear on this link."""

    OP: ClassVar[str] = "HELLO"
    router_id: str
    instance: int
    seen: tuple[str, ...] = ()  # router ids heard on this link within the hello time-out

    def to_dict(self) -> dict[str, object]:
        return {
            "op": self.OP,
            "router_id": self.router_id,
            "instance": self.instance,
            "seen": list(self.seen),
        }


@dataclass(frozen=True, slots=True)
class LinkStateUpdate:
    """A router's neighbours and the cost it gives each link (LSU), at one version."""

    OP: ClassVar[str] = "LSU"
    origin: str
    instance: int
    seq: int
    links: tuple[tuple[str, int], ...]  # (neighbour, cost), by neighbour id

    def to_dict(self) -> dict[str, object]:
        return {
            "op": self.OP,
            "origin": self.origin,
            "instance": self.instance,
            "seq": self.seq,
            "links": dict(self.links),
        }


@dataclass(frozen=True, slots=True)
class LinkStateRequest:
    """Asks the router at the far end for its copies of these routers' link states (LSR)."""

    OP: ClassVar[str] = "LSR"
    router_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"op": self.OP, "router_ids": list(self.router_ids)}


@dataclass(frozen=True, slots=True)
class MobileAddressUpdate:
    """Which addresses have consumers on the origin router (MAU).

    Incremental (`exist` None): the change from seq - 1 to seq, applicable only on top of seq - 1.
    Full (`exist` given): the whole set at seq, the answer to a request; `added` and `removed` are then empty.
    """

    OP: ClassVar[str] = "MAU"
    origin: str
    instance: int
    seq: int
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    exist: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {
            "op": self.OP,
            "origin": self.origin,
            "instance": self.instance,
            "seq": self.seq,
        }
        if self.exist is None:
            body.update(added=list(self.added), removed=list(self.removed))
        else:
            body["exist"] = list(self.exist)
        return body


@dataclass(frozen=True, slots=True)
class MobileAddressRequest:
    """Asks the router at the far end for the full address sets of these routers (MAR)."""

    OP: ClassVar[str] = "MAR"
    router_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"op": self.OP, "router_ids": list(self.router_ids)}


@dataclass(frozen=True, slots=True)
class Summary:
    """The versions a router holds for one origin: its link state and its address set."""

    router_id: str
    instance: int
    ls_seq: int
    mobile_seq: int


@dataclass(frozen=True, slots=True)
class RouterAdvertisement:
    """The sender's summary of its database (RA): one entry for itself and one per router it can reach.

    The receiver asks (LSR, MAR) for whatever is newer here than in its own database: this catches up a
    router that missed updates, or a whole partition at once when it heals."""

    OP: ClassVar[str] = "RA"
    entries: tuple[Summary, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "op": self.OP,
            "routers": [[e.router_id, e.instance, e.ls_seq, e.mobile_seq] for e in self.entries],
        }


Message = (
    Hello
    | LinkStateUpdate
    | LinkStateRequest
    | MobileAddressUpdate
    | MobileAddressRequest
    | RouterAdvertisement
)


# -- decoding ----------------------------------------------------------------------------------------------


class _Fields:
    """Typed access to the fields of one message's map, with errors naming the message and the field."""

    def __init__(self, op: str, body: Mapping[str, object]) -> None:
        self.op = op
        self.body = body

    def _fail(self, name: str, expected: str) -> MessageError:
        return MessageError(
            f"mesh message {self.op}: field {name!r} must be {expected}, got {self.body.get(name)!r}"
        )

    def text(self, name: str) -> str:
        value = self.body.get(name)
        if not isinstance(value, str) or not value:
            raise self._fail(name, "a non-empty string")
        return value

    def count(self, name: str, minimum: int = 0) -> int:
        value = self.body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._fail(name, f"an integer >= {minimum}")
        return value

    def texts(self, name: str) -> tuple[str, ...]:
        value = self.body.get(name)
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
            raise self._fail(name, "a list of non-empty strings")
        return tuple(value)

    def costs(self, name: str) -> tuple[tuple[str, int], ...]:
        value = self.body.get(name)
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in value.items()
        ):
            raise self._fail(name, "a map of router id to integer cost >= 1")
        return tuple(sorted(value.items()))

    def summaries(self, name: str) -> tuple[Summary, ...]:
        value = self.body.get(name)
        if not isinstance(value, list | tuple):
            raise self._fail(name, "a list of [router_id, instance, ls_seq, mobile_seq]")
        entries = []
        for item in value:
            if not (
                isinstance(item, list | tuple)
                and len(item) == 4
                and isinstance(item[0], str)
                and item[0]
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in item[1:])
            ):
                raise self._fail(name, "a list of [router_id, instance, ls_seq, mobile_seq]")
            entries.append(Summary(item[0], item[1], item[2], item[3]))
        return tuple(entries)


def _hello(f: _Fields) -> Message:
    return Hello(f.text("router_id"), f.count("instance"), f.texts("seen"))


def _lsu(f: _Fields) -> Message:
    return LinkStateUpdate(f.text("origin"), f.count("instance"), f.count("seq"), f.costs("links"))


def _mau(f: _Fields) -> Message:
    head = (f.text("origin"), f.count("instance"), f.count("seq"))
    if "exist" in f.body:
        return MobileAddressUpdate(*head, exist=f.texts("exist"))
    return MobileAddressUpdate(*head, added=f.texts("added"), removed=f.texts("removed"))


_DECODERS: dict[str, Callable[[_Fields], Message]] = {
    Hello.OP: _hello,
    LinkStateUpdate.OP: _lsu,
    LinkStateRequest.OP: lambda f: LinkStateRequest(f.texts("router_ids")),
    MobileAddressUpdate.OP: _mau,
    MobileAddressRequest.OP: lambda f: MobileAddressRequest(f.texts("router_ids")),
    RouterAdvertisement.OP: lambda f: RouterAdvertisement(f.summaries("routers")),
}


def decode(body: object) -> Message:
    """The message a map body carries; MessageError if it is not one."""
    if not isinstance(body, Mapping):
        raise MessageError(f"mesh message must be a map, got {type(body).__name__}")
    op = body.get("op")
    if not isinstance(op, str) or op not in _DECODERS:
        raise MessageError(f"mesh message: unknown op {op!r} (expected one of {', '.join(_DECODERS)})")
    return _DECODERS[op](_Fields(op, body))
