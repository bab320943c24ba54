"""Server side of the AMQP 1.0 SASL layer (spec part 5.3) as a sans-I/O state machine.

Rules of this module:
1. It owns the bytes between the peer's first byte and the AMQP header that follows a successful
   negotiation: protocol headers, sasl-mechanisms, sasl-init and sasl-outcome frames.
2. It never touches a socket, a clock or a credential store. The edge feeds `receive()`, writes
   `data_to_send()`, checks PLAIN credentials off the event loop and answers with `verified()`.
3. Proton is built here without Cyrus SASL, so its server side cannot verify PLAIN. The edge therefore does
   not enable proton's SASL layer on server transports; once this machine reaches DONE or NO_SASL, the edge
   gives proton `take_remaining()`, which begins with the plain AMQP header.
4. Frame bodies are encoded and decoded by proton's codec (`pn_data_*`); only the 8-byte frame header is
   packed here.
5. Only ANONYMOUS and PLAIN are offered; neither needs a challenge, so sasl-challenge/sasl-response are
   protocol errors.

After `receive()` raises `SaslError` the state is FAILED: write `data_to_send()`, then close.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from cproton_ffi import ffi, lib

from meshbus.amqp.pn import put_symbol_array

SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER: Final = b"AMQP\x00\x01\x00\x00"
MAX_FRAME_SIZE: Final = 64 * 1024
SUPPORTED_MECHANISMS: Final = ("ANONYMOUS", "PLAIN")

_FRAME_HEADER: Final = struct.Struct(">IBBH")  # size, data offset (in 4-byte words), type, channel
_SASL_FRAME_TYPE: Final = 1
_OUTCOME_OK: Final = 0
_OUTCOME_AUTH: Final = 1
_ANONYMOUS_USER: Final = "anonymous"


class SaslError(Exception):
    """The peer broke the SASL protocol (or the edge called `verified()` out of turn)."""


class SaslState(enum.Enum):
    AWAIT_HEADER = enum.auto()
    AWAIT_INIT = enum.auto()
    VERIFYING = enum.auto()  # PLAIN credentials are with the edge; waiting for verified()
    DONE = enum.auto()  # authenticated; further bytes pass through to proton
    FAILED = enum.auto()  # outcome (or our header) queued: flush data_to_send(), then close
    NO_SASL = enum.auto()  # the peer skipped SASL; anonymous; all bytes pass through to proton


class SaslEvent(enum.Enum):
    SASL_HEADER = "the SASL protocol header"
    AMQP_HEADER = "the plain AMQP protocol header"
    AMQP_HEADER_REFUSED = "the plain AMQP protocol header (SASL required)"
    INIT_ANONYMOUS = "sasl-init for ANONYMOUS"
    INIT_PLAIN = "sasl-init for PLAIN"
    INIT_REFUSED = "a refused sasl-init"
    VERIFIED = "verified(True)"
    REFUSED = "verified(False)"
    # Frames a server never accepts; they are here so that the table refuses them with a clear message.
    MECHANISMS = "a sasl-mechanisms frame"
    CHALLENGE = "a sasl-challenge frame"
    RESPONSE = "a sasl-response frame"
    OUTCOME = "a sasl-outcome frame"


S, E = SaslState, SaslEvent
TRANSITIONS: Final[dict[SaslState, dict[SaslEvent, SaslState]]] = {
    S.AWAIT_HEADER: {E.SASL_HEADER: S.AWAIT_INIT, E.AMQP_HEADER: S.NO_SASL, E.AMQP_HEADER_REFUSED: S.FAILED},
    S.AWAIT_INIT: {E.INIT_ANONYMOUS: S.DONE, E.INIT_PLAIN: S.VERIFYING, E.INIT_REFUSED: S.FAILED},
    S.VERIFYING: {E.VERIFIED: S.DONE, E.REFUSED: S.FAILED},
    S.DONE: {},
    S.FAILED: {},
    S.NO_SASL: {},
}
del S, E

# Frame descriptors, numeric and symbolic (spec 5.3.3). A server accepts only sasl-init; the others map to
# the event that the table refuses.
_SASL_INIT: Final = frozenset({0x41, "amqp:sasl-init:list"})
_OTHER_FRAMES: Final[dict[int | str, SaslEvent]] = {}
for _code, _name, _event in (
    (0x40, "sasl-mechanisms", SaslEvent.MECHANISMS),
    (0x42, "sasl-challenge", SaslEvent.CHALLENGE),
    (0x43, "sasl-response", SaslEvent.RESPONSE),
    (0x44, "sasl-outcome", SaslEvent.OUTCOME),
):
    _OTHER_FRAMES[_code] = _OTHER_FRAMES[f"amqp:{_name}:list"] = _event
del _code, _name, _event


class SaslServer:
    """One connection's SASL negotiation, server side.

    `mechanisms` are offered in the given order (a subset of SUPPORTED_MECHANISMS); `allow_no_sasl` lets a
    peer skip SASL by sending the plain AMQP header (it is then anonymous).

    Attributes the edge reads:
    - `state`: a SaslState.
    - `user`: "anonymous" after ANONYMOUS or NO_SASL, the PLAIN authcid once verified, else None.
    - `credentials`: (user, password) from PLAIN while VERIFYING, else None.
    - `hostname`: the hostname the peer named in sasl-init (a virtual host), if any.
    - `failure`: why the state is FAILED, for the edge's log line.
    """

    def __init__(self, mechanisms: Sequence[str], allow_no_sasl: bool) -> None:
        unsupported = [m for m in mechanisms if m not in SUPPORTED_MECHANISMS]
        if unsupported or not mechanisms:
            raise ValueError(
                f"SASL mechanisms {list(mechanisms)!r} are not usable: "
                f"give one or more of {', '.join(SUPPORTED_MECHANISMS)}"
            )
        self.state = SaslState.AWAIT_HEADER
        self.user: str | None = None
        self.credentials: tuple[str, str] | None = None
        self.hostname: str | None = None
        self.failure: str | None = None
        self._mechanisms = tuple(mechanisms)
        self._allow_no_sasl = allow_no_sasl
        self._inbox = bytearray()  # unparsed input; in DONE/NO_SASL the bytes for proton
        self._outbox = bytearray()

    def receive(self, data: bytes) -> None:
        """Take bytes from the peer; raises SaslError (state FAILED) on a protocol violation."""
        if self.state is SaslState.FAILED:
            return  # the connection is closing; nothing the peer says matters now
        self._inbox += data
        try:
            while self._step():
                pass
        except SaslError as error:
            self.state = SaslState.FAILED
            self.failure = str(error)
            raise

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer (our header, sasl-mechanisms, sasl-outcome); empties the queue."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def verified(self, ok: bool) -> None:
        """The edge's verdict on `credentials`: queues the outcome and moves to DONE or FAILED."""
        self._fire(SaslEvent.VERIFIED if ok else SaslEvent.REFUSED)
        assert self.credentials is not None  # always set on entering VERIFYING
        user = self.credentials[0]
        self.credentials = None  # do not keep the password longer than needed
        if ok:
            self.user = user
            self._outbox += _OUTCOME_FRAMES[_OUTCOME_OK]
        else:
            self._refuse(f"PLAIN credentials of user {user!r} refused")

    def take_remaining(self) -> bytes:
        """In DONE or NO_SASL: the bytes received beyond the SASL layer, to feed to proton; empties them."""
        if self.state not in (SaslState.DONE, SaslState.NO_SASL):
            raise RuntimeError(f"take_remaining() in state {self.state.name}: SASL is not finished")
        rest = bytes(self._inbox)
        self._inbox.clear()
        return rest

    # -- internals -------------------------------------------------------------------------------------

    def _fire(self, event: SaslEvent) -> None:
        new_state = TRANSITIONS[self.state].get(event)
        if new_state is None:
            raise SaslError(f"{event.value} is not allowed in SASL state {self.state.name}")
        self.state = new_state

    def _refuse(self, reason: str) -> None:
        self.failure = reason
        self._inbox.clear()
        self._outbox += _OUTCOME_FRAMES[_OUTCOME_AUTH]

    def _step(self) -> bool:
        """Consume one header or frame from the inbox; False when more input (or verified()) is needed."""
        if self.state is SaslState.AWAIT_HEADER:
            return self._read_header()
        if self.state is SaslState.AWAIT_INIT:
            body = self._read_frame()
            if body is not None:
                self._handle_frame(body)
            return body is not None
        # VERIFYING holds input unparsed: a peer may pipeline its AMQP header before seeing the outcome.
        return False

    def _read_header(self) -> bool:
        head = bytes(self._inbox[:8])
        if len(head) < 8:
            if SASL_HEADER.startswith(head) or AMQP_HEADER.startswith(head):
                return False
        elif head == SASL_HEADER:
            del self._inbox[:8]
            self._fire(SaslEvent.SASL_HEADER)
            self._outbox += SASL_HEADER + _mechanisms_frame(self._mechanisms)
            return True
        elif head == AMQP_HEADER:
            if self._allow_no_sasl:
                self._fire(SaslEvent.AMQP_HEADER)  # the header stays in the inbox: proton reads it
                self.user = _ANONYMOUS_USER
            else:
                # Spec 2.2: answer a header we cannot serve with the one we want, then close.
                self._fire(SaslEvent.AMQP_HEADER_REFUSED)
                self.failure = "the peer sent the plain AMQP header but this listener requires SASL"
                self._outbox += SASL_HEADER
            return False
        self._outbox += SASL_HEADER
        expected = f"{SASL_HEADER!r}" + (f" or {AMQP_HEADER!r}" if self._allow_no_sasl else "")
        raise SaslError(f"wrong protocol header {head!r} from the peer: expected {expected}")

    def _read_frame(self) -> bytes | None:
        if len(self._inbox) < _FRAME_HEADER.size:
            return None
        size, data_offset, frame_type, _channel = _FRAME_HEADER.unpack_from(self._inbox)
        if size > MAX_FRAME_SIZE:
            raise SaslError(f"SASL frame of {size} bytes exceeds the limit of {MAX_FRAME_SIZE}")
        if frame_type != _SASL_FRAME_TYPE:
            raise SaslError(f"frame of type {frame_type} during SASL negotiation: expected type 1 (SASL)")
        body_start = data_offset * 4
        if data_offset < 2 or body_start > size:
            raise SaslError(f"malformed SASL frame header: size {size}, data offset {data_offset}")
        if len(self._inbox) < size:
            return None
        body = bytes(self._inbox[body_start:size])
        del self._inbox[:size]
        return body

    def _handle_frame(self, body: bytes) -> None:
        descriptor, fields = _decode_frame_body(body)
        if descriptor in _OTHER_FRAMES:
            self._fire(_OTHER_FRAMES[descriptor])  # never allowed: raises naming the frame and the state
        if descriptor not in _SASL_INIT:
            raise SaslError(f"unknown SASL frame descriptor {descriptor!r}")
        mechanism, response, hostname = (*fields, None, None, None)[:3]
        if not isinstance(mechanism, str):
            raise SaslError("sasl-init without a mechanism symbol")
        self.hostname = hostname if isinstance(hostname, str) else None
        if mechanism not in self._mechanisms:
            self._fire(SaslEvent.INIT_REFUSED)
            self._refuse(f"mechanism {mechanism!r} is not offered")
        elif mechanism == "ANONYMOUS":
            self._fire(SaslEvent.INIT_ANONYMOUS)
            self.user = _ANONYMOUS_USER
            self._outbox += _OUTCOME_FRAMES[_OUTCOME_OK]
        else:
            try:
                credentials = _parse_plain(response)
            except ValueError as error:
                self._fire(SaslEvent.INIT_REFUSED)
                self._refuse(f"PLAIN initial response refused: {error}")
                return
            self._fire(SaslEvent.INIT_PLAIN)
            self.credentials = credentials


