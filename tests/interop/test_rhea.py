"""rhea (Node.js), a standard AMQP 1.0 client, through a meshbus router, unmodified: with itself and with
python-qpid-proton, messages keep their sections and values; consumers' outcomes reach rhea's senders; the
request-reply pattern on a dynamic reply address; a message to nobody is released at once."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from proton import Message
from proton.utils import BlockingConnection

from meshbus.messaging import RPCServer, Target, Transport
from tests import cached
from tests.conftest import Router
from tests.integration.clients import unique
from tests.json_peers import Start, printed

# The first test may install rhea: npm on a cold cache.
pytestmark = pytest.mark.timeout(cached.INSTALL_TIMEOUT + 60)

WAIT = 10.0  # seconds for what takes milliseconds
RAW = b"\x00\x01\xfe\xff"
# As peer.js takes them: a binary body as {"binary": base64}.
MESSAGES: list[dict[str, Any]] = [
    {
        "body": "text",
        "subject": "plain",
        "message_id": "m-0",
        "application_properties": {"colour": "blue", "n": 7},
    },
    {"body": {"map": {"nested": [1, "two", None, True]}}, "message_id": "m-1"},
    {"body": [1.5, "x", -3], "message_id": "m-2"},
    {"body": {"binary": base64.b64encode(RAW).decode()}, "message_id": "m-3"},
]
# The same messages as python-qpid-proton gives or takes them.
PROTON_BODIES: list[Any] = ["text", {"map": {"nested": [1, "two", None, True]}}, [1.5, "x", -3], RAW]


def received(peer_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line["message"] for line in peer_lines if "message" in line]


def outcomes(peer_lines: list[dict[str, Any]]) -> list[str]:
    return [line["outcome"] for line in sorted(peer_lines, key=lambda line: line["n"])]


def test_messages_from_rhea_to_rhea_arrive_as_sent(rhea_peer: Start, default_router: Router) -> None:
    address = unique("rhea/plain")
    receiver = rhea_peer("receive", default_router.url, address=address, count=len(MESSAGES))
    printed(receiver, ready=True)
    sender = rhea_peer("send", default_router.url, address=address, messages=MESSAGES)
    assert outcomes(sender.finish()) == ["accepted"] * len(MESSAGES)
    assert received(receiver.finish()) == MESSAGES


def test_messages_from_rhea_to_python_proton_arrive_as_sent(rhea_peer: Start, default_router: Router) -> None:
    address = unique("rhea/to-proton")
    connection = BlockingConnection(default_router.url, timeout=WAIT)
    try:
        receiver = connection.create_receiver(address, credit=len(MESSAGES))
        sender = rhea_peer("send", default_router.url, address=address, messages=MESSAGES)
        messages = []
        for _ in MESSAGES:
            messages.append(receiver.receive(timeout=WAIT))
            receiver.accept()
    finally:
        connection.close()  # after the accepted dispositions: same connection, in order
    assert outcomes(sender.finish()) == ["accepted"] * len(MESSAGES)
    assert [message.body for message in messages] == PROTON_BODIES
    assert [message.id for message in messages] == [f"m-{n}" for n in range(len(MESSAGES))]
    first: dict[str, Any] = {"subject": messages[0].subject, "properties": messages[0].properties}
    assert first == {"subject": "plain", "properties": {"colour": "blue", "n": 7}}


def test_messages_from_python_proton_to_rhea_arrive_as_sent(rhea_peer: Start, default_router: Router) -> None:
    address = unique("rhea/from-proton")
    receiver = rhea_peer("receive", default_router.url, address=address, count=len(MESSAGES))
    printed(receiver, ready=True)
    connection = BlockingConnection(default_router.url, timeout=WAIT)
    try:
        sender = connection.create_sender(address)
        for spec, body in zip(MESSAGES, PROTON_BODIES, strict=True):
            message = Message(body=body, id=spec["message_id"], subject=spec.get("subject"))
            message.properties = spec.get("application_properties")
            sender.send(message, timeout=WAIT)  # raises unless accepted
    finally:
        connection.close()
    assert received(receiver.finish()) == MESSAGES


@pytest.mark.parametrize(("consumer_says", "sender_sees"), [("reject", "rejected"), ("release", "released")])
def test_a_consumers_outcome_reaches_the_rhea_sender(
    rhea_peer: Start, default_router: Router, consumer_says: str, sender_sees: str
) -> None:
    address = unique("rhea/outcome")
    receiver = rhea_peer("receive", default_router.url, address=address, count=1, outcome=consumer_says)
    printed(receiver, ready=True)
    sender = rhea_peer("send", default_router.url, address=address, messages=MESSAGES[:1])
    (outcome,) = sender.finish()
    assert outcome["outcome"] == sender_sees
    if sender_sees == "rejected":
        assert outcome["condition"] == "rhea-peer:refused"
    receiver.finish()


def test_rhea_request_reply_on_a_dynamic_reply_address(rhea_peer: Start, default_router: Router) -> None:
    address = unique("rhea/service")
    server = rhea_peer("serve", default_router.url, address=address)
    printed(server, ready=True)
    requests = [f"request-{n}" for n in range(20)]
    caller = rhea_peer("call", default_router.url, address=address, requests=requests)
    replies = caller.finish()
    assert sorted((line["correlation_id"], line["reply"]["echo"]) for line in replies) == list(
        enumerate(requests)
    )
    server.finish()


def test_a_rhea_message_to_nobody_is_released_at_once(rhea_peer: Start, default_router: Router) -> None:
    nobody = unique("rhea/nobody")
    message = {"body": "anyone?", "to": nobody}
    sender = rhea_peer("send", default_router.url, anonymous=True, messages=[message])
    (outcome,) = sender.finish()
    print("released after (ms):", outcome["ms"])
    assert outcome["outcome"] == "released"  # not held: an anonymous sender has credit, nobody to send to


class Doubler:
    def double(self, ctxt: dict[str, Any], value: int) -> dict[str, Any]:
        return {"doubled": value * 2, "user": ctxt.get("user")}


def test_rhea_calls_a_meshbus_messaging_server_in_the_oslo_wire_format(
    rhea_peer: Start, default_router: Router
) -> None:
    """A service written against no meshbus code at all: its requests are the oslo AMQP 1.0 driver's JSON
    text on the server's routable address, its reply address a dynamic one."""
    topic = unique("rhea-service").replace("/", "-")
    with Transport(f"meshbus://{default_router.host}:{default_router.port}/") as transport:
        server = RPCServer(transport, Target(topic=topic, server="s1"), [Doubler()])
        server.start()
        try:
            address = transport.aio.rpc_address(Target(topic=topic))
            requests = [
                json.dumps(
                    {"request": {"method": "double", "args": {"value": n}}, "context": {"user": "rhea"}}
                )
                for n in range(5)
            ]
            caller = rhea_peer("call", default_router.url, address=address, requests=requests)
            replies = {line["correlation_id"]: json.loads(line["reply"]) for line in caller.finish()}
        finally:
            server.stop()
            server.wait()
    # rhea's message ids are numbers: each reply's correlation id is its request's, of the same type
    assert replies == {n: {"response": {"doubled": 2 * n, "user": "rhea"}} for n in range(5)}
