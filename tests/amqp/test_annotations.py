"""The mesh's message annotations: stamp and take on messages proton encodes."""

from __future__ import annotations

from typing import Any

import pytest
from proton import Message, int32, symbol, timestamp, ubyte

from meshbus.amqp.annotations import DEST, INGRESS, TO, TRACE, AnnotationError, MeshFields, stamp, take
from meshbus.amqp.peek import annotations_span


def mesh_fields(payload: bytes | bytearray) -> MeshFields:
    return take(payload)[0]


def strip(payload: bytes | bytearray) -> bytes | bytearray:
    return take(payload)[1]


PLAIN = Message(body="hello", address="work").encode()
FOREIGN = symbol("x-opt-other")


def decoded(payload: bytes) -> Message:
    message = Message()
    message.decode(payload)
    return message


@pytest.mark.parametrize("to", ["work", None])
def test_stamp_then_mesh_fields_gives_back_ingress_trace_and_to(to):
    stamped = stamp(PLAIN, "A", ("A", "B"), to, None)
    assert mesh_fields(stamped) == ("A", ("A", "B"), to, None)
    assert decoded(stamped).body == "hello"


def test_the_router_a_message_goes_toward_round_trips():
    assert mesh_fields(stamp(PLAIN, "A", ("A",), "work", "C")) == ("A", ("A",), "work", "C")


def test_a_message_without_the_mesh_annotations_has_no_mesh_fields():
    assert mesh_fields(PLAIN) == (None, (), None, None)
    assert mesh_fields(Message(body=1, annotations={FOREIGN: "x"}).encode()) == (None, (), None, None)


def test_stamp_over_a_stamp_replaces_ours():
    twice = stamp(stamp(PLAIN, "A", ("A",), "work", "C"), "A", ("A", "B"), None, None)
    assert mesh_fields(twice) == ("A", ("A", "B"), None, None)
    assert twice == stamp(PLAIN, "A", ("A", "B"), None, None)  # nothing of the first stamp is left


@pytest.mark.parametrize(
    "value",
    [
        "text",
        symbol("sym"),
        int32(-5),
        ubyte(3),
        timestamp(1_700_000_000_000),
        [1, "two"],
        {symbol("k"): None},
        b"\x01\x02\x03",
    ],
    ids=["string", "symbol", "int", "ubyte", "timestamp", "list", "map", "binary"],
)
def test_foreign_annotations_are_kept_by_stamp_and_strip(value: Any):
    original = Message(body="hello", annotations={FOREIGN: value}).encode()
    stamped = stamp(original, "A", ("A",), "work", None)
    message = decoded(stamped)  # kept alive: proton's binary values point into it
    annotations = message.annotations
    assert annotations is not None and set(annotations) == {FOREIGN, INGRESS, TRACE, TO}
    kept = annotations[FOREIGN]
    assert (bytes(kept) if isinstance(kept, memoryview) else kept) == value
    assert strip(stamped) == original


def test_strip_gives_back_the_producers_message_byte_for_byte():
    stamped = stamp(PLAIN, "A", ("A", "B"), "work", "C")
    assert stamped != PLAIN
    assert strip(stamped) == PLAIN
    assert strip(bytearray(stamped)) == PLAIN


def test_strip_of_an_unstamped_message_changes_nothing():
    assert strip(PLAIN) == PLAIN


def test_header_and_delivery_annotations_stay_before_ours():
    original = Message(
        body="hello", durable=True, ttl=5, instructions={symbol("x-opt-hop"): "first"}, address="work"
    ).encode()
    stamped = stamp(original, "B", ("B",), None, None)
    start, _ = annotations_span(stamped)
    assert stamped[:start] == original[:start]  # header and delivery annotations, untouched
    message = decoded(stamped)
    assert (message.durable, message.ttl, message.instructions) == (True, 5, {symbol("x-opt-hop"): "first"})
    assert message.address == "work" and message.body == "hello"
    assert mesh_fields(stamped) == ("B", ("B",), None, None)
    assert strip(stamped) == original


STAMPED = stamp(PLAIN, "A", ("A",), "work", None)
_, END = annotations_span(STAMPED)
LIST_SECTION = b"\x00\x53\x72\x45"  # message annotations described as list0, not a map
BODY = b"\x00\x53\x77\xa1\x02hi"  # amqp-value "hi"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01\x02\x03",
        STAMPED[: END - 1],
        LIST_SECTION + BODY,
    ],
    ids=["garbage", "truncated", "not-a-map"],
)
@pytest.mark.parametrize(
    "read",
    [mesh_fields, strip, lambda p: stamp(p, "A", ("A",), None, None)],
    ids=["mesh_fields", "strip", "stamp"],
)
def test_unreadable_annotations_raise(payload, read):
    with pytest.raises(AnnotationError):
        read(payload)


@pytest.mark.parametrize(
    "annotations",
    [{INGRESS: 5}, {INGRESS: "A", TRACE: "A"}, {INGRESS: "A", TRACE: ["A", 7]}, {TO: 3}, {DEST: 4}],
    ids=["ingress", "trace-not-a-list", "trace-item", "to", "dest"],
)
def test_mesh_fields_of_the_wrong_type_raise(annotations):
    with pytest.raises(AnnotationError):
        mesh_fields(Message(body="hello", annotations=annotations).encode())
