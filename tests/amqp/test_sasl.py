"""SaslServer driven by a real proton client transport in memory, and by hand-assembled SASL frames."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import SASL, Connection, Data, Described, Transport, symbol

from meshbus.amqp.sasl import AMQP_HEADER, SASL_HEADER, SaslError, SaslServer, SaslState

BOTH = ("ANONYMOUS", "PLAIN")


def client(mechanism: str | None, user: str = "alice", password: str = "secret") -> Transport:
    """A proton client transport that has queued its opening bytes; mechanism None: no SASL layer."""
    transport = Transport()
    connection = Connection()
    if mechanism is not None:  # proton enables its SASL layer whenever a user is set
        connection.user = user
        connection.password = password
        sasl = transport.sasl()
        sasl.allowed_mechs(mechanism)
        sasl.allow_insecure_mechs = True
    transport.bind(connection)
    connection.open()
    return transport


def take_output(transport: Transport) -> bytes:
    pending = transport.pending()
    sent = transport.peek(pending) if pending > 0 else None
    transport.pop(pending if sent else 0)
    return bytes(sent or b"")


def pump(transport: Transport, server: SaslServer, chunk: int = 65536) -> None:
    """Shuttle bytes both ways, client output in `chunk`-sized pieces, until neither side has any."""
    while True:
        sent = take_output(transport)
        for start in range(0, len(sent), chunk):
            server.receive(sent[start : start + chunk])
        reply = server.data_to_send()
        if reply:
            transport.push(reply)
        if not sent and not reply:
            return


def sasl_frame(descriptor: int | str, *fields: object) -> bytes:
    """A SASL frame whose body proton encodes as described(descriptor, list(fields))."""
    data = Data()
    data.put_described()
    data.enter()
    if isinstance(descriptor, int):
        data.put_ulong(descriptor)
    else:
        data.put_symbol(symbol(descriptor))
    data.put_list()
    data.enter()
    for field in fields:
        data.put_object(field)
    data.exit()
    data.exit()
    body = data.encode()
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def decode_frame(frame: bytes) -> tuple[object, list[Any]]:
    """(descriptor, fields) of the single SASL frame in `frame`, decoded by proton."""
    assert struct.unpack_from(">I", frame)[0] == len(frame)
    data = Data()
    data.decode(frame[8:])
    data.rewind()
    data.next()
    body = data.get_object()
    assert isinstance(body, Described) and isinstance(body.value, list)
    return body.descriptor, body.value


def outcome_code(frame: bytes) -> int:
    descriptor, fields = decode_frame(frame)
    assert descriptor == 0x44
    return int(fields[0])


def awaiting_init(mechanisms: tuple[str, ...] = BOTH) -> SaslServer:
    server = SaslServer(mechanisms, allow_no_sasl=False)
    server.receive(SASL_HEADER)
    server.data_to_send()
    return server


@pytest.mark.parametrize("chunk", [65536, 1])
def test_anonymous_is_accepted_and_the_clients_amqp_header_passes_through(chunk: int) -> None:
    transport = client("ANONYMOUS")
    server = SaslServer(BOTH, allow_no_sasl=False)
    pump(transport, server, chunk)
    assert server.state is SaslState.DONE
    assert server.user == "anonymous"
    assert transport.sasl().outcome == SASL.OK
    assert server.take_remaining().startswith(AMQP_HEADER)


@pytest.mark.parametrize("chunk", [65536, 1])
def test_plain_is_verified_by_the_edge_then_accepted(chunk: int) -> None:
    transport = client("PLAIN", "alice", "s3cret")
    server = SaslServer(BOTH, allow_no_sasl=False)
    pump(transport, server, chunk)
    assert (server.state, server.credentials, server.user) == (SaslState.VERIFYING, ("alice", "s3cret"), None)
    server.verified(True)
    pump(transport, server, chunk)
    assert transport.sasl().outcome == SASL.OK
    assert server.state is SaslState.DONE
    assert (server.user, server.credentials) == ("alice", None)
    remaining = server.take_remaining()
    assert remaining.startswith(AMQP_HEADER)
    assert len(remaining) > len(AMQP_HEADER)  # the client's Open frame follows its header
    assert server.take_remaining() == b""


def test_plain_with_a_wrong_password_gets_outcome_auth() -> None:
    transport = client("PLAIN", "alice", "wrong")
    server = SaslServer(BOTH, allow_no_sasl=False)
    pump(transport, server)
    server.verified(False)
    pump(transport, server)
    assert transport.sasl().outcome == SASL.AUTH
    assert server.state is SaslState.FAILED
    assert (server.user, server.credentials) == (None, None)
    assert server.failure is not None and "alice" in server.failure


def test_mechanisms_are_offered_in_the_configured_order() -> None:
    server = SaslServer(("PLAIN", "ANONYMOUS"), allow_no_sasl=False)
    server.receive(SASL_HEADER)
    sent = server.data_to_send()
    assert sent.startswith(SASL_HEADER)
    descriptor, fields = decode_frame(sent[len(SASL_HEADER) :])
    assert descriptor == 0x40
    assert list(fields[0]) == ["PLAIN", "ANONYMOUS"]


@pytest.mark.parametrize("mechanism", ["ANONYMOUS", "EXTERNAL", "SCRAM-SHA-1"])
def test_a_mechanism_not_offered_is_refused(mechanism: str) -> None:
    server = awaiting_init(("PLAIN",))
    server.receive(sasl_frame(0x41, symbol(mechanism), b""))
    assert outcome_code(server.data_to_send()) == 1
    assert server.state is SaslState.FAILED
    assert server.failure is not None and mechanism in server.failure


@pytest.mark.parametrize(
    "response",
    [None, b"alice\0secret", b"\0\0secret", b"\0alice\0", b"\0al\xffce\0pw", b"bob\0alice\0secret"],
)
def test_a_malformed_plain_response_is_refused(response: bytes | None) -> None:
    server = awaiting_init()
    server.receive(sasl_frame(0x41, symbol("PLAIN"), response))
    assert outcome_code(server.data_to_send()) == 1
    assert server.state is SaslState.FAILED
    assert server.credentials is None


def test_plain_authzid_equal_to_authcid_and_the_hostname_are_accepted() -> None:
    server = awaiting_init()
    server.receive(sasl_frame("amqp:sasl-init:list", symbol("PLAIN"), b"alice\0alice\0pw", "vhost-1"))
    assert server.state is SaslState.VERIFYING
    assert server.credentials == ("alice", "pw")
    assert server.hostname == "vhost-1"


def test_an_amqp_header_pipelined_after_sasl_init_is_kept_for_proton() -> None:
    server = awaiting_init()
    server.receive(sasl_frame(0x41, symbol("PLAIN"), b"\0alice\0pw") + AMQP_HEADER)
    server.verified(True)
    assert outcome_code(server.data_to_send()) == 0
    assert server.take_remaining() == AMQP_HEADER


@pytest.mark.parametrize("chunk", [65536, 1])
def test_no_sasl_passes_everything_through_when_allowed(chunk: int) -> None:
    opening = take_output(client(None))
    server = SaslServer(BOTH, allow_no_sasl=True)
    for start in range(0, len(opening), chunk):
        server.receive(opening[start : start + chunk])
    assert server.data_to_send() == b""
    assert server.state is SaslState.NO_SASL
    assert server.user == "anonymous"
    assert server.take_remaining() == opening
    assert opening.startswith(AMQP_HEADER)


def test_no_sasl_is_answered_with_our_header_when_sasl_is_required() -> None:
    server = SaslServer(BOTH, allow_no_sasl=False)
    server.receive(AMQP_HEADER)
    assert server.state is SaslState.FAILED
    assert server.data_to_send() == SASL_HEADER
    assert server.failure is not None and "requires SASL" in server.failure


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"AMQP\x02\x01\x00\x00", b"AMQP\x03\x01\x00\x01"])
def test_a_wrong_protocol_header_is_a_protocol_error(garbage: bytes) -> None:
    server = SaslServer(BOTH, allow_no_sasl=True)
    with pytest.raises(SaslError, match="wrong protocol header"):
        server.receive(garbage)
    assert server.state is SaslState.FAILED
    assert server.data_to_send() == SASL_HEADER
    server.receive(b"more")  # ignored while the edge closes
    assert server.data_to_send() == b""


def test_a_wrong_header_is_detected_on_its_first_wrong_byte() -> None:
    server = SaslServer(BOTH, allow_no_sasl=False)
    server.receive(b"AMQ")
    with pytest.raises(SaslError, match="wrong protocol header"):
        server.receive(b"X")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (sasl_frame(0x43, b"response"), "sasl-response frame is not allowed in SASL state AWAIT_INIT"),
        (sasl_frame("amqp:sasl-outcome:list", 0), "sasl-outcome frame is not allowed"),
        (sasl_frame(0x10, "container"), "unknown SASL frame descriptor 16"),
        (sasl_frame(0x41), "sasl-init without a mechanism"),
        (struct.pack(">IBBH", 65537, 2, 1, 0), "exceeds the limit"),
        (struct.pack(">IBBH", 16, 2, 0, 0) + bytes(8), "frame of type 0"),
        (struct.pack(">IBBH", 8, 1, 1, 0), "malformed SASL frame header"),
        (struct.pack(">IBBH", 12, 2, 1, 0) + b"\x00\x53\x41\xff", "malformed SASL frame body"),
    ],
)
def test_frames_a_server_cannot_accept_are_protocol_errors(frame: bytes, message: str) -> None:
    server = awaiting_init()
    with pytest.raises(SaslError, match=message):
        server.receive(frame)
    assert server.state is SaslState.FAILED
    assert server.failure is not None and message in server.failure


def test_verified_out_of_turn_is_an_error() -> None:
    server = awaiting_init()
    with pytest.raises(SaslError, match=r"verified\(True\) is not allowed in SASL state AWAIT_INIT"):
        server.verified(True)


def test_take_remaining_before_the_end_of_sasl_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="AWAIT_INIT"):
        awaiting_init().take_remaining()


@pytest.mark.parametrize("mechanisms", [(), ("PLAIN", "EXTERNAL")])
def test_unsupported_mechanism_configuration_is_refused(mechanisms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="give one or more of ANONYMOUS, PLAIN"):
        SaslServer(mechanisms, allow_no_sasl=False)


@st.composite
def mangled_openings(draw: st.DrawFn) -> bytes:
    """A client's SASL opening (header, sasl-init, AMQP header) with bytes changed, added or cut."""
    data = bytearray(take_output(client(draw(st.sampled_from(BOTH)))))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["byte", "insert", "cut", "size"]))
        if change == "byte" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif change == "insert":
            data[at:at] = draw(st.binary(max_size=16))
        elif change == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        else:  # a frame size, or any 4 bytes, at an extreme
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff" * 4, b"\0" * 4, b"\0\0\0\x08", b"\x7f\xff\xff\xff"])
            )
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(mangled_openings(), st.integers(1, 64), st.booleans(), st.booleans())
def test_whatever_an_unauthenticated_peer_sends_ends_in_a_sasl_error_at_worst(
    data: bytes, chunk: int, allow_no_sasl: bool, password_ok: bool
) -> None:
    # (20,000 examples passed once.)
    server = SaslServer(BOTH, allow_no_sasl=allow_no_sasl)
    try:
        for start in range(0, len(data), chunk):
            server.receive(data[start : start + chunk])
            server.data_to_send()
            if server.state is SaslState.VERIFYING:
                server.verified(password_ok)
    except SaslError:
        assert server.state is SaslState.FAILED
