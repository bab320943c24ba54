"""The wire format: the oslo.messaging AMQP 1.0 driver's addresses, JSON bodies, and exceptions carried in
replies. No router."""

from __future__ import annotations

import datetime
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import Message

from meshbus.messaging import InvalidTarget, NoSuchMethod, RemoteError, Target, UnsupportedVersion, wire
from meshbus.messaging.serializer import JsonPayloadSerializer, to_primitive

MODULE = __name__


class QuotaExceeded(Exception):
    """An application's own exception, as a server would raise it."""


class WithKwargs(Exception):
    """As OpenStack services write theirs: the message from a template and the keyword arguments, which are
    kept in `kwargs`."""

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        super().__init__(message or f"{kwargs['resource']} is busy")


def raised(error: Exception) -> Exception:
    """`error` with a traceback, as a server's `except` clause has it."""
    try:
        raise error
    except Exception as caught:
        return caught


# -- addresses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "address"),
    [
        (Target(topic="compute"), "openstack.org/om/rpc/anycast/openstack/compute"),
        (Target(topic="compute", server="host1"), "openstack.org/om/rpc/unicast/openstack/compute/host1"),
        (Target(topic="compute", fanout=True), "openstack.org/om/rpc/multicast/openstack/compute"),
        # fanout wins over a server name, as in the oslo driver
        (
            Target(topic="compute", server="h", fanout=True),
            "openstack.org/om/rpc/multicast/openstack/compute",
        ),
        (Target(exchange="nova", topic="compute"), "openstack.org/om/rpc/anycast/nova/compute"),
    ],
)
def test_rpc_addresses(target: Target, address: str) -> None:
    assert wire.rpc_address(target) == address


def test_the_transports_default_exchange_is_used_when_the_target_has_none() -> None:
    assert wire.rpc_address(Target(topic="t"), "heat") == "openstack.org/om/rpc/anycast/heat/t"
    assert (
        wire.rpc_address(Target(exchange="nova", topic="t"), "heat") == "openstack.org/om/rpc/anycast/nova/t"
    )


def test_a_server_listens_on_its_own_its_topics_and_the_fanout_address() -> None:
    addresses = wire.server_addresses(Target(exchange="nova", topic="compute", server="host1", version="2.0"))
    assert addresses == [
        "openstack.org/om/rpc/unicast/nova/compute/host1",
        "openstack.org/om/rpc/anycast/nova/compute",
        "openstack.org/om/rpc/multicast/nova/compute",
    ]


@pytest.mark.parametrize(
    ("target", "priority", "address"),
    [
        (
            Target(topic="notifications"),
            "INFO",
            "openstack.org/om/notify/anycast/openstack/notifications.info",
        ),
        (
            Target(exchange="nova", topic="versioned"),
            "error",
            "openstack.org/om/notify/anycast/nova/versioned.error",
        ),
    ],
)
def test_notification_addresses(target: Target, priority: str, address: str) -> None:
    assert wire.notify_address(target, priority) == address


def test_targets_without_what_an_address_needs_are_refused() -> None:
    with pytest.raises(InvalidTarget, match="needs a topic"):
        wire.rpc_address(Target(server="host1"))
    with pytest.raises(InvalidTarget, match="needs a topic and a server name"):
        wire.server_addresses(Target(topic="compute"))
    with pytest.raises(InvalidTarget, match="needs a topic"):
        wire.notify_address(Target(), "info")


def test_target_replace_changes_only_given_fields() -> None:
    target = Target(exchange="nova", topic="compute", version="1.0")
    assert target.replace(server="h1", version="1.2", topic=None) == Target(
        exchange="nova", topic="compute", version="1.2", server="h1"
    )
    assert target == Target(exchange="nova", topic="compute", version="1.0"), "replace changed the original"


# -- messages -----------------------------------------------------------------------------------------------


