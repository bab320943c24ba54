"""Serializers turn request arguments, results, notification payloads and contexts into JSON-ready values
and back. A service with its own objects (oslo.versionedobjects, say) passes its own serializer."""

from __future__ import annotations

import datetime
from typing import Any


class Serializer:
    """The interface: every method is the identity here (the no-op serializer)."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def serialize_context(self, ctxt: Any) -> dict[str, Any]:
        return dict(ctxt) if ctxt else {}

    def deserialize_context(self, ctxt: dict[str, Any]) -> Any:
        return ctxt


NoOpSerializer = Serializer


class JsonPayloadSerializer(Serializer):
    """Entities to JSON primitives (`to_primitive`)."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return to_primitive(entity)


# oslo.serialization's, so that services on oslo.messaging read what this library writes: microseconds
# always, no offset (timeutils.parse_strtime reads exactly this).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"


def to_primitive(value: Any) -> Any:
    """A value as JSON can hold it, in oslo.serialization's formats where it has one: datetimes in
    `TIME_FORMAT` (an aware one in UTC first), dates as ISO text, bytes as UTF-8 text, sets and tuples as
    lists. Beyond oslo's: other objects by their `__dict__`, then as `str`."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(key): to_primitive(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_primitive(item) for item in value]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value.strftime(TIME_FORMAT)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if hasattr(value, "__dict__"):
        return to_primitive(vars(value))
    return str(value)
