"""peek() and fields() against proton's own encoding and decoding of generated messages, and against broken
input."""

from __future__ import annotations

import struct
import uuid
from typing import Any

from cproton_ffi import ffi, lib
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import Data, Described, Message, symbol, ulong

from meshbus.amqp.peek import Fields, Scan, fields, peek

SECTION_NAMES = {
    0x70: "amqp:header:list",
    0x71: "amqp:delivery-annotations:map",
    0x72: "amqp:message-annotations:map",
    0x73: "amqp:properties:list",
    0x74: "amqp:application-properties:map",
    0x75: "amqp:data:binary",
    0x76: "amqp:amqp-sequence:list",
    0x77: "amqp:amqp-value:*",
    0x78: "amqp:footer:map",
}

uints = st.integers(0, 2**32 - 1)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=300),  # past 255 bytes proton switches to str32
    st.binary(max_size=300),
    st.uuids(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ascii_keys = st.text(st.characters(max_codepoint=127), min_size=1, max_size=20)
annotation_maps = st.dictionaries(ascii_keys.map(lambda key: symbol("x-" + key)), values)
message_ids = st.one_of(st.none(), st.text(max_size=40), st.integers(0, 2**64 - 1), st.uuids(), st.binary())


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message encoded by proton, with any mix of sections and fields set."""
    fields: dict[str, Any] = {
        "address": draw(st.none() | st.text(max_size=300)),
        "ttl": draw(uints) / 1000,
        "expiry_time": draw(st.integers(-(2**62), 2**62)) / 1000,  # a signed timestamp
        "subject": draw(st.none() | st.text(max_size=40)),
        "reply_to": draw(st.none() | st.text(max_size=40)),
        "id": draw(message_ids),
        "correlation_id": draw(message_ids),
        "user_id": draw(st.binary(max_size=20)),
        "content_type": draw(st.none() | ascii_keys),  # a symbol
        "creation_time": draw(st.integers(0, 2**40)) / 1000,
        "group_id": draw(st.none() | st.text(max_size=20)),
        "group_sequence": draw(st.integers(0, 2**31 - 1)),
        "durable": draw(st.booleans()),
        "priority": draw(st.integers(0, 255)),
        "first_acquirer": draw(st.booleans()),
        "delivery_count": draw(uints),
        "properties": draw(st.dictionaries(st.text(max_size=20), scalars, max_size=5)),
        "instructions": draw(annotation_maps),  # delivery-annotations
        "annotations": draw(annotation_maps),  # message-annotations
        "body": draw(values),
        "inferred": draw(st.booleans()),  # with bytes or a list body: data or amqp-sequence sections
    }
    unset = draw(st.sets(st.sampled_from(sorted(fields))))
    return bytes(Message(**{name: value for name, value in fields.items() if name not in unset}).encode())


def proton_fields(encoded: bytes) -> tuple[str | None, int, int]:
    """(address, ttl ms, absolute expiry ms) as proton decodes them; proton reads an absent number as 0."""
    message = lib.pn_message()
    try:
        assert lib.pn_message_decode(message, ffi.from_buffer(encoded), len(encoded)) == 0
        address = lib.pn_message_get_address(message)
        return (
            None if address == ffi.NULL else ffi.string(address).decode("utf-8"),
            lib.pn_message_get_ttl(message),
            lib.pn_message_get_expiry_time(message),
        )
    finally:
        lib.pn_message_free(message)


def with_symbolic_descriptors(encoded: bytes) -> bytes:
    """The same message re-encoded by proton with `amqp:...` symbols as section descriptors."""
    out = Data()
    while encoded:
        section = Data()
        encoded = encoded[section.decode(encoded) :]
        section.rewind()
        section.next()
        described = section.get_object()
        assert isinstance(described, Described) and isinstance(described.descriptor, int)
        out.put_object(Described(symbol(SECTION_NAMES[described.descriptor]), described.value))
    return bytes(out.encode())


@given(messages())
@settings(max_examples=300)
def test_peek_agrees_with_protons_decode(encoded: bytes) -> None:
    to, ttl, expiry, scan = peek(encoded)
    assert scan is Scan.COMPLETE
    assert (to, ttl or 0, expiry or 0) == proton_fields(encoded)


@given(messages())
def test_symbolic_descriptors_read_like_numeric_ones(encoded: bytes) -> None:
    assert peek(with_symbolic_descriptors(encoded)) == peek(encoded)


@given(messages())
@settings(max_examples=50)
def test_every_truncation_is_incomplete_or_already_final(encoded: bytes) -> None:
    full = peek(encoded)
    for length in range(len(encoded)):
        *found, scan = peek(encoded[:length])
        assert scan is not Scan.MALFORMED
        if scan is Scan.COMPLETE:
            assert (*found, scan) == full
        else:
            assert all(value in (None, expected) for value, expected in zip(found, full, strict=False))


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_random_bytes_never_raise(garbage: bytes) -> None:
    to, ttl, expiry, scan = peek(garbage)
    assert isinstance(scan, Scan)
    assert to is None or isinstance(to, str)
    assert all(number is None or isinstance(number, int) for number in (ttl, expiry))


@given(st.sampled_from([0x70, 0x71, 0x73, 0x74, 0x75]), st.binary(max_size=400))
@settings(max_examples=500)
def test_random_bytes_after_a_section_descriptor_never_raise(section: int, garbage: bytes) -> None:
    assert isinstance(peek(bytes([0x00, 0x53, section]) + garbage)[3], Scan)


def test_a_ulong_descriptor_reads_like_a_smallulong_one() -> None:
    # proton always writes the 1-byte form; widen the properties descriptor to the 8-byte ulong form.
    encoded = bytes(Message(address="a/b", ttl=1.5, body="x").encode())
    widened = encoded.replace(b"\x00\x53\x73", b"\x00" + struct.pack(">BQ", 0x80, 0x73), 1)
    assert peek(widened) == peek(encoded) == ("a/b", 1500, None, Scan.COMPLETE)


def test_a_message_without_a_body_is_complete_after_its_properties() -> None:
    assert peek(bytes(Message(address="q").encode())) == ("q", None, None, Scan.COMPLETE)


def test_a_header_alone_is_incomplete_with_its_ttl() -> None:
    encoded = bytes(Message(ttl=2, address="q").encode())
    header_only = encoded[: encoded.index(b"\x00\x53\x73")]
    assert peek(header_only) == (None, 2000, None, Scan.INCOMPLETE)


def test_empty_input_is_incomplete() -> None:
    assert peek(b"") == (None, None, None, Scan.INCOMPLETE)


def test_an_open_performative_is_malformed() -> None:
    data = Data()
    data.put_object(Described(0x10, ["container-1"]))
    assert peek(bytes(data.encode()))[3] is Scan.MALFORMED


def test_a_to_field_of_invalid_utf8_is_malformed() -> None:
    encoded = bytes(Message(address="abc", ttl=1).encode())
    assert peek(encoded.replace(b"abc", b"\xff\xfe\xfd")) == (None, 1000, None, Scan.MALFORMED)


def test_an_unknown_constructor_in_a_skipped_section_is_malformed() -> None:
    encoded = bytes(Message(address="q", annotations={symbol("x-k"): 1}).encode())
    start = encoded.index(b"\x00\x53\x72")
    assert peek(encoded[: start + 3] + b"\xff" + encoded[start + 4 :])[3] is Scan.MALFORMED


def test_deeply_nested_descriptors_do_not_exhaust_the_stack() -> None:
    assert peek(b"\x00\x53\x72" + b"\x00" * 100_000) == (None, None, None, Scan.INCOMPLETE)


def test_uuid_message_ids_are_skipped() -> None:
    encoded = bytes(Message(id=uuid.uuid4(), address="after-a-uuid").encode())
    assert peek(encoded)[0] == "after-a-uuid"


def test_described_field_values_are_skipped() -> None:
    data = Data()
    message_id = Described(symbol("x-id"), Described(ulong(7), "nested"))
    data.put_object(Described(ulong(0x73), [message_id, None, "after-described"]))
    assert peek(bytes(data.encode())) == ("after-described", None, None, Scan.COMPLETE)


# -- fields -------------------------------------------------------------------------------------------------


def proton_read(encoded: bytes) -> Fields | None:
    """What `fields` must return, worked out from proton's decoding: None where the body is not one
    string, binary or null, or an id is not a string (or absent)."""
    message = Message()
    message.decode(encoded)
    body, message_id, correlation_id = message.body, message.id, message.correlation_id
    if isinstance(body, memoryview):  # how proton's binding gives some binary bodies
        body = bytes(body)
    if not isinstance(body, str | bytes | None) or not isinstance(message_id, str | None):
        return None
    if not isinstance(correlation_id, str | None):
        return None
    if body is None:
        return -1, -1, message_id, message.reply_to, correlation_id
    raw = body.encode() if isinstance(body, str) else body
    start = encoded.rindex(raw) if raw else len(encoded)  # the body section comes last
    return start, start + len(raw), message_id, message.reply_to, correlation_id


@given(messages())
@settings(max_examples=300)
def test_fields_read_what_proton_reads_or_leave_the_message_to_proton(encoded: bytes) -> None:
    assert fields(encoded) == proton_read(encoded)


@given(messages())
def test_fields_read_symbolic_descriptors_like_numeric_ones(encoded: bytes) -> None:
    def read(encoded: bytes) -> tuple[bytes, str | None, str | None, str | None] | None:
        # The body's bytes, not its span: the longer descriptors move it.
        found = fields(encoded)
        return None if found is None else (encoded[found[0] : found[1]], *found[2:])

    assert read(with_symbolic_descriptors(encoded)) == read(encoded)


@given(messages())
@settings(max_examples=50)
def test_fields_of_a_truncated_message_are_none_or_those_of_the_message_it_still_is(encoded: bytes) -> None:
    for length in range(len(encoded)):
        found = fields(encoded[:length])
        assert found is None or found == proton_read(encoded[:length])


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_fields_of_random_bytes_never_raise(garbage: bytes) -> None:
    assert fields(garbage) is None or isinstance(fields(garbage), tuple)


def test_fields_leave_a_second_body_section_to_proton() -> None:
    encoded = bytes(Message(body=b"{}", inferred=True).encode())
    body = encoded[encoded.index(b"\x00\x53\x75") :]
    assert fields(encoded) is not None
    assert fields(encoded + body) is None


def test_fields_read_past_a_footer() -> None:
    data = Data()
    data.put_object(Described(ulong(0x78), {symbol("x-check"): 1}))
    encoded = bytes(Message(body="{}", reply_to="r").encode())
    found = (len(encoded) - 2, len(encoded), None, "r", None)
    assert fields(encoded + bytes(data.encode())) == fields(encoded) == found


def test_fields_leave_a_properties_list_shorter_than_its_fields_to_proton() -> None:
    # A user id holding the bytes of a body section, and a list size that ends the list inside it.
    data = Data()
    data.put_object(Described(ulong(0x73), [None, b"\x00\x53\x77\xa1\x02{}"]))
    encoded = bytes(data.encode())
    assert fields(encoded) == (-1, -1, None, None, None)
    list_at = encoded.index(b"\xd0")  # list32: a 4-byte size, then a 4-byte count
    size = encoded.index(b"\x00\x53\x77") - (list_at + 5)
    short = encoded[: list_at + 1] + struct.pack(">I", size) + encoded[list_at + 5 :]
    assert fields(short) is None
