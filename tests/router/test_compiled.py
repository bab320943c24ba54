"""The router's hot path stays compiled: mypyc compiles these modules (setup.py), but a method it cannot
compile, such as the `__init__` a dataclass generates, runs interpreted and costs about a microsecond."""

import types

import pytest

from meshbus.router import core


@pytest.mark.skipif(not core.__file__ or core.__file__.endswith(".py"), reason="installed without mypyc")
def test_a_delivery_is_made_by_compiled_code() -> None:
    # One Delivery is made per message: its __init__ must not be a Python function.
    assert not isinstance(core.Delivery.__init__, types.FunctionType)
