"""Protocol messages to plain maps and back, and the errors for maps that are not messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proton import Message as AmqpMessage

from meshbus.mesh.messages import (
    Hello,
    LinkStateRequest,
    LinkStateUpdate,
    Message,
    MessageError,
    MobileAddressRequest,
    MobileAddressUpdate,
    RouterAdvertisement,
    Summary,
    decode,
    newer,
)

INSTANCE = 1_700_000_000_123_456_789  # a start time in ns: beyond 32 bits

EXAMPLES: list[Message] = [
    Hello("router-a", INSTANCE, ("router-b",)),
    Hello("router-a", INSTANCE),
    LinkStateUpdate("router-a", INSTANCE, 7, (("router-b", 1), ("router-c", 20))),
    LinkStateUpdate("router-a", INSTANCE, 0, ()),
    LinkStateRequest(("router-a", "router-b")),
    MobileAddressUpdate("router-a", INSTANCE, 3, added=("svc/x",), removed=("svc/y", "svc/z")),
    MobileAddressUpdate("router-a", INSTANCE, 3, exist=()),
    MobileAddressRequest(("router-c",)),
    RouterAdvertisement((Summary("router-a", INSTANCE, 4, 2), Summary("router-b", 5, 1, 0))),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_an_amqp_body(message: Message) -> None:
    body = AmqpMessage(body=message.to_dict())
    received = AmqpMessage()
    received.decode(body.encode())
    assert decode(received.body) == message


@given(
    st.text(min_size=1),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    st.lists(st.text(min_size=1), unique=True),
    st.lists(st.text(min_size=1), unique=True),
)
def test_address_updates_round_trip(
    origin: str, instance: int, seq: int, added: list[str], removed: list[str]
):
    incremental = MobileAddressUpdate(origin, instance, seq, tuple(added), tuple(removed))
    full = MobileAddressUpdate(origin, instance, seq, exist=tuple(added))
    assert decode(incremental.to_dict()) == incremental
    assert decode(full.to_dict()) == full


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ([1, 2], "must be a map, got list"),
        ({"op": "NOPE"}, "unknown op 'NOPE'"),
        ({"router_id": "a"}, "unknown op None"),
        (
            {"op": "HELLO", "instance": 1, "seen": []},
            "HELLO: field 'router_id' must be a non-empty string, got None",
        ),
        (
            {"op": "HELLO", "router_id": "a", "instance": True, "seen": []},
            "field 'instance' must be an integer",
        ),
        ({"op": "HELLO", "router_id": "a", "instance": 1, "seen": "b"}, "field 'seen' must be a list"),
        (
            {"op": "LSU", "origin": "a", "instance": 1, "seq": -1, "links": {}},
            "field 'seq' must be an integer >= 0",
        ),
        ({"op": "LSU", "origin": "a", "instance": 1, "seq": 1, "links": {"b": 0}}, "integer cost >= 1"),
        (
            {"op": "LSR", "router_ids": ["a", ""]},
            "LSR: field 'router_ids' must be a list of non-empty strings",
        ),
        ({"op": "MAU", "origin": "a", "instance": 1, "seq": 1, "added": ["x"]}, "MAU: field 'removed'"),
        ({"op": "RA", "routers": [["a", 1, 2]]}, "RA: field 'routers' must be a list of [router_id"),
        ({"op": "RA", "routers": [["a", 1, 2, -3]]}, "RA: field 'routers'"),
    ],
)
def test_malformed_bodies_are_refused_naming_the_field(body: object, complaint: str) -> None:
    with pytest.raises(MessageError, match="mesh message") as raised:
        decode(body)
    assert complaint in str(raised.value)


def test_versions_order_by_instance_then_seq() -> None:
    assert newer((1, 0), None)
    assert newer((1, 5), (1, 4))
    assert not newer((1, 4), (1, 4))
    assert newer((2, 1), (1, 9))  # a restarted router starts its seq again
    assert not newer((1, 9), (2, 1))
