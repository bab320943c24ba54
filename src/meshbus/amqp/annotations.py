"""The mesh's message annotations: where a message entered the mesh, the routers it passed, its address.

Rules of this module:
1. Between routers a message carries, in its message-annotations section, `x-opt-meshbus.ingress` (the
   router where it entered the mesh), `x-opt-meshbus.trace` (the routers it passed, in order),
   `x-opt-meshbus.to` (the address it is routed by: its producer's link's target, or else its `to`) and,
   when the router where it entered chose one router for it, `x-opt-meshbus.dest` (that router: the
   routers on the way forward it by their routes alone, even before they have learnt its address).
   `stamp` sets them before a message goes to another router; `take` gets them back on arrival and removes
   them, so that a client sees the message as its producer sent it (other annotations kept).
2. proton encodes and decodes the section; this module only splices sections, found by peek.annotations_span.
   The same few sections recur (one per path and address), so results are cached by the section's bytes.
3. No state beyond those caches, no I/O.
"""

from __future__ import annotations

import functools
from typing import Any, Final, cast

from proton import Data, symbol

from meshbus.amqp.peek import annotations_span

INGRESS: Final = symbol("x-opt-meshbus.ingress")
TRACE: Final = symbol("x-opt-meshbus.trace")
TO: Final = symbol("x-opt-meshbus.to")
DEST: Final = symbol("x-opt-meshbus.dest")
_MESSAGE_ANNOTATIONS: Final = 0x72
_CACHE_SIZE: Final = 4096

# (ingress, trace, to) as read from a message; all empty for a message that does not carry them.
MeshFields = tuple[str | None, tuple[str, ...], str | None, str | None]
_NONE: Final[MeshFields] = (None, (), None, None)


class AnnotationError(ValueError):
    """The message's annotations cannot be read (not a valid message-annotations section)."""


def take(payload: bytes | bytearray) -> tuple[MeshFields, bytes | bytearray]:
    """The mesh's fields of a message that came from another router, and the message without them: as its
    producer sent it, for a client (a router stamps it again)."""
    start, end = _span(payload)
    if start == end:
        return _NONE, payload
    fields, rest = _taken(bytes(payload[start:end]))
    return fields, b"".join((payload[:start], rest, payload[end:]))


def stamp(
    payload: bytes | bytearray, ingress: str, trace: tuple[str, ...], to: str | None, dest: str | None
) -> bytes:
    """The message with the mesh's fields set to these, for sending to another router."""
    start, end = _span(payload)
    section = _stamped(bytes(payload[start:end]), ingress, trace, to, dest)
    return b"".join((payload[:start], section, payload[end:]))


def _span(payload: bytes | bytearray) -> tuple[int, int]:
    start, end = annotations_span(bytes(payload) if isinstance(payload, bytearray) else payload)
    if start < 0:
        raise AnnotationError("the message's header or annotations are not valid AMQP")
    return start, end


def _decode(section: bytes) -> dict[Any, Any]:
    data = Data()
    try:
        data.decode(section)
        data.rewind()
        data.next()
        described = data.get_object()
    except Exception as error:  # proton raises its DataException, or a KeyError for an unknown type
        raise AnnotationError(f"the message-annotations section cannot be decoded: {error}") from None
    value = getattr(described, "value", None)
    if not isinstance(value, dict):
        raise AnnotationError("the message-annotations section is not a map")
    owned: dict[Any, Any] = _owned(value)
    data.clear()  # the Data lives until its views are copied (compiled code may free a local after last use)
    return owned


def _owned(value: Any) -> Any:
    """The value with its binaries copied: proton hands them out as views of the Data's own buffer, which
    goes with the Data."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return type(value)((_owned(k), _owned(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_owned(item) for item in value]
    return value


def _encode(annotations: dict[Any, Any]) -> bytes:
    if not annotations:
        return b""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(_MESSAGE_ANNOTATIONS)
    data.put_object(annotations)
    data.exit()
    # A bytearray, whatever proton's hints say: called untyped, so that compiled code does not check them.
    return bytes(cast(Any, data).encode())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _taken(section: bytes) -> tuple[MeshFields, bytes]:
    """The mesh's fields in a message-annotations section, and the section without them (maybe none)."""
    annotations = _decode(section)
    ingress, trace, to, dest = (annotations.pop(key, None) for key in (INGRESS, TRACE, TO, DEST))
    if ingress is not None and not isinstance(ingress, str):
        raise AnnotationError(f"{INGRESS} is not a string")
    if trace is None:
        trace = []
    if not isinstance(trace, list) or not all(isinstance(hop, str) for hop in trace):
        raise AnnotationError(f"{TRACE} is not a list of strings")
    for key, value in ((TO, to), (DEST, dest)):
        if value is not None and not isinstance(value, str):
            raise AnnotationError(f"{key} is not a string")
    fields = (
        None if ingress is None else str(ingress),
        tuple(str(hop) for hop in trace),
        to and str(to),
        dest and str(dest),
    )
    return fields, _encode(annotations)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _stamped(section: bytes, ingress: str, trace: tuple[str, ...], to: str | None, dest: str | None) -> bytes:
    annotations = _decode(section) if section else {}
    annotations[INGRESS] = ingress
    annotations[TRACE] = list(trace)
    for key, value in ((TO, to), (DEST, dest)):
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return _encode(annotations)
