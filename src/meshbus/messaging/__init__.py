"""meshbus.messaging: RPC and notifications over a meshbus router, in the oslo.messaging programming model.

    transport = Transport("meshbus://router1:5672,router2:5672/")
    client = RPCClient(transport, Target(topic="compute"))
    client.call({}, "echo", text="hello")

Every blocking class has an asyncio twin (`AsyncTransport`, `AsyncRPCClient`, ...) on the caller's loop.
"""

from meshbus.messaging.exceptions import (
    ClientError,
    ExpectedException,
    InvalidTarget,
    LinkRefused,
    MessageDeliveryFailure,
    MessageUndeliverable,
    MessagingError,
    MessagingTimeout,
    NoSuchMethod,
    OutcomeUnknown,
    RemoteError,
    UnsupportedVersion,
)
from meshbus.messaging.notify import (
    AsyncNotificationListener,
    AsyncNotifier,
    NotificationFilter,
    NotificationListener,
    NotificationResult,
    Notifier,
)
from meshbus.messaging.rpc import (
    AsyncRPCClient,
    AsyncRPCServer,
    RPCClient,
    RPCServer,
    expected_exceptions,
)
from meshbus.messaging.serializer import JsonPayloadSerializer, NoOpSerializer, Serializer
from meshbus.messaging.target import Target
from meshbus.messaging.transport import AsyncTransport, Transport, TransportURL

__all__ = [
    "AsyncNotificationListener",
    "AsyncNotifier",
    "AsyncRPCClient",
    "AsyncRPCServer",
    "AsyncTransport",
    "ClientError",
    "ExpectedException",
    "InvalidTarget",
    "JsonPayloadSerializer",
    "LinkRefused",
    "MessageDeliveryFailure",
    "MessageUndeliverable",
    "MessagingError",
    "MessagingTimeout",
    "NoOpSerializer",
    "NoSuchMethod",
    "NotificationFilter",
    "NotificationListener",
    "NotificationResult",
    "Notifier",
    "OutcomeUnknown",
    "RPCClient",
    "RPCServer",
    "RemoteError",
    "Serializer",
    "Target",
    "Transport",
    "TransportURL",
    "UnsupportedVersion",
    "expected_exceptions",
]
