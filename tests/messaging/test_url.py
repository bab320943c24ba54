"""Transport URLs: hosts for fail-over, credentials, options, and the errors a bad URL gets. No router."""

from __future__ import annotations

import pytest

from meshbus.amqp.client import Host
from meshbus.messaging import TransportURL


def test_hosts_are_tried_in_the_order_given() -> None:
    url = TransportURL.parse("meshbus://router1:5672,router2:5673,router3/")
    assert url.hosts == [Host("router1", 5672), Host("router2", 5673), Host("router3", 5672)]


def test_a_host_without_credentials_uses_the_previous_hosts() -> None:
    url = TransportURL.parse("meshbus://alice:secret@router1:5672,router2,bob:pw@router3:5674/")
    assert url.hosts == [
        Host("router1", 5672, "alice", "secret"),
        Host("router2", 5672, "alice", "secret"),
        Host("router3", 5674, "bob", "pw"),
    ]


def test_credentials_are_percent_decoded() -> None:
    [host] = TransportURL.parse("meshbus://us%40er:p%3Ass%2Fword@router1/").hosts
    assert (host.user, host.password) == ("us@er", "p:ss/word")


def test_a_user_without_password_has_an_empty_one() -> None:
    [host] = TransportURL.parse("meshbus://alice@router1/").hosts
    assert (host.user, host.password) == ("alice", "")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("meshbus://", Host("127.0.0.1", 5672)),
        ("meshbus:///", Host("127.0.0.1", 5672)),
        ("amqp://router1:5680", Host("router1", 5680)),
        ("meshbus://[::1]:5673/", Host("::1", 5673)),
        ("meshbus://[::1]/", Host("::1", 5672)),
        ("meshbus://:5680/", Host("127.0.0.1", 5680)),
    ],
)
def test_defaults_and_address_forms(url: str, host: Host) -> None:
    assert TransportURL.parse(url).hosts == [host]


@pytest.mark.parametrize(
    ("url", "virtual_host"),
    [
        ("meshbus://router1/", None),
        ("meshbus://router1", None),
        ("meshbus://router1/nova", "nova"),
        ("meshbus://a:1,b:2/nova/?idle_timeout=2", "nova"),
        ("amqp://router1/tenant%2Fa?idle_timeout=2", "tenant/a"),
        ("meshbus://router1//", None),
        ("meshbus://router1/%2F", None),
    ],
)
def test_the_path_is_the_virtual_host(url: str, virtual_host: str | None) -> None:
    assert TransportURL.parse(url).virtual_host == virtual_host


@pytest.mark.parametrize(
    "url",
    [
        "meshbus://router1:5672/?idle_timeout=2.5&container_id=svc-1&reconnect_delay=0.1",
        "meshbus://router1:5672?idle_timeout=2.5&container_id=svc-1&reconnect_delay=0.1",
    ],
)
def test_options_become_connection_options(url: str) -> None:
    parsed = TransportURL.parse(url)
    assert parsed.hosts == [Host("router1", 5672)]
    options = parsed.connection_options()
    assert (options.idle_timeout, options.container_id, options.reconnect_delay) == (2.5, "svc-1", 0.1)


def test_every_documented_option_is_taken() -> None:
    options = TransportURL.parse(
        "meshbus://h/?idle_timeout=1&reconnect_delay=2&max_reconnect_delay=3&sender_idle_timeout=4"
    ).connection_options()
    assert (
        options.idle_timeout,
        options.reconnect_delay,
        options.max_reconnect_delay,
        options.sender_idle_timeout,
    ) == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://router1:5672/", "expected meshbus://host:port/"),
        ("router1:5672", "expected meshbus://host:port/"),
        ("meshbus://router1:amqp/", "port 'amqp' is not a number"),
        ("meshbus://router1:5672,router2:x/", "port 'x' is not a number"),
        ("meshbus://router1:70000/", r"port 70000 is out of range \(1 to 65535\)"),
        ("meshbus://router1:0/", r"port 0 is out of range"),
    ],
)
def test_a_bad_url_is_refused_with_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as refused:
        TransportURL.parse(url)
    assert url in str(refused.value), "the error does not quote the URL"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("colour=blue", "option 'colour' is unknown"),
        ("idle_timeout=soon", "idle_timeout='soon': expected seconds"),
    ],
)
def test_a_bad_option_is_refused_with_its_name(query: str, words: str) -> None:
    parsed = TransportURL.parse(f"meshbus://router1/?{query}")
    with pytest.raises(ValueError, match=words):
        parsed.connection_options()