def test_a_virtual_host_comes_before_the_exchange_as_the_oslo_amqp1_drivers_pseudo_vhost() -> None:
    server = Target(exchange="ex", topic="t", server="s")
    assert wire.server_addresses(server, vhost="my-vhost") == [
        "openstack.org/om/rpc/unicast/my-vhost/ex/t/s",
        "openstack.org/om/rpc/anycast/my-vhost/ex/t",
        "openstack.org/om/rpc/multicast/my-vhost/ex/t",
    ]
    notify = wire.notify_address(Target(topic="t"), "INFO", "exchange", vhost="my-vhost")
    assert notify == "openstack.org/om/notify/anycast/my-vhost/exchange/t.info"


def test_a_request_round_trips() -> None:
    request = {"method": "echo", "args": {"text": "héllo", "n": [1, 2.5, None, True]}, "version": "1.1"}
    payload = wire.encode_request(
        "openstack.org/om/rpc/anycast/openstack/t",
        request,
        {"user": "alice"},
        message_id="m-1",
        reply_to="dynamic/reply-1",
        ttl=2.5,
    )
    incoming = wire.decode_request(payload)
    assert incoming == wire.Incoming(request, {"user": "alice"}, "m-1", "dynamic/reply-1")
    message = Message()
    message.decode(payload)
    assert (message.address, message.ttl) == ("openstack.org/om/rpc/anycast/openstack/t", 2.5)
    assert isinstance(message.body, str), "the oslo driver's bodies are AMQP strings of JSON"


