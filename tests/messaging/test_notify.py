"""Notifications through a real router, in both faces: every priority to its endpoint method, filters,
batches, pools, requeue, serializers; and NotificationFilter on its own."""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from meshbus.messaging import (
    NotificationFilter,
    NotificationResult,
    Serializer,
    Target,
)
from meshbus.messaging.notify import message_id, timestamp
from tests.messaging.conftest import WAIT, Api, Inbox
from tests.messaging.test_rpc import Money, MoneySerializer, RequestContext

PRIORITIES = ["audit", "debug", "info", "warn", "error", "critical", "sample"]
# Notifier method -> the listener's endpoint method it reaches
NOTIFIER_METHODS = {**{p: p for p in PRIORITIES}, "warning": "warn"}


class Recorder:
    """An endpoint with a method for every priority; each records what it got."""

    def __init__(self, inbox: Inbox | None = None, filter_rule: NotificationFilter | None = None) -> None:
        self.inbox = inbox or Inbox()
        if filter_rule is not None:
            self.filter_rule = filter_rule
        for priority in PRIORITIES:
            setattr(self, priority, self._recorder(priority))

    def _recorder(self, priority: str) -> Any:
        def record(ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
            self.inbox.put(
                {
                    "priority": priority,
                    "ctxt": ctxt,
                    "publisher_id": publisher_id,
                    "event_type": event_type,
                    "payload": payload,
                    "metadata": metadata,
                }
            )

        return record


class InfoOnly:
    def __init__(self) -> None:
        self.inbox = Inbox()

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.inbox.put(payload)


def test_every_priority_reaches_its_endpoint_method_on_every_topic(api: Api, topic: str) -> None:
    topics = [topic + "-a", topic + "-b"]
    recorder = Recorder()
    api.listener(api.transport(), [Target(topic=t) for t in topics], [recorder])
    notifier = api.notifier(api.transport(), "compute.host1", topics=topics)
    for n, method in enumerate(NOTIFIER_METHODS):
        getattr(notifier, method)({"user": "alice"}, f"compute.{method}", {"n": n})
        # Accepted once stored (notification addresses are queues): the listener gets it soon after.
        items = recorder.inbox.wait_for(2 * (n + 1))
        got = items[-2:]
        assert len(items) == 2 * (n + 1), f"{method}: not delivered once to each topic"
        for notification in got:
            assert set(notification["metadata"]) == {"message_id", "timestamp"}
            assert {key: value for key, value in notification.items() if key != "metadata"} == {
                "priority": NOTIFIER_METHODS[method],
                "ctxt": {"user": "alice"},
                "publisher_id": "compute.host1",
                "event_type": f"compute.{method}",
                "payload": {"n": n},
            }
    ids = Counter(n["metadata"]["message_id"] for n in recorder.inbox.items)
    assert set(ids.values()) == {2}, "each notification goes to both topics under one message id"
    for notification in recorder.inbox.items:  # oslo's forms: a random UUID, a UTC time without offset
        message_id, timestamp = notification["metadata"]["message_id"], notification["metadata"]["timestamp"]
        assert str(uuid.UUID(message_id)) == message_id and uuid.UUID(message_id).version == 4
        assert uuid.UUID(message_id).variant == uuid.RFC_4122
        sent = datetime.datetime.fromisoformat(timestamp)
        assert sent.tzinfo is None
        assert abs(sent - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)) < datetime.timedelta(
            minutes=1
        )


def test_prepare_changes_the_publisher(api: Api, topic: str) -> None:
    listening = InfoOnly()
    recorder = Recorder()
    api.listener(api.transport(), [Target(topic=topic)], [recorder, listening])
    notifier = api.notifier(api.transport(), "first", topics=[topic])
    notifier.prepare(publisher_id="second").info({}, "e", 1)
    notifier.info({}, "e", 2)
    got = recorder.inbox.wait_for(2)
    assert [(n["publisher_id"], n["payload"]) for n in got] == [("second", 1), ("first", 2)]
    assert listening.inbox.wait_for(2) == [1, 2], "every endpoint with the method gets the notification"


def test_a_listener_takes_only_the_priorities_its_endpoints_have(api: Api, topic: str) -> None:
    endpoint = InfoOnly()
    api.listener(api.transport(), [Target(topic=topic)], [endpoint])
    notifier = api.notifier(api.transport(), "p", topics=[topic], timeout=30.0)
    notifier.info({}, "e", "info")
    notifier.error({}, "e", "error")  # stored for a listener of that priority (a queue address)
    notifier.info({}, "e", "info again")
    assert endpoint.inbox.wait_for(2) == ["info", "info again"]


