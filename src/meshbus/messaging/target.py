"""Where a message goes or where a server listens: the oslo.messaging Target, in one small immutable value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """A destination for clients and a binding for servers and listeners.

    - `exchange`: a namespace of topics; None means the transport's default (`openstack`).
    - `topic`: the service; servers of one topic share its anycast address.
    - `server`: one server of the topic (a call to it goes to that server only).
    - `fanout`: a cast to every server of the topic.
    - `namespace` and `version`: which endpoint and API version a request is for (servers check both).
    """

    exchange: str | None = None
    topic: str | None = None
    namespace: str | None = None
    version: str | None = None
    server: str | None = None
    fanout: bool = False

    def replace(self, **changes: Any) -> Target:
        """This target with the given fields changed (`None` values leave a field as it is)."""
        given = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **given)
