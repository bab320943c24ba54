"""What goes on the wire: addresses and message bodies, as the oslo.messaging AMQP 1.0 driver lays them out,
so a service on that driver and a meshbus service call each other through the router.

Rules of this module:
1. Pure functions: a target to an address, a request or reply to an encoded message and back. No I/O.
2. Messages are encoded by proton (its pn_message codec), never by hand; received ones are read by
   `peek.fields`, a scanner for the body and the string ids, where they have the usual shape, and by proton
   otherwise. A body is one AMQP string holding JSON: {"request": ..., "context": ...} for requests and
   notifications (and "call_monitor_timeout" when the caller wants heartbeats), {"response": ...} or
   {"failure": "<JSON of the exception>"} for replies. A heartbeat is a message with a correlation id and
   no body, as the oslo AMQP 1.0 driver sends it.
"""

from __future__ import annotations

import importlib
import json
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson
from cproton import msgid2py, py2msgid
from cproton_ffi import ffi, lib

from meshbus.amqp.peek import fields
from meshbus.messaging import green
from meshbus.messaging.exceptions import InvalidTarget, RemoteError
from meshbus.messaging.serializer import to_primitive
from meshbus.messaging.target import Target

DEFAULT_EXCHANGE: Final = "openstack"
RPC_PREFIX: Final = "openstack.org/om/rpc"
NOTIFY_PREFIX: Final = "openstack.org/om/notify"
_REMOTE_SUFFIX: Final = "_Remote"
_BUILTIN_MODULES: Final = frozenset({"builtins", "exceptions"})
# What a client reads from a message (see `_read`).
# A message-id as a request came with it (text from our clients and oslo's; a number, a uuid or binary from
# other AMQP clients), for the correlation-id of its reply, which the caller matches with its own.
MessageId = str | int | uuid.UUID | bytes
_Read = tuple[bytes | None, MessageId | None, str | None, str | None]
# Notifications carry their payload inside this envelope, for oslo.messaging's version 2.0 messages.
_ENVELOPE_VERSION: Final = "2.0"


# -- addresses ---------------------------------------------------------------------------------------------


def rpc_address(target: Target, default_exchange: str = DEFAULT_EXCHANGE, vhost: str | None = None) -> str:
    """Where a request to `target` goes: every server of the topic (fanout), one named server, or any.
    A virtual host, as the oslo AMQP 1.0 driver's pseudo_vhost, comes before the exchange."""
    if not target.topic:
        raise InvalidTarget(f"a target needs a topic to send to: {target}")
    scope = _scope(target.exchange or default_exchange, vhost)
    if target.fanout:
        return f"{RPC_PREFIX}/multicast/{scope}/{target.topic}"
    if target.server:
        return f"{RPC_PREFIX}/unicast/{scope}/{target.topic}/{target.server}"
    return f"{RPC_PREFIX}/anycast/{scope}/{target.topic}"


def server_addresses(
    target: Target, default_exchange: str = DEFAULT_EXCHANGE, vhost: str | None = None
) -> list[str]:
    """The three addresses an RPC server listens on: its own, its topic's anycast, its topic's fanout."""
    if not target.topic or not target.server:
        raise InvalidTarget(f"an RPC server's target needs a topic and a server name: {target}")
    topic = Target(exchange=target.exchange, topic=target.topic)
    return [
        rpc_address(topic.replace(server=target.server), default_exchange, vhost),
        rpc_address(topic, default_exchange, vhost),
        rpc_address(topic.replace(fanout=True), default_exchange, vhost),
    ]


def notify_address(
    target: Target, priority: str, default_exchange: str = DEFAULT_EXCHANGE, vhost: str | None = None
) -> str:
    """Where notifications of one priority on the target's topic go (listeners of the topic share them)."""
    if not target.topic:
        raise InvalidTarget(f"a notification target needs a topic: {target}")
    scope = _scope(target.exchange or default_exchange, vhost)
    return f"{NOTIFY_PREFIX}/anycast/{scope}/{target.topic}.{priority.lower()}"