def test_a_listener_needs_an_endpoint_method_for_some_priority(api: Api, topic: str) -> None:
    with pytest.raises(ValueError, match="no endpoint has a method for any priority"):
        api.listener(api.transport(), [Target(topic=topic)], [object()])


# -- filters ------------------------------------------------------------------------------------------------


NOTIFICATION: dict[str, Any] = {
    "ctxt": {"user": "alice", "project": 7},
    "publisher_id": "compute.host1",
    "event_type": "instance.create.end",
    "metadata": {"message_id": "m-1", "timestamp": "2026-01-01 00:00:00"},
    "payload": {"state": "active", "size": 2},
}


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        (NotificationFilter(), True),
        (NotificationFilter(publisher_id=r"compute\."), True),
        (NotificationFilter(publisher_id="host1"), False),  # matched from the start
        (NotificationFilter(event_type=r"instance\.(create|delete)"), True),
        (NotificationFilter(event_type=r"volume\."), False),
        (NotificationFilter(context={"user": "ali"}), True),  # a regular expression for text
        (NotificationFilter(context={"user": "bob"}), False),
        (NotificationFilter(context={"project": 7}), True),  # equality otherwise
        (NotificationFilter(context={"project": 8}), False),
        (NotificationFilter(context={"domain": ".*"}), False),  # a missing key never matches
        (NotificationFilter(payload={"state": "active", "size": 2}), True),
        (NotificationFilter(payload={"state": "deleted"}), False),
        (NotificationFilter(metadata={"message_id": "m-1"}), True),
        (NotificationFilter(publisher_id="compute", event_type="volume"), False),  # all must match
    ],
)
def test_a_filter_matches_every_field_it_names(rule: NotificationFilter, matches: bool) -> None:
    assert rule.match(**NOTIFICATION) is matches


def test_a_filter_on_a_payload_that_is_not_a_mapping_matches_no_payload_rule() -> None:
    assert not NotificationFilter(payload={"state": "active"}).match({}, "p", "e", {}, ["state"])
    assert NotificationFilter(event_type="e").match({}, "p", "e", {}, ["state"])


def test_endpoints_get_only_the_notifications_their_filters_let_through(api: Api, topic: str) -> None:
    endpoints = {
        "compute": Recorder(filter_rule=NotificationFilter(publisher_id=r"compute\.")),
        "create": Recorder(filter_rule=NotificationFilter(event_type=r"instance\.create")),
        "alice": Recorder(filter_rule=NotificationFilter(context={"user": "alice"})),
        "active": Recorder(filter_rule=NotificationFilter(payload={"state": "active"})),
        "all": Recorder(),
    }
    api.listener(api.transport(), [Target(topic=topic)], list(endpoints.values()))
    transport = api.transport()
    sent = [
        ("compute.host1", {"user": "alice"}, "instance.create.end", {"n": 0, "state": "active"}),
        ("compute.host2", {"user": "bob"}, "instance.delete.end", {"n": 1, "state": "deleted"}),
        ("volume.host1", {"user": "alice"}, "volume.create.end", {"n": 2, "state": "active"}),
        ("volume.host2", {"user": "bob"}, "volume.delete.end", {"n": 3}),
    ]
    for publisher_id, ctxt, event_type, payload in sent:
        api.notifier(transport, publisher_id, topics=[topic]).info(ctxt, event_type, payload)
    # Each endpoint got its own; "all", called last, got every one.
    endpoints["all"].inbox.wait_for(4)
    got = {name: [n["payload"]["n"] for n in endpoint.inbox.items] for name, endpoint in endpoints.items()}
    assert got == {"compute": [0, 1], "create": [0], "alice": [0, 2], "active": [0, 2], "all": [0, 1, 2, 3]}


# -- batches ------------------------------------------------------------------------------------------------


class Batches:
    def __init__(self) -> None:
        self.inbox = Inbox()

    def info(self, notifications: list[dict[str, Any]]) -> None:
        self.inbox.put(notifications)


