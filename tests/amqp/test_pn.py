"""pn.py's readers of proton values, fed pn_data that proton's own Data class encoded."""

from __future__ import annotations

from typing import Any

import pytest
from cproton_ffi import ffi
from proton import Data, symbol

from meshbus.amqp import pn

POOL = symbol("meshbus:pool")


def properties(value: dict[Any, Any]) -> Data:
    """The map encoded; the pn_data is `._data`, valid while the Data object lives."""
    data = Data()
    data.put_dict(value)
    return data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({POOL: "a"}, "a"),
        ({symbol("other"): [1, {symbol("nested"): "x"}], POOL: "café"}, "café"),  # passes over other keys
        ({"meshbus:pool": "a"}, None),  # a string key is not the symbol
        ({symbol("other"): "a"}, None),
        ({}, None),
    ],
)
def test_string_field_finds_the_string_under_the_symbol(value: dict[Any, Any], expected: str | None) -> None:
    data = properties(value)
    assert pn.string_field(data._data, "meshbus:pool") == expected


@pytest.mark.parametrize("value", [7, symbol("a"), None, ["a"]])
def test_string_field_refuses_a_value_that_is_not_a_string(value: object) -> None:
    data = properties({POOL: value})
    with pytest.raises(TypeError, match="meshbus:pool"):
        pn.string_field(data._data, "meshbus:pool")


def test_string_field_of_no_properties_is_none() -> None:
    assert pn.string_field(ffi.NULL, "meshbus:pool") is None
