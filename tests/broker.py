"""An external AMQP 1.0 broker for the tests: a private RabbitMQ node with its AMQP 1.0 plugin.

1. `rabbitmq_amqp` (session-scoped; a test asks for it by name) starts a node of the test run's own
   (bench/rabbit.py: own node name, directory, HOME, epmd; listening on free ports of 127.0.0.1 only; no
   management plugin), never the system's RabbitMQ service, and stops it by PID when the session ends.
2. AMQP 1.0 clients log in anonymously (SASL ANONYMOUS) as the plugin's default user, guest.
3. Without Debian's rabbitmq-server the tests that ask for it are skipped, saying what to install.

Behaviours of the plugin (RabbitMQ 3.10) that tests and the router must allow for:
- `/queue/NAME` is queue NAME, declared on attach; durable only when the link's terminus asks for it, and
  once durable, a link asking for a non-durable terminus ends its session (amqp:precondition-failed);
- a message sent to `/amq/queue/NAME` for a queue that does not exist is accepted and dropped;
- a released message comes back with its delivery count still 0 (first-acquirer false);
- the modified outcome is unknown to it, whatever its flags: it ends the consumer's session
  (amqp:invalid-field, "Unrecognised state"); it knows accepted, rejected and released only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The node is started as the benchmarks start theirs: bench/rabbit.py, importable as `rabbit` from there.
sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
import rabbit

PLUGIN_SETTINGS = {"amqp1_0.default_user": "guest"}  # the user of anonymous AMQP 1.0 connections


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    pid: int  # the node's Erlang VM

    @property
    def url(self) -> str:
        return f"amqp://{self.host}:{self.port}"


@pytest.fixture(scope="session")
def rabbitmq_amqp() -> Iterator[Broker]:
    """A private RabbitMQ node accepting AMQP 1.0 on 127.0.0.1, for the whole session."""
    if (reason := rabbit.missing()) is not None:
        pytest.skip(f"no AMQP 1.0 broker: {reason}")
    with rabbit.rabbitmq("test", plugins=[rabbit.AMQP1_PLUGIN], settings=PLUGIN_SETTINGS) as node:
        yield Broker(node.host, node.port, node.pid)
