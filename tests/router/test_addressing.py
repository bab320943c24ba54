import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshbus.router.addressing import (
    DEFAULT_RULES,
    AddressRule,
    Distribution,
    DistributionRules,
)

CLOSEST, BALANCED, MULTICAST, UNAVAILABLE = Distribution


def prefix(text: str, distribution: Distribution = MULTICAST) -> AddressRule:
    return AddressRule(prefix=text, distribution=distribution)


def pattern(text: str, distribution: Distribution = MULTICAST) -> AddressRule:
    return AddressRule(pattern=text, distribution=distribution)


def matches(rule: AddressRule, address: str) -> bool:
    return DistributionRules([rule], default=UNAVAILABLE).lookup(address) is rule.distribution


def test_distribution_values_are_the_config_names():
    assert [d.value for d in Distribution] == ["closest", "balanced", "multicast", "unavailable"]


@pytest.mark.parametrize(
    ("address", "expected"),
    [("a/b", True), ("a/b/c", True), ("a/b.c", True), ("a/b/c/d", True), ("a/bc", False), ("a", False)],
)
def test_prefix_matches_at_segment_boundaries(address, expected):
    assert matches(prefix("a/b"), address) is expected


def test_prefix_separators_are_literal():
    assert not matches(prefix("a/b"), "a.b")


@pytest.mark.parametrize(
    ("rule", "address", "expected"),
    [
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a.b.c", True),
        ("a/*/c", "a/c", False),
        ("a/*/c", "a/b/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/#/c", "a/c", True),
        ("a/#/c", "a/x/y/c", True),
        ("a/#/c", "a/x/y/d", False),
        ("#", "anything/at.all", True),
        ("#/c", "c", True),
        ("a/b", "a/b/c", False),
        ("telemetry/*/samples/#", "telemetry/node1/samples/cpu.load", True),
        ("a.+/b", "aa/b", False),
    ],
)
def test_pattern_matches_whole_addresses(rule, address, expected):
    assert matches(pattern(rule), address) is expected


def test_more_literal_segments_win_regardless_of_order():
    rules = [prefix("a/b/c", CLOSEST), prefix("a", MULTICAST), pattern("a/*/c/#", UNAVAILABLE)]
    assert DistributionRules(rules).lookup("a/b/c/d") is CLOSEST
    assert DistributionRules(rules[::-1]).lookup("a/b/c/d") is CLOSEST
    assert DistributionRules(rules).lookup("a/x/c/d") is UNAVAILABLE


def test_prefix_beats_pattern_with_as_many_literal_segments():
    rules = [prefix("a/b", CLOSEST), pattern("a/b/#", MULTICAST)]
    assert DistributionRules(rules).lookup("a/b/c") is CLOSEST
    assert DistributionRules(rules[::-1]).lookup("a/b/c") is CLOSEST


def test_later_rule_wins_a_tie():
    assert DistributionRules([prefix("a", CLOSEST), prefix("a", MULTICAST)]).lookup("a/b") is MULTICAST
    assert DistributionRules([pattern("a/*", CLOSEST), pattern("a/#", MULTICAST)]).lookup("a/b") is MULTICAST


def test_unmatched_address_gets_the_default():
    assert DistributionRules([prefix("a")]).lookup("b") is BALANCED
    assert DistributionRules([prefix("a")], default=CLOSEST).lookup("b") is CLOSEST


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("openstack.org/om/rpc/multicast/nova/compute", MULTICAST),
        ("openstack.org/om/rpc/unicast/nova/compute/host-1", CLOSEST),
        ("openstack.org/om/rpc/anycast/nova/compute", BALANCED),
        ("openstack.org/om/notify/multicast/nova/notifications.info", MULTICAST),
        ("openstack.org/om/notify/unicast/nova/notifications.info", CLOSEST),
        ("openstack.org/om/notify/anycast/nova/notifications.info", BALANCED),
    ],
)
def test_default_rules_follow_oslo_routable_addresses(address, expected):
    assert DistributionRules(DEFAULT_RULES, default=UNAVAILABLE).lookup(address) is expected


def test_user_rule_overrides_a_default_rule():
    rules = DistributionRules([*DEFAULT_RULES, prefix("openstack.org/om/rpc/anycast", CLOSEST)])
    assert rules.lookup("openstack.org/om/rpc/anycast/nova/compute") is CLOSEST


def test_lookup_is_cached_per_address(monkeypatch):
    calls = []
    real_match = DistributionRules._match

    def counting_match(self, address):
        calls.append(address)
        return real_match(self, address)

    monkeypatch.setattr(DistributionRules, "_match", counting_match)
    rules = DistributionRules([prefix("a")])
    assert [rules.lookup("a/b"), rules.lookup("a/b"), rules.lookup("c")] == [MULTICAST, MULTICAST, BALANCED]
    assert calls == ["a/b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of prefix and pattern"),
        ({"prefix": "a", "pattern": "a"}, "give exactly one of prefix and pattern"),
        ({"prefix": ""}, "the prefix is empty"),
        ({"prefix": "a/b/"}, "the prefix 'a/b/' ends with a separator; write 'a/b'"),
        ({"pattern": ""}, "the pattern is empty"),
        ({"pattern": "a/b*/c"}, "the pattern 'a/b*/c' has 'b*': '*' and '#' must be whole segments"),
    ],
)
def test_invalid_rules_say_what_to_write(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AddressRule(**kwargs)


# Property tests: the rules against a slow, obviously correct reference on segment lists.

segments = st.lists(st.sampled_from(["a", "b", "c", ""]), min_size=1, max_size=5)
separators = st.sampled_from(["/", "."])


def join(parts: list[str], seps: list[str]) -> str:
    return parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:], strict=False))


@st.composite
def addresses(draw: st.DrawFn, parts: st.SearchStrategy[list[str]] = segments) -> str:
    drawn = draw(parts)
    return join(drawn, draw(st.lists(separators, min_size=len(drawn), max_size=len(drawn))))


def reference_pattern_match(tokens: list[str], parts: list[str]) -> bool:
    if not tokens:
        return not parts
    head, rest = tokens[0], tokens[1:]
    if head == "#":
        return any(reference_pattern_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and (head == "*" or head == parts[0]) and reference_pattern_match(rest, parts[1:])


@given(addresses(st.lists(st.sampled_from(["a", "b", "*", "#"]), min_size=1, max_size=4)), addresses())
def test_pattern_agrees_with_segment_reference(rule, address):
    expected = reference_pattern_match(re.split("[/.]", rule), re.split("[/.]", address))
    assert matches(pattern(rule), address) is expected


@given(addresses(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=3)), addresses())
def test_prefix_agrees_with_string_definition(rule, address):
    expected = address == rule or (address.startswith(rule) and address[len(rule)] in "/.")
    assert matches(prefix(rule), address) is expected