def _scope(exchange: str, vhost: str | None) -> str:
    return f"{vhost}/{exchange}" if vhost else exchange


# -- messages ----------------------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: one is made per message, and a frozen dataclass is slow to make
class Incoming:
    """A decoded request or notification."""

    body: dict[str, Any]
    context: dict[str, Any]
    message_id: MessageId | None
    reply_to: str | None
    call_monitor_timeout: float | None = None  # seconds: send the caller heartbeats at least this often

    @property
    def reply_route(self) -> tuple[str, MessageId] | None:
        """Where its reply (and heartbeats) go: the caller's address and the correlation id; None for a
        cast, which has no one to answer."""
        if not self.reply_to or self.message_id is None or self.message_id == "":
            return None
        return self.reply_to, self.message_id


# orjson writes what json writes at a tenth of the cost, which counts twice per call. These options keep
# json's ways: any key becomes text; dates and dataclasses go through `to_primitive`, as with json.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)
ToPrimitive = Callable[[Any], Any]  # a value JSON cannot hold as one it can (`json.dumps`'s `default`)


def _dumps(value: Any, default: ToPrimitive = to_primitive) -> bytes:
    """JSON, as UTF-8. What orjson refuses (integers beyond 64 bits, text with lone surrogates, nesting
    deeper than 255) json encodes. NaN and the infinities become null: JSON has no such numbers."""
    try:
        return orjson.dumps(value, default=default, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(value, default=default).encode()  # ASCII: json escapes the rest


# Read by msgspec, not orjson: orjson reads an integer beyond 64 bits as a float, losing digits.
_decode = msgspec.json.Decoder().decode


def _loads(text: bytes | str) -> Any:
    """JSON's value; json reads what msgspec refuses (NaN and the infinities, as json writes them, and lone
    surrogates). Raises ValueError for what is not JSON."""
    try:
        return _decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def encode_request(
    to: str,
    request: dict[str, Any],
    context: dict[str, Any],
    *,
    message_id: str | None = None,
    reply_to: str | None = None,
    ttl: float | None = None,
    envelope: bool = False,
    call_monitor_timeout: float | None = None,
    default: ToPrimitive = to_primitive,
) -> bytes:
    """A request (call, cast) or a notification (`envelope=True`: marked durable, so that a broker serving
    its queue keeps it on disk) to address `to`; `default` makes what JSON cannot hold primitive."""
    if envelope:
        request = {"oslo.version": _ENVELOPE_VERSION, "oslo.message": _dumps(request, default).decode()}
    data: dict[str, Any] = {"request": request, "context": context}
    if call_monitor_timeout is not None:
        data["call_monitor_timeout"] = call_monitor_timeout
    body = _dumps(data, default)
    return _codec().encode(to, body, message_id=message_id, reply_to=reply_to, ttl=ttl, durable=envelope)


def decode_request(payload: bytes) -> Incoming:
    """A request (call, cast) or a notification. Raises ValueError for what is neither."""
    text, message_id, reply_to, _ = _read(payload)
    data = _object(text)
    monitor = data.get("call_monitor_timeout")
    if not isinstance(monitor, int | float) or isinstance(monitor, bool) or monitor <= 0:
        monitor = None
    return Incoming(_request(data), data.get("context") or {}, message_id, reply_to, monitor)


def decode_notification(payload: bytes) -> Incoming:
    """`decode_request` without what only a request has (message id, reply-to, call monitoring), which
    a listener does not read."""
    data = _object(_read(payload)[0])
    return Incoming(_request(data), data.get("context") or {}, None, None)


def _read(payload: bytes) -> _Read:
    """What a messaging client reads from an encoded message: its body's JSON text (None if it has none),
    message id, reply-to and correlation id. Scanned by `peek.fields` where the message has the usual
    shape (0.6 us for a request, where proton's decoding costs 3.9 us); proton reads every other."""
    found = fields(payload) if type(payload) is bytes else None  # compiled, it takes bytes only
    if found is None:
        return _codec().read(payload)
    start, end, message_id, reply_to, correlation_id = found
    return (None if start < 0 else payload[start:end]), message_id, reply_to, correlation_id


def _object(text: bytes | None) -> dict[str, Any]:
    if text is None:
        raise ValueError("the message has no body")
    data = _loads(text)
    if not isinstance(data, dict):
        raise ValueError("the message body is JSON but not an object")
    return data


def _request(data: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = data.get("request") or {}
    if "oslo.message" in request:  # a notification's envelope
        request = _loads(request["oslo.message"])
    return request


def encode_reply(
    to: str,
    correlation_id: MessageId,
    *,
    result: Any = None,
    failure: str | None = None,
    default: ToPrimitive = to_primitive,
) -> bytes:
    """The reply to a call: its result, or a failure made by `serialize_exception`."""
    body = _dumps({"failure": failure} if failure is not None else {"response": result}, default)
    return _codec().encode(to, body, correlation_id=correlation_id)


def encode_heartbeat(to: str, correlation_id: MessageId, ttl: float) -> bytes:
    """A sign of life for a caller that asked for call monitoring: the server still works on its call."""
    return _codec().encode(to, None, correlation_id=correlation_id, ttl=ttl)


def decode_reply(payload: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """A reply's correlation id and JSON body (None: a heartbeat)."""
    text, _, _, correlation_id = _read(payload)
    return correlation_id, None if text is None else _object(text)


class _Codec:
    """proton's message codec (pn_message) driven directly: a third of the cost of proton.Message's wrapper
    objects, which matters for every message sent (and every one received that `peek.fields` leaves to
    proton). One per OS thread (`_codec()`): under eventlet, one per green thread made a pn_message and a
    64 KiB buffer for every message an oslo server answered, each green thread serving one."""

    def __init__(self) -> None:
        self.message = ffi.gc(lib.pn_message(), lib.pn_message_free)
        self.buffer = ffi.new("char[]", 1 << 16)
        self.size = 1 << 16

    def encode(
        self,
        to: str,
        body: bytes | None,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: MessageId | None = None,
        ttl: float | None = None,
        durable: bool = False,
    ) -> bytes:
        message = self.message
        lib.pn_message_clear(message)
        lib.pn_message_set_address(message, to.encode())
        if durable:
            lib.pn_message_set_durable(message, True)
        if message_id is not None:
            lib.pn_message_set_id(message, _string_id(message_id))
        if reply_to is not None:
            lib.pn_message_set_reply_to(message, reply_to.encode())
        if correlation_id is not None:
            correlation = (
                _string_id(correlation_id) if type(correlation_id) is str else py2msgid(correlation_id)
            )
            lib.pn_message_set_correlation_id(message, correlation)
        if ttl is not None:
            lib.pn_message_set_ttl(message, int(ttl * 1000))
        if body is not None:
            lib.pn_data_put_string(lib.pn_message_body(message), (len(body), ffi.from_buffer(body)))
        while True:
            size = lib.pn_message_encode_py(message, self.buffer, self.size)
            if size >= 0:
                encoded: bytes = ffi.buffer(self.buffer, size)[:]
                return encoded
            if size != lib.PN_OVERFLOW:
                raise ValueError(f"proton could not encode a message to {to} (error {size})")
            self.size *= 2
            self.buffer = ffi.new("char[]", self.size)

    def read(self, payload: bytes) -> _Read:
        """`_read`, by proton."""
        message = self.message
        lib.pn_message_clear(message)
        if lib.pn_message_decode(message, ffi.from_buffer(payload), len(payload)) < 0:
            raise ValueError("not an AMQP message")
        body = lib.pn_message_body(message)
        lib.pn_data_rewind(body)
        kind = lib.pn_data_type(body) if lib.pn_data_next(body) else lib.PN_NULL
        if kind == lib.PN_NULL:
            text = None
        elif kind in (lib.PN_STRING, lib.PN_BINARY):
            raw = lib.pn_data_get_string(body) if kind == lib.PN_STRING else lib.pn_data_get_binary(body)
            text = ffi.buffer(raw.start, raw.size)[:]
        else:
            raise ValueError("the message body is not JSON text")
        reply_to = lib.pn_message_get_reply_to(message)
        return (
            text,
            _id_value(lib.pn_message_get_id(message)),
            ffi.string(reply_to).decode() if reply_to else None,
            _id_text(lib.pn_message_get_correlation_id(message)),
        )


def _string_id(value: str) -> dict[str, Any]:
    """A message id (or correlation id) of type string, as pn_message_set_id takes it."""
    raw = value.encode()
    return {"type": lib.PN_STRING, "u": {"as_bytes": (len(raw), ffi.from_buffer(raw))}}


def _id_value(value: Any) -> MessageId | None:
    """A message id as it came: text as `_id_text` reads it, any other type by proton."""
    if value.type == lib.PN_STRING:
        return _id_text(value)
    if value.type == lib.PN_BINARY:  # copied: proton's memoryview would be of the codec's reused buffer
        raw: bytes = ffi.unpack(value.u.as_bytes.start, value.u.as_bytes.size)
        return raw
    converted: MessageId | None = msgid2py(value)
    return converted


def _id_text(value: Any) -> str | None:
    """A message or correlation id as text: ours are strings (read here directly: proton's msgid2py costs
    as much as the rest of a reply's decoding); another AMQP client's may be a number, a uuid, or binary
    (read as UTF-8)."""
    if value.type in (lib.PN_STRING, lib.PN_BINARY):
        raw: bytes = ffi.unpack(value.u.as_bytes.start, value.u.as_bytes.size)
        return raw.decode("utf-8", "backslashreplace")
    converted = msgid2py(value)
    return None if converted is None else str(converted)


_codecs = green.os_thread_local()


def _codec() -> _Codec:
    codec: _Codec | None = getattr(_codecs, "codec", None)
    if codec is None:
        codec = _codecs.codec = _Codec()
    return codec


# -- exceptions --------------------------------------------------------------------------------------------


def serialize_exception(error: BaseException) -> str:
    """An exception as the JSON text replies carry: class, module, message, traceback, args and kwargs."""
    cls = type(error)
    name, module = cls.__name__, cls.__module__
    if name.endswith(_REMOTE_SUFFIX) and module.endswith(_REMOTE_SUFFIX):  # passing on a remote error
        name, module = name[: -len(_REMOTE_SUFFIX)], module[: -len(_REMOTE_SUFFIX)]
    return _dumps(
        {
            "class": name,
            "module": module,
            "message": str(error),
            "tb": traceback.format_exception(error),
            "args": list(error.args),
            "kwargs": getattr(error, "kwargs", {}) or {},
        }
    ).decode()


def deserialize_exception(data: str, allowed_modules: frozenset[str] | set[str]) -> Exception:
    """The exception a failure describes, rebuilt if its module is builtins or allowed; else `RemoteError`.

    A rebuilt exception is an instance of a subclass named `<Class>_Remote`, so `except ValueError` works at
    the caller and its text carries the remote traceback."""
    failure = _loads(data)
    name, module = str(failure.get("class")), str(failure.get("module"))
    message, trace = str(failure.get("message", "")), failure.get("tb") or []
    if module in _BUILTIN_MODULES:
        module = "builtins"
    if module != "builtins" and module not in allowed_modules:
        return RemoteError(name, message, "".join(trace))
    try:
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(f"{module}.{name} is not an exception")
        error = cls(*failure.get("args", []), **failure.get("kwargs", {}))
    except (AttributeError, TypeError, ImportError, ValueError):
        return RemoteError(name, message, "".join(trace))
    text = message + ("\n" + "".join(trace) if trace else "")
    remote = type(name + _REMOTE_SUFFIX, (cls,), {"__str__": lambda self: text})
    remote.__module__ = module + _REMOTE_SUFFIX
    try:
        error.__class__ = remote
    except TypeError:  # builtins' layouts differ from a Python subclass's: keep the type, carry the text
        error.args = (text, *error.args[1:])
    return error
