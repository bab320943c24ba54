"""proton's C functions for the edge, through its cffi layer (`cproton_ffi`), and helpers for cold paths.

Rules of this module:
1. The proton functions and constants the edge calls, bound once as Final names: compiled (mypyc) code reads
   a Final name, even another module's, from a C static, where `lib.name` or a plain import would cost a
   dictionary lookup on every call of the hot path.
2. Conversions between proton's C values and Python values: strings, termini, conditions, pn_data.
3. No state, no I/O.
"""

from __future__ import annotations

from typing import Any, Final

from cproton_ffi import ffi, lib

CData = Any  # a cffi pointer into proton

# The link property (attach frame) by which a consumer names its pool, a string: see router/core.py, rule 5.
POOL_PROPERTY: Final = "meshbus:pool"
# The Open frame property by which both ends of an inter-router connection say so: its value "inter-router".
ROLE_PROPERTY: Final = "meshbus:role"

PN_CONNECTION_REMOTE_CLOSE: Final = lib.PN_CONNECTION_REMOTE_CLOSE
PN_CONNECTION_REMOTE_OPEN: Final = lib.PN_CONNECTION_REMOTE_OPEN
PN_DELIVERY: Final = lib.PN_DELIVERY
PN_LINK_FLOW: Final = lib.PN_LINK_FLOW
PN_LINK_REMOTE_CLOSE: Final = lib.PN_LINK_REMOTE_CLOSE
PN_LINK_REMOTE_DETACH: Final = lib.PN_LINK_REMOTE_DETACH
PN_LINK_REMOTE_OPEN: Final = lib.PN_LINK_REMOTE_OPEN
PN_SESSION_REMOTE_CLOSE: Final = lib.PN_SESSION_REMOTE_CLOSE
PN_SESSION_REMOTE_OPEN: Final = lib.PN_SESSION_REMOTE_OPEN
PN_SND_SETTLED: Final = lib.PN_SND_SETTLED
PN_TRANSPORT_CLOSED: Final = lib.PN_TRANSPORT_CLOSED
PN_TRANSPORT_ERROR: Final = lib.PN_TRANSPORT_ERROR
pn_collector: Final = lib.pn_collector
pn_collector_peek: Final = lib.pn_collector_peek
pn_collector_pop: Final = lib.pn_collector_pop
pn_connection: Final = lib.pn_connection
pn_connection_close: Final = lib.pn_connection_close
pn_connection_collect: Final = lib.pn_connection_collect
pn_connection_condition: Final = lib.pn_connection_condition
pn_connection_offered_capabilities: Final = lib.pn_connection_offered_capabilities
pn_connection_open: Final = lib.pn_connection_open
pn_connection_properties: Final = lib.pn_connection_properties
pn_connection_release: Final = lib.pn_connection_release
pn_connection_remote_condition: Final = lib.pn_connection_remote_condition
pn_connection_remote_container: Final = lib.pn_connection_remote_container
pn_connection_set_container: Final = lib.pn_connection_set_container
pn_decref: Final = lib.pn_decref
pn_delivery: Final = lib.pn_delivery
pn_delivery_abort: Final = lib.pn_delivery_abort
pn_delivery_aborted: Final = lib.pn_delivery_aborted
pn_delivery_link: Final = lib.pn_delivery_link
pn_delivery_local: Final = lib.pn_delivery_local
pn_delivery_partial: Final = lib.pn_delivery_partial
pn_delivery_pending: Final = lib.pn_delivery_pending
pn_delivery_readable: Final = lib.pn_delivery_readable
pn_delivery_remote: Final = lib.pn_delivery_remote
pn_delivery_remote_state: Final = lib.pn_delivery_remote_state
pn_delivery_settle: Final = lib.pn_delivery_settle
pn_delivery_settled: Final = lib.pn_delivery_settled
pn_delivery_update: Final = lib.pn_delivery_update
pn_disposition_condition: Final = lib.pn_disposition_condition
pn_disposition_is_failed: Final = lib.pn_disposition_is_failed
pn_disposition_is_undeliverable: Final = lib.pn_disposition_is_undeliverable
pn_disposition_set_failed: Final = lib.pn_disposition_set_failed
pn_disposition_set_undeliverable: Final = lib.pn_disposition_set_undeliverable
pn_event_connection: Final = lib.pn_event_connection
pn_event_delivery: Final = lib.pn_event_delivery
pn_event_link: Final = lib.pn_event_link
pn_event_session: Final = lib.pn_event_session
pn_event_transport: Final = lib.pn_event_transport
pn_event_type: Final = lib.pn_event_type
pn_link_advance: Final = lib.pn_link_advance
pn_link_close: Final = lib.pn_link_close
pn_link_condition: Final = lib.pn_link_condition
pn_link_credit: Final = lib.pn_link_credit
pn_link_drained: Final = lib.pn_link_drained
pn_link_flow: Final = lib.pn_link_flow
pn_link_free: Final = lib.pn_link_free
pn_link_get_drain: Final = lib.pn_link_get_drain
pn_link_is_sender: Final = lib.pn_link_is_sender
pn_link_open: Final = lib.pn_link_open
pn_link_properties: Final = lib.pn_link_properties
pn_link_recv: Final = lib.pn_link_recv
pn_link_remote_properties: Final = lib.pn_link_remote_properties
pn_link_remote_rcv_settle_mode: Final = lib.pn_link_remote_rcv_settle_mode
pn_link_remote_snd_settle_mode: Final = lib.pn_link_remote_snd_settle_mode
pn_link_remote_source: Final = lib.pn_link_remote_source
pn_link_remote_target: Final = lib.pn_link_remote_target
pn_link_send: Final = lib.pn_link_send
pn_link_session: Final = lib.pn_link_session
pn_link_set_max_message_size: Final = lib.pn_link_set_max_message_size
pn_link_set_rcv_settle_mode: Final = lib.pn_link_set_rcv_settle_mode
pn_link_set_snd_settle_mode: Final = lib.pn_link_set_snd_settle_mode
pn_link_source: Final = lib.pn_link_source
pn_link_target: Final = lib.pn_link_target
pn_sasl: Final = lib.pn_sasl
pn_sasl_allowed_mechs: Final = lib.pn_sasl_allowed_mechs
pn_session_close: Final = lib.pn_session_close
pn_session_connection: Final = lib.pn_session_connection
pn_session_open: Final = lib.pn_session_open
pn_terminus_copy: Final = lib.pn_terminus_copy
pn_terminus_is_dynamic: Final = lib.pn_terminus_is_dynamic
pn_terminus_set_address: Final = lib.pn_terminus_set_address
pn_transport: Final = lib.pn_transport
pn_transport_bind: Final = lib.pn_transport_bind
pn_transport_capacity: Final = lib.pn_transport_capacity
pn_transport_close_head: Final = lib.pn_transport_close_head
pn_transport_close_tail: Final = lib.pn_transport_close_tail
pn_transport_condition: Final = lib.pn_transport_condition
pn_transport_connection: Final = lib.pn_transport_connection
pn_transport_peek: Final = lib.pn_transport_peek
pn_transport_pending: Final = lib.pn_transport_pending
pn_transport_pop: Final = lib.pn_transport_pop
pn_transport_push: Final = lib.pn_transport_push
pn_transport_require_auth: Final = lib.pn_transport_require_auth
pn_transport_set_idle_timeout: Final = lib.pn_transport_set_idle_timeout
pn_transport_set_max_frame: Final = lib.pn_transport_set_max_frame
pn_transport_set_server: Final = lib.pn_transport_set_server
pn_transport_set_tracer: Final = lib.pn_transport_set_tracer
pn_transport_tick: Final = lib.pn_transport_tick
pn_transport_unbind: Final = lib.pn_transport_unbind


