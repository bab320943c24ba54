"""Small helpers over proton's cffi layer (`cproton_ffi`) for the edge's cold paths.

Rules of this module:
1. Only conversions between proton's C values and Python values: strings, termini, conditions, pn_data.
2. No state, no I/O. The hot path calls `lib` directly; these helpers are for attach, open and errors.
"""

from __future__ import annotations

from typing import Any

from cproton_ffi import ffi, lib

CData = Any  # a cffi pointer into proton


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
