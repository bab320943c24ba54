"""The errors meshbus.messaging raises. Each says what happened and, where there is one, what to do next."""

from __future__ import annotations

from meshbus.amqp.client import ClientError, LinkRefused, OutcomeUnknown

__all__ = [
    "ClientError",
    "ExpectedException",
    "InvalidTarget",
    "LinkRefused",
    "MessageDeliveryFailure",
    "MessageUndeliverable",
    "MessagingError",
    "MessagingTimeout",
    "NoSuchMethod",
    "OutcomeUnknown",
    "RemoteError",
    "UnsupportedVersion",
]


class MessagingError(Exception):
    """Base of the library's own errors (connection errors derive from `ClientError`).

    Those with fields keep their constructor's arguments as `args` and make their text in `__str__`, so
    that a caller rebuilding one from a reply (`args`, as oslo.messaging sends them) gets the same fields."""


class InvalidTarget(MessagingError, ValueError):
    """A target lacks what the operation needs (a topic to call, a server to listen as...)."""


class MessagingTimeout(MessagingError, TimeoutError):
    """No reply (or no acknowledgement) within the time-out."""


class MessageUndeliverable(MessagingError):
    """Nobody serves the address: the router gave the message back (released) at once."""

    def __init__(self, address: str, detail: str = "") -> None:
        super().__init__(address, detail)
        self.address = address
        self.detail = detail

    def __str__(self) -> str:
        return (
            f"nobody serves {self.address}{self.detail}: "
            "start a server or listener for it, or check the target"
        )


class MessageDeliveryFailure(MessagingError):
    """The consumer (or the router) refused the message: rejected, with the reason it gave."""


class RemoteError(MessagingError):
    """A server raised an exception whose type this process may not rebuild (not in allowed modules)."""

    def __init__(self, exc_type: str, value: str, traceback: str = "") -> None:
        super().__init__(exc_type, value, traceback)
        self.exc_type = exc_type
        self.value = value
        self.traceback = traceback

    def __str__(self) -> str:
        return f"remote error: {self.exc_type} {self.value}"


class NoSuchMethod(MessagingError, AttributeError):
    """A request named a method that no endpoint of its namespace and version has (or a private one)."""

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.method = method

    def __str__(self) -> str:
        return f"endpoint does not support RPC method {self.method}"


class UnsupportedVersion(MessagingError):
    """No endpoint serves the request's namespace at a compatible version."""

    def __init__(self, version: str, method: str | None = None) -> None:
        super().__init__(version, method)
        self.version = version
        self.method = method

    def __str__(self) -> str:
        return f"endpoint does not support RPC version {self.version}. Attempted method: {self.method}"


class ExpectedException(Exception):
    """Raised by `expected_exceptions` around an exception the endpoint declared: the server sends it to the
    caller without logging a traceback."""

    def __init__(self, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
        self.exc_info = exc_info
        super().__init__(str(exc_info[1]))
