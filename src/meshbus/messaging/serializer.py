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
    """Entities to JSON primitives: datetimes as ISO text, sets and tuples as lists, objects by `__dict__`."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return to_primitive(entity)


def to_primitive(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(key): to_primitive(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_primitive(item) for item in value]
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if hasattr(value, "__dict__"):
        return to_primitive(vars(value))
    return str(value)