@pytest.mark.parametrize(
    ("message_id", "text"),
    [
        (7, "7"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (b"raw-id", "raw-id"),
        ("text-id", "text-id"),
    ],
    ids=["ulong", "uuid", "binary", "string"],
)
def test_another_clients_message_id_of_any_type_comes_back_as_its_replys_correlation_id(
    message_id: wire.MessageId, text: str
) -> None:
    """Another AMQP 1.0 client may number its requests or use uuids or binary, and match replies by them: a
    reply's correlation id is its request's message id, of the same type. (A correlation id this library
    reads, to match its own calls, it reads as text.)"""
    message = Message(body=json.dumps({"request": {"method": "m"}, "context": {}}))
    message.id = message.correlation_id = message_id
    message.reply_to = "its/replies"
    payload = message.encode()
    incoming = wire.decode_request(payload)
    assert (incoming.message_id, incoming.reply_to) == (message_id, "its/replies")
    assert type(incoming.message_id) is type(message_id)
    assert wire.decode_reply(payload)[0] == text
    reply = Message()
    reply.decode(wire.encode_reply("its/replies", message_id, result=1))
    correlation_id = reply.correlation_id
    if isinstance(correlation_id, memoryview):  # how proton's Message gives binary
        correlation_id = bytes(correlation_id)
    assert (type(correlation_id), correlation_id) == (type(message_id), message_id)


def test_a_cast_has_no_reply_address_nor_id() -> None:
    incoming = wire.decode_request(wire.encode_request("a", {"method": "m", "args": {}}, {}))
    assert (incoming.message_id, incoming.reply_to) == (None, None)


def test_a_notification_travels_in_the_oslo_2_0_envelope() -> None:
    notification = {"event_type": "compute.start", "payload": {"id": 1}, "priority": "INFO"}
    payload = wire.encode_request("a", notification, {"user": "alice"}, envelope=True)
    message = Message()
    message.decode(payload)
    assert isinstance(message.body, str)
    envelope = json.loads(message.body)["request"]
    assert envelope["oslo.version"] == "2.0"
    assert json.loads(envelope["oslo.message"]) == notification
    incoming = wire.decode_request(payload)
    assert (incoming.body, incoming.context) == (notification, {"user": "alice"})


def test_notifications_are_durable_and_requests_not() -> None:
    """A broker serving a notification queue keeps durable messages on disk; an RPC request needs no disk."""
    notification, request = Message(), Message()
    notification.decode(wire.encode_request("a", {"event_type": "e"}, {}, envelope=True))
    request.decode(wire.encode_request("a", {"method": "m", "args": {}}, {}))
    assert (notification.durable, request.durable) == (True, False)


@pytest.mark.parametrize(("result", "failure"), [({"a": [1, "b"]}, None), (None, None), (None, "{}")])
def test_a_reply_round_trips(result: Any, failure: str | None) -> None:
    payload = wire.encode_reply("dynamic/r", "m-7", result=result, failure=failure)
    message = Message()
    message.decode(payload)
    assert message.address == "dynamic/r"
    expected = {"failure": failure} if failure is not None else {"response": result}
    assert wire.decode_reply(payload) == ("m-7", expected)


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def test_values_json_cannot_hold_are_made_primitive() -> None:
    payload = wire.encode_request("a", {"method": "m", "args": {"ids": {3}, "pair": (1, 2)}}, {})
    assert wire.decode_request(payload).body["args"] == {"ids": [3], "pair": [1, 2]}
    entity = {
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "point": Point(1, 2),
        7: frozenset(),
        "raw": b"id",
    }
    assert JsonPayloadSerializer().serialize_entity({}, entity) == {
        "at": "2026-01-02T03:04:05.000000",
        "point": {"x": 1, "y": 2},
        "7": [],
        "raw": "id",
    }


def test_datetimes_are_written_as_oslo_serialization_writes_them_an_aware_one_in_utc() -> None:
    paris = datetime.timezone(datetime.timedelta(hours=1))
    written = to_primitive(
        [datetime.datetime(2026, 1, 2, 3, 4, 5), datetime.datetime(2026, 1, 2, 4, 4, 5, 6, tzinfo=paris)]
    )
    assert written == ["2026-01-02T03:04:05.000000", "2026-01-02T03:04:05.000006"]
    # What oslo's timeutils.parse_strtime reads (its PERFECT_TIME_FORMAT), the instant kept.
    read = [datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f") for text in written]
    assert read == [datetime.datetime(2026, 1, 2, 3, 4, 5), datetime.datetime(2026, 1, 2, 3, 4, 5, 6)]


def json_round_trip(value: Any) -> Any:
    """What a value becomes through json, as the oslo.messaging drivers encode it."""
    return json.loads(json.dumps(value, default=to_primitive))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children) | st.dictionaries(st.text() | st.integers() | st.booleans() | st.none(), children)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_a_body_reads_back_as_through_json(value: Any) -> None:
    # orjson encodes and decodes, json takes over where orjson refuses (integers beyond 64 bits, lone
    # surrogates): either way the receiver reads what json would have given it.
    payload = wire.encode_request("a", {"method": "m", "args": {"value": value}}, {})
    assert wire.decode_request(payload).body["args"]["value"] == json_round_trip(value)


def test_integers_beyond_64_bits_and_lone_surrogates_travel() -> None:
    # Exactly: none of these integers is a float's (a float would keep 53 bits of them).
    for value in (2**70 + 1, -(2**63) - 1, 2**64, "\ud800 alone", {"deep": [10**30 + 7]}):
        payload = wire.encode_reply("r", "m", result=value)
        assert wire.decode_reply(payload) == ("m", {"response": value})


def test_nan_and_infinities_read_from_json_and_are_sent_as_null() -> None:
    # A peer on json (the oslo drivers) writes NaN and Infinity; JSON itself has no such numbers.
    payload = bytes(Message(body='{"response": [NaN, Infinity, -Infinity]}', correlation_id="m").encode())
    _, body = wire.decode_reply(payload)
    assert body is not None
    assert math.isnan(body["response"][0])
    assert body["response"][1:] == [math.inf, -math.inf]
    assert wire.decode_reply(wire.encode_reply("r", "m", result=[math.nan, math.inf])) == (
        "m",
        {"response": [None, None]},
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [(42, "not JSON text"), (["a"], "not JSON text"), ("[1, 2]", "not an object"), ("{not json", None)],
)
def test_a_body_that_is_not_a_json_object_is_refused(body: Any, words: str | None) -> None:
    payload = bytes(Message(body=body).encode())
    with pytest.raises(ValueError, match=words):
        wire.decode_request(payload)
    with pytest.raises(ValueError, match=words):
        wire.decode_reply(payload)


@pytest.mark.parametrize("payload", [b"", b"\xff\xff", b"hello"])
def test_bytes_that_are_not_an_amqp_message_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_request(payload)


# -- exceptions ---------------------------------------------------------------------------------------------


def test_an_exception_is_serialized_with_class_module_message_and_traceback() -> None:
    failure = json.loads(wire.serialize_exception(raised(QuotaExceeded("over 10 GiB", 10))))
    assert (failure["class"], failure["module"]) == ("QuotaExceeded", MODULE)
    assert (failure["message"], failure["args"], failure["kwargs"]) == (
        "('over 10 GiB', 10)",
        ["over 10 GiB", 10],
        {},
    )
    assert "raise error" in "".join(failure["tb"]), "the traceback is missing"


def test_a_builtin_exception_is_rebuilt_as_its_type_with_the_remote_traceback() -> None:
    error = wire.deserialize_exception(wire.serialize_exception(raised(ValueError("bad size"))), frozenset())
    assert type(error) is ValueError
    assert str(error).startswith("bad size\n")
    assert "raise error" in str(error)


def test_a_python_2_builtin_module_name_means_builtins() -> None:
    failure = json.dumps({"class": "KeyError", "module": "exceptions", "message": "'k'", "args": ["k"]})
    error = wire.deserialize_exception(failure, frozenset())
    assert type(error) is KeyError


def test_an_allowed_modules_exception_is_rebuilt_as_a_remote_subclass() -> None:
    error = wire.deserialize_exception(wire.serialize_exception(raised(QuotaExceeded("full"))), {MODULE})
    assert isinstance(error, QuotaExceeded)
    assert (type(error).__name__, type(error).__module__) == ("QuotaExceeded_Remote", MODULE + "_Remote")
    assert str(error).startswith("full\n")


def test_a_rebuilt_remote_exception_passed_on_is_serialized_as_the_original_type() -> None:
    remote = wire.deserialize_exception(wire.serialize_exception(raised(QuotaExceeded("full"))), {MODULE})
    failure = json.loads(wire.serialize_exception(remote))
    assert (failure["class"], failure["module"]) == ("QuotaExceeded", MODULE)


def test_kwargs_rebuild_the_exception() -> None:
    error = wire.deserialize_exception(wire.serialize_exception(WithKwargs(resource="disk")), {MODULE})
    assert isinstance(error, WithKwargs)
    assert error.kwargs == {"resource": "disk"}
    assert str(error).startswith("disk is busy\n")


def test_an_exception_of_a_module_not_allowed_becomes_remote_error() -> None:
    error = wire.deserialize_exception(wire.serialize_exception(raised(QuotaExceeded("full"))), frozenset())
    assert isinstance(error, RemoteError)
    assert (error.exc_type, error.value) == ("QuotaExceeded", "full")
    assert "raise error" in error.traceback
    assert str(error) == "remote error: QuotaExceeded full"


@pytest.mark.parametrize(
    ("cls", "module"),
    [
        ("NoSuchClass", MODULE),  # not in the module
        ("MODULE", MODULE),  # not an exception
        ("Thing", "no_such_module_anywhere"),  # allowed, but not importable
    ],
)
def test_a_failure_that_cannot_be_rebuilt_becomes_remote_error(cls: str, module: str) -> None:
    failure = json.dumps(
        {"class": cls, "module": module, "message": "gone", "tb": [], "args": [], "kwargs": {}}
    )
    error = wire.deserialize_exception(failure, {MODULE, "no_such_module_anywhere"})
    assert isinstance(error, RemoteError)
    assert (error.exc_type, error.value) == (cls, "gone")


def test_the_librarys_own_errors_keep_their_fields() -> None:
    allowed = {NoSuchMethod.__module__}
    missing = wire.deserialize_exception(wire.serialize_exception(NoSuchMethod("resize")), allowed)
    assert isinstance(missing, NoSuchMethod)
    assert missing.method == "resize"
    assert str(missing).startswith("endpoint does not support RPC method resize\n")
    unsupported = wire.deserialize_exception(
        wire.serialize_exception(UnsupportedVersion("2.0", "resize")), allowed
    )
    assert isinstance(unsupported, UnsupportedVersion)
    assert (unsupported.version, unsupported.method) == ("2.0", "resize")
