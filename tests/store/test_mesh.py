"""A queue stored by one router of a mesh, its producer and its consumer on others: A - B - C in a line, the
store on B only; and a `meshbus store` process attached to a router. Notifications sent before any listener
exists reach a listener on another router than the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshbus.messaging import MessageUndeliverable, NotificationListener, Notifier, Target, Transport
from tests.conftest import Config, Router, start_router
from tests.mesh_routers.conftest import INTER_ROUTER_LISTENER, TIMERS, WAIT, reachable
from tests.messaging.conftest import Inbox

MESSAGES = 30


class Listening:
    def __init__(self) -> None:
        self.inbox = Inbox()

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.inbox.put(payload)


def start(router: Callable[[Config], Router], router_id: str, store: bool, to: Router | None) -> Router:
    config: dict[str, Any] = {
        "router": {"id": router_id},
        "mesh": TIMERS,
        "listener": [{}, {"role": "inter-router"}],
        "store": {"enabled": store},
    }
    if to is not None:
        found = to.wait_for_log(INTER_ROUTER_LISTENER, WAIT)
        assert found is not None
        config["connector"] = [{"host": found.group(1), "port": int(found.group(2)), "role": "inter-router"}]
    return router(config)


def test_a_queue_stored_on_another_router_than_its_producer_and_consumer(
    router: Callable[[Config], Router],
) -> None:
    a = start(router, "A", False, None)
    b = start(router, "B", True, a)
    c = start(router, "C", False, b)
    for one, other in (("A", c), ("C", a)):
        assert other.wait_for_log(reachable(one), WAIT), f"the mesh did not converge:\n{other.log()}"
    stored_elsewhere(a, b, c)
    assert "meshbus.store" not in a.log() + c.log(), "A and C store nothing"


def test_a_store_process_keeps_the_queues_of_the_router_it_attaches_to(
    router: Callable[[Config], Router], tmp_path: Path
) -> None:
    a = start(router, "A", False, None)
    found = a.wait_for_log(INTER_ROUTER_LISTENER, WAIT)
    assert found is not None
    config = {
        "router": {"id": "S"},
        "mesh": TIMERS,
        "listener": [{"role": "inter-router"}],  # its only listener: no clients
        "connector": [{"host": found.group(1), "port": int(found.group(2)), "role": "inter-router"}],
    }
    store = start_router(tmp_path, "S", config, command="store")
    try:
        assert a.wait_for_log(reachable("S"), WAIT), f"the store did not join:\n{a.log()}"
        stored_elsewhere(a, store, a)
    finally:
        store.stop()
    assert "meshbus.store" not in a.log(), "A stores nothing"


def stored_elsewhere(a: Router, b: Router, c: Router) -> None:
    """Notifications sent on A before any listener exists, stored on B, all reach a listener on C."""
    producer, consumer = Transport(a.url), Transport(c.url)
    listener = None
    try:
        notifier = Notifier(producer, "p", topics=["meshed"])
        deadline = time.monotonic() + WAIT
        while True:  # until A has learnt from the mesh that B stores notifications
            try:
                notifier.info({}, "e", 0)
                notifier.flush()
                break
            except MessageUndeliverable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for n in range(1, MESSAGES):
            notifier.info({}, "e", n)  # stored on B: nobody listens yet
        assert b.wait_for_log(r"store .* opened", WAIT)
        endpoint = Listening()
        listener = NotificationListener(consumer, [Target(topic="meshed")], [endpoint])
        listener.start()
        assert sorted(endpoint.inbox.wait_for(MESSAGES, WAIT)) == list(range(MESSAGES))
    finally:
        if listener is not None:
            listener.stop()
            listener.wait()
        producer.close()
        consumer.close()