def test_a_batch_is_dispatched_when_full(api: Api, topic: str) -> None:
    endpoint = Batches()
    api.listener(api.transport(), [Target(topic=topic)], [endpoint], batch_size=5)
    notifier = api.notifier(api.transport(), "batcher", topics=[topic], at_least_once=False)
    for n in range(10):
        notifier.info({"user": "alice"}, "tick", n)
    batches = endpoint.inbox.wait_for(2)
    assert [len(batch) for batch in batches] == [5, 5]
    assert sorted(n["payload"] for batch in batches for n in batch) == list(range(10))
    first = batches[0][0]
    assert set(first) == {"ctxt", "publisher_id", "event_type", "payload", "metadata"}
    assert (first["ctxt"], first["publisher_id"], first["event_type"]) == (
        {"user": "alice"},
        "batcher",
        "tick",
    )


def test_a_batch_is_dispatched_after_its_time_out(api: Api, topic: str) -> None:
    endpoint = Batches()
    api.listener(api.transport(), [Target(topic=topic)], [endpoint], batch_size=100, batch_timeout=0.1)
    notifier = api.notifier(api.transport(), "batcher", topics=[topic])
    for n in range(3):
        notifier.info({}, "tick", n)
    # Each is accepted once stored; the batch timeout sends whatever arrived in a batch.
    deadline = time.monotonic() + WAIT
    while sum(map(len, endpoint.inbox.items)) < 3 and time.monotonic() < deadline:
        endpoint.inbox.wait_for(len(endpoint.inbox.items) + 1)
    assert [n["payload"] for batch in endpoint.inbox.items for n in batch] == [0, 1, 2]


# -- acknowledgement ----------------------------------------------------------------------------------------


class RequeueFirst:
    """Asks for a notification again the first time it sees it."""

    def __init__(self) -> None:
        self.inbox = Inbox()

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> str:
        first = metadata["message_id"] not in {m["message_id"] for _, m in self.inbox.items}
        self.inbox.put((payload, metadata))
        return NotificationResult.REQUEUE if first else NotificationResult.HANDLED


def test_a_requeued_notification_is_delivered_again(api: Api, topic: str) -> None:
    endpoint = RequeueFirst()
    api.listener(api.transport(), [Target(topic=topic)], [endpoint], allow_requeue=True)
    api.notifier(api.transport(), "p", topics=[topic], timeout=30.0).info({}, "e", "again")
    (first, first_metadata), (second, second_metadata) = endpoint.inbox.wait_for(2)
    assert first == second == "again"
    assert first_metadata == second_metadata


def test_requeue_is_ignored_unless_the_listener_allows_it(api: Api, topic: str) -> None:
    endpoint = RequeueFirst()
    api.listener(api.transport(), [Target(topic=topic)], [endpoint])
    notifier = api.notifier(api.transport(), "p", topics=[topic], timeout=30.0)
    notifier.info({}, "e", "once")
    endpoint.inbox.wait_for(1)
    notifier.info({}, "e", "next")
    # A requeued notification would come back before the next one.
    assert [payload for payload, _ in endpoint.inbox.wait_for(2)] == ["once", "next"]


# -- pools --------------------------------------------------------------------------------------------------


def test_each_pool_gets_every_notification_and_its_members_share_them(api: Api, topic: str) -> None:
    members = {(pool, i): Recorder() for pool in ("audit", "billing") for i in (1, 2)}
    unpooled = Recorder()
    transports = [api.transport(), api.transport()]
    for (pool, i), endpoint in members.items():
        api.listener(transports[i - 1], [Target(topic=topic)], [endpoint], pool=pool)
    api.listener(transports[0], [Target(topic=topic)], [unpooled])
    notifier = api.notifier(api.transport(), "p", topics=[topic])
    for n in range(12):
        notifier.info({}, "e", n)
    time.sleep(0.2)  # room for copies that should not exist
    for pool in ("audit", "billing"):
        shares = [[n["payload"] for n in members[pool, i].inbox.items] for i in (1, 2)]
        assert sorted(shares[0] + shares[1]) == list(range(12)), f"pool {pool} did not get each once"
        assert all(shares), f"the members of pool {pool} do not share: {shares}"
    assert [n["payload"] for n in unpooled.inbox.items] == list(range(12))


# -- serializers --------------------------------------------------------------------------------------------