def _parse_plain(response: object) -> tuple[str, str]:
    """RFC 4616 `authzid NUL authcid NUL passwd` -> (authcid, passwd); ValueError saying what is wrong."""
    if not isinstance(response, bytes):
        raise ValueError("no initial response")
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise ValueError("not of the form authzid NUL authcid NUL password")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not authcid or not password:
        raise ValueError("empty user name or password")
    if authzid not in ("", authcid):
        raise ValueError(
            f"user {authcid!r} may not act as {authzid!r} (authorization identities unsupported)"
        )
    return authcid, password


# -- proton codec glue ---------------------------------------------------------------------------------


def _encode_frame(code: int, put_fields: Callable[[Any], object]) -> bytes:
    """A SASL frame with body described(code, list), the list's fields put by `put_fields(pn_data)`."""
    data = lib.pn_data(0)
    try:
        lib.pn_data_put_described(data)
        lib.pn_data_enter(data)
        lib.pn_data_put_ulong(data, code)
        lib.pn_data_put_list(data)
        lib.pn_data_enter(data)
        put_fields(data)
        lib.pn_data_exit(data)
        lib.pn_data_exit(data)
        size = lib.pn_data_encoded_size(data)
        buffer = ffi.new("char[]", size)
        written = lib.pn_data_encode(data, buffer, size)
        if written < 0:
            raise RuntimeError(f"proton failed to encode a SASL frame (error {written})")
        body: bytes = ffi.buffer(buffer, written)[:]
    finally:
        lib.pn_data_free(data)
    return _FRAME_HEADER.pack(8 + len(body), 2, _SASL_FRAME_TYPE, 0) + body


