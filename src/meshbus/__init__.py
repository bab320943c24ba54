"""meshbus: an AMQP 1.0 message-router network and RPC/notification library."""

__version__ = "0.1.0"
PRODUCT = "meshbus"
