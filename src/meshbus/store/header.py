"""The delivery count of a stored message as its consumer sees it: the header's delivery-count field.

Rules of this module:
1. It rewrites the header section of an encoded message (or puts one in front where there is none) and
   leaves every other section's bytes as they were. Encoding and decoding are proton's (`proton.Data`):
   no hand-written AMQP codec.
2. It is called only for redeliveries (count > 0), off the hot path of first deliveries.
"""

from __future__ import annotations

from typing import Any, Final

from proton import Data, Described, symbol, uint, ulong

HEADER_CODE: Final = ulong(0x70)
HEADER_NAME: Final = symbol("amqp:header:list")
DELIVERY_COUNT: Final = 4  # the field's index: durable, priority, ttl, first-acquirer, delivery-count


def with_delivery_count(payload: bytes, count: int) -> bytes:
    """The encoded message `payload` with its header's delivery-count set to `count`."""
    fields: list[Any] = []
    rest = payload
    if payload:
        data = Data()
        size = data.decode(payload)
        data.rewind()
        data.next()
        section = data.get_object()
        if (
            isinstance(section, Described)
            and section.descriptor in (HEADER_CODE, HEADER_NAME)
            and isinstance(section.value, list)
        ):
            fields = list(section.value)
            rest = payload[size:]
    fields.extend([None] * (DELIVERY_COUNT + 1 - len(fields)))
    fields[DELIVERY_COUNT] = uint(count)
    header = Data()
    header.put_object(Described(HEADER_CODE, fields))
    return bytes(header.encode()) + rest