@functools.cache
def _mechanisms_frame(mechanisms: tuple[str, ...]) -> bytes:
    return _encode_frame(0x40, lambda data: put_symbol_array(data, list(mechanisms)))


def _outcome_frame(code: int) -> bytes:
    return _encode_frame(0x44, lambda data: lib.pn_data_put_ubyte(data, code))


_OUTCOME_FRAMES: Final = {code: _outcome_frame(code) for code in (_OUTCOME_OK, _OUTCOME_AUTH)}
_BYTES_GETTERS: Final = {
    lib.PN_SYMBOL: lib.pn_data_get_symbol,
    lib.PN_STRING: lib.pn_data_get_string,
    lib.PN_BINARY: lib.pn_data_get_binary,
}


def _decode_frame_body(body: bytes) -> tuple[int | str, list[str | bytes | None]]:
    """(descriptor, fields); fields are read for sasl-init only, and those of other types read as None."""
    data = lib.pn_data(0)
    try:
        consumed = lib.pn_data_decode(data, ffi.from_buffer(body), len(body))
        if consumed != len(body):
            raise SaslError(f"malformed SASL frame body ({len(body)} bytes, proton decoded {consumed})")
        lib.pn_data_rewind(data)
        if not lib.pn_data_next(data) or lib.pn_data_type(data) != lib.PN_DESCRIBED:
            raise SaslError("SASL frame body is not a described type")
        lib.pn_data_enter(data)
        lib.pn_data_next(data)
        kind = lib.pn_data_type(data)
        descriptor: int | str
        if kind == lib.PN_ULONG:
            descriptor = int(lib.pn_data_get_ulong(data))
        elif kind == lib.PN_SYMBOL:
            descriptor = _read_bytes(data, kind).decode("ascii", errors="replace")
        else:
            raise SaslError("SASL frame descriptor is neither a ulong nor a symbol")
        fields: list[str | bytes | None] = []
        if descriptor in _SASL_INIT:
            if not lib.pn_data_next(data) or lib.pn_data_type(data) != lib.PN_LIST:
                raise SaslError("sasl-init body is not a list")
            lib.pn_data_enter(data)
            while lib.pn_data_next(data):
                kind = lib.pn_data_type(data)
                if kind == lib.PN_BINARY:
                    fields.append(_read_bytes(data, kind))
                elif kind in _BYTES_GETTERS:
                    fields.append(_read_bytes(data, kind).decode("utf-8", errors="replace"))
                else:
                    fields.append(None)
        return descriptor, fields
    finally:
        lib.pn_data_free(data)


def _read_bytes(data: Any, kind: int) -> bytes:
    raw = _BYTES_GETTERS[kind](data)
    return bytes(ffi.unpack(raw.start, raw.size))