def test_a_serializer_carries_payload_and_context_to_the_listener(api: Api, topic: str) -> None:
    recorder = Recorder()
    # Fields of a context or payload that the serializer made objects cannot be matched: no error, no match.
    by_fields = Recorder(filter_rule=NotificationFilter(context={"user": "alice"}, payload={"cents": 250}))
    api.listener(api.transport(), [Target(topic=topic)], [recorder, by_fields], serializer=MoneySerializer())
    notifier = api.notifier(api.transport(), "bank", topics=[topic], serializer=MoneySerializer())
    notifier.audit(RequestContext("alice"), "payment", Money(250, "EUR"))
    [notification] = recorder.inbox.wait_for(1)
    assert (notification["ctxt"], notification["payload"]) == (RequestContext("alice"), Money(250, "EUR"))
    assert by_fields.inbox.items == []


class Failing:
    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        raise RuntimeError("the endpoint failed")


class BrokenRule:
    def match(self, **fields: Any) -> bool:
        raise RuntimeError("the filter failed")


class BehindBrokenRule(InfoOnly):
    filter_rule = BrokenRule()


def listener_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "meshbus.messaging.notify" and r.levelno >= 40
    ]


def test_an_endpoint_that_raises_counts_as_handled(
    api: Api, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    after = InfoOnly()
    api.listener(api.transport(), [Target(topic=topic)], [Failing(), after])
    api.notifier(api.transport(), "p", topics=[topic], timeout=30.0).info({}, "e", "x")
    assert after.inbox.wait_for(1) == ["x"], "the endpoints after a failing one are still called"
    assert len(listener_errors(caplog)) == 1


def test_a_notification_whose_dispatch_fails_is_still_acknowledged(
    api: Api, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BehindBrokenRule()
    api.listener(api.transport(), [Target(topic=topic)], [broken])
    api.notifier(api.transport(), "p", topics=[topic], timeout=30.0).info({}, "e", "x")
    deadline = time.monotonic() + WAIT  # accepted once stored: the listener's dispatch comes after
    while not listener_errors(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broken.inbox.items == []
    assert len(listener_errors(caplog)) == 1


# -- stopping -----------------------------------------------------------------------------------------------


class HeldInfo:
    """Holds each notification until the test lets it go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.calls = 0

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
        self.calls += 1
        self.started.set()
        assert self.go.wait(WAIT)


def test_a_listener_stopped_mid_work_still_acknowledges_what_it_took(api: Api, topic: str) -> None:
    endpoint = HeldInfo()
    listener = api.listener(api.transport(), [Target(topic=topic)], [endpoint])
    notifier = api.notifier(api.transport(), "p", topics=[topic], timeout=30.0)
    notifier.info({}, "e", "in work")
    assert endpoint.started.wait(WAIT)
    listener.stop()  # takes nothing more; the notification in work must still be acknowledged
    endpoint.go.set()
    listener.wait()
    notifier.flush()  # it was taken: no MessageUndeliverable
    assert endpoint.calls == 1  # and not resent


class Unserializable(Serializer):
    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        raise ValueError(f"cannot serialize {entity!r}")


def test_what_the_serializer_raises_reaches_the_caller(api: Api, topic: str) -> None:
    notifier = api.notifier(api.transport(), "p", topics=[topic], serializer=Unserializable())
    with pytest.raises(ValueError, match="cannot serialize 'payload'"):
        notifier.info({}, "e", "payload")
    notifier.flush()  # nothing was sent


def test_notifications_of_a_virtual_host_reach_its_listeners(api: Api, topic: str) -> None:
    tenant_a = api.url + "tenant-a"
    endpoint = InfoOnly()
    api.listener(api.transport(tenant_a), [Target(topic=topic)], [endpoint])
    api.notifier(api.transport(tenant_a), "p", topics=[topic]).info({}, "e", {"n": 1})
    assert endpoint.inbox.wait_for(1) == [{"n": 1}]


def test_notification_ids_are_random_uuids() -> None:
    ids = [message_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:1000]:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_a_forked_child_makes_ids_of_its_own() -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its first id, then out without pytest's teardown
        os.write(write, message_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 64).decode() != message_id()


@pytest.mark.parametrize(
    "now", [1_700_000_000_000_000_000, 1_700_000_000_250_000_000, 1_700_000_001_000_042_999]
)
def test_timestamps_are_written_as_oslo_writes_them(monkeypatch: pytest.MonkeyPatch, now: int) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: now)
    as_oslo = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=now // 1000)
    assert timestamp() == str(as_oslo)  # the fraction left out when it is zero, as str(datetime) does