def text(ptr: CData) -> str | None:
    """A C string from proton as str, or None for NULL."""
    return ffi.string(ptr).decode("utf-8", "replace") if ptr else None


def pn_bytes(value: bytes) -> tuple[int, CData]:
    """A pn_bytes_t initializer; the caller keeps `value` alive for the call."""
    return (len(value), ffi.from_buffer(value))


def terminus_address(terminus: CData) -> str | None:
    return text(lib.pn_terminus_get_address(terminus))


def set_condition(condition: CData, name: str, description: str) -> None:
    lib.pn_condition_set_name(condition, name.encode())
    lib.pn_condition_set_description(condition, description.encode())


def condition(condition: CData) -> tuple[str, str] | None:
    if not lib.pn_condition_is_set(condition):
        return None
    return (
        text(lib.pn_condition_get_name(condition)) or "",
        text(lib.pn_condition_get_description(condition)) or "",
    )


def put_symbol(data: CData, value: str) -> None:
    raw = value.encode("ascii")
    lib.pn_data_put_symbol(data, pn_bytes(raw))


def put_string(data: CData, value: str) -> None:
    raw = value.encode()
    lib.pn_data_put_string(data, pn_bytes(raw))


def put_symbol_map(data: CData, values: dict[str, str]) -> None:
    """Write {symbol: string} (the Open frame's properties)."""
    lib.pn_data_put_map(data)
    lib.pn_data_enter(data)
    for key, value in values.items():
        put_symbol(data, key)
        put_string(data, value)
    lib.pn_data_exit(data)


def put_symbol_array(data: CData, values: list[str]) -> None:
    lib.pn_data_put_array(data, False, lib.PN_SYMBOL)
    lib.pn_data_enter(data)
    for value in values:
        put_symbol(data, value)
    lib.pn_data_exit(data)


def string_field(data: CData, key: str) -> str | None:
    """The string under the symbol `key` in the map `data` holds (an Attach or Open frame's properties); None
    when the key is absent, TypeError when its value is not a string."""
    if not data:  # proton's NULL for a frame without properties
        return None
    lib.pn_data_rewind(data)
    if not lib.pn_data_next(data) or lib.pn_data_type(data) != lib.PN_MAP:
        return None
    lib.pn_data_enter(data)
    wanted = key.encode("ascii")
    while lib.pn_data_next(data):
        found = lib.pn_data_type(data) == lib.PN_SYMBOL and _bytes(lib.pn_data_get_symbol(data)) == wanted
        lib.pn_data_next(data)  # to the key's value
        if found:
            if lib.pn_data_type(data) != lib.PN_STRING:
                raise TypeError(f"the value of {key!r} is not a string")
            return _bytes(lib.pn_data_get_string(data)).decode("utf-8", "replace")
    return None


def _bytes(value: CData) -> bytes:
    """A pn_bytes_t's bytes."""
    return ffi.unpack(value.start, value.size) if value.size else b""
