"""Address rules: which way the router spreads messages sent to an address, and which addresses are queues.

1. This module owns the address rules (prefixes and patterns: distribution rules and queue rules), their
   order of precedence and the per-address lookup caches.
2. It must not do I/O, read the clock or log: the router core asks `DistributionRules.lookup`
   on its hot path (anonymous-relay messages) and gets an answer from memory.

Addresses are made of segments separated by '/' or '.'. A prefix matches the address equal to it
and every address continuing it at a segment boundary; a pattern matches whole addresses, with
'*' standing for exactly one segment and '#' for zero or more. When several rules match, the most
specific wins: more literal segments first, then a prefix before a pattern, then the later rule
(so rules given by the user override the built-in ones).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

SEPARATORS = "/."
_SPLIT = re.compile(r"[/.]")
# How many distinct addresses keep their answer; the cache evicts the least recently used beyond.
LOOKUP_CACHE_SIZE = 65_536

M = TypeVar("M", bound="Matching")


class Distribution(enum.Enum):
    CLOSEST = "closest"  # the nearest consumer gets each message
    BALANCED = "balanced"  # consumers share the messages, according to their credit
    MULTICAST = "multicast"  # every consumer gets a copy
    UNAVAILABLE = "unavailable"  # nobody may send or subscribe to the address


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressRule:
    """One rule: exactly one of `prefix` and `pattern`, and the distribution it gives."""

    prefix: str | None = None
    pattern: str | None = None
    distribution: Distribution = Distribution.BALANCED

    def __post_init__(self) -> None:
        if (self.prefix is None) == (self.pattern is None):
            raise ValueError("give exactly one of prefix and pattern")
        if self.prefix is not None:
            check_prefix(self.prefix)
        if self.pattern is not None:
            check_pattern(self.pattern)


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it can be used in a rule, else raise ValueError saying how to fix it."""
    if not prefix:
        raise ValueError("the prefix is empty; give the leading segments of the addresses to match")
    if prefix[-1] in SEPARATORS:
        raise ValueError(
            f"the prefix {prefix!r} ends with a separator; write {prefix.rstrip(SEPARATORS)!r},"
            " which also matches the addresses continuing it"
        )
    return prefix


def check_pattern(pattern: str) -> str:
    """Return `pattern` if it can be used in a rule, else raise ValueError saying how to fix it."""
    if not pattern:
        raise ValueError("the pattern is empty; give segments separated by '/' or '.'")
    for segment in _SPLIT.split(pattern):
        if segment not in ("*", "#") and ("*" in segment or "#" in segment):
            raise ValueError(
                f"the pattern {pattern!r} has {segment!r}: '*' and '#' must be whole segments,"
                " as in 'telemetry/*/samples/#'"
            )
    return pattern


class Matching(Protocol):
    """What the precedence and matching rules read of a rule: exactly one of `prefix` and `pattern`."""

    @property
    def prefix(self) -> str | None: ...

    @property
    def pattern(self) -> str | None: ...


def _specificity(rule: Matching, index: int) -> tuple[int, bool, int]:
    # Literal segments, then a prefix before a pattern, then the later rule: the greatest wins.
    if rule.prefix is not None:
        return len(_SPLIT.split(rule.prefix)), True, index
    assert rule.pattern is not None
    return sum(s not in ("*", "#") for s in _SPLIT.split(rule.pattern)), False, index


def _rule_regex(rule: Matching) -> re.Pattern[str]:
    # Matched against the address with a '/' appended, so that every segment, the last included,
    # ends with a separator: then '#' can stand for zero segments, and a prefix ends at a boundary.
    if rule.prefix is not None:
        return re.compile(re.escape(rule.prefix) + "[/.].*", re.DOTALL)
    assert rule.pattern is not None
    pieces = {"*": "[^/.]*[/.]", "#": "(?:[^/.]*[/.])*"}
    return re.compile("".join(pieces.get(s, re.escape(s) + "[/.]") for s in _SPLIT.split(rule.pattern)))


class DistributionRules:
    """The rules in force, and `lookup(address) -> Distribution`, cached per address."""

    lookup: Callable[[str], Distribution]

    def __init__(self, rules: Sequence[AddressRule], default: Distribution = Distribution.BALANCED) -> None:
        self.rules = tuple(rules)
        self.default = default
        self._by_precedence = [(regex, rule.distribution) for regex, rule in _by_precedence(self.rules)]
        # Per instance, so that the cache goes away with the rules it was computed from.
        self.lookup = functools.lru_cache(maxsize=LOOKUP_CACHE_SIZE)(self._match)

    def _match(self, address: str) -> Distribution:
        terminated = address + "/"
        for regex, distribution in self._by_precedence:
            if regex.fullmatch(terminated):
                return distribution
        return self.default


def _by_precedence(rules: Sequence[M]) -> list[tuple[re.Pattern[str], M]]:
    """Each rule with its regular expression, the one that wins first."""
    ranked = sorted(range(len(rules)), key=lambda i: _specificity(rules[i], i), reverse=True)
    return [(_rule_regex(rules[i]), rules[i]) for i in ranked]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueRule:
    """Addresses that are durable queues (issue 6): exactly one of `prefix` and `pattern`. Every router of a
    mesh has the same queue rules; `key` names the rule between them (`_store/<key>` is advertised by the
    routers that store its queues)."""

    prefix: str | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        AddressRule(prefix=self.prefix, pattern=self.pattern)  # the same checks as a distribution rule

    @property
    def key(self) -> str:
        return f"prefix:{self.prefix}" if self.prefix is not None else f"pattern:{self.pattern}"


# Addresses of the router's own making: never queues, whatever the rules match.
INTERNAL_PREFIXES: Final = ("_queue/", "_store/", "_dynamic/")


class QueueRules:
    """The queue rules in force, and `lookup(address) -> QueueRule | None`, cached per address, with the
    precedence of distribution rules (the most specific wins)."""

    lookup: Callable[[str], QueueRule | None]

    def __init__(self, rules: Sequence[QueueRule]) -> None:
        self.rules = tuple(rules)
        self._by_precedence = _by_precedence(self.rules)
        self.lookup = functools.lru_cache(maxsize=LOOKUP_CACHE_SIZE)(self._match)

    def _match(self, address: str) -> QueueRule | None:
        if address.startswith(INTERNAL_PREFIXES):
            return None
        terminated = address + "/"
        for regex, rule in self._by_precedence:
            if regex.fullmatch(terminated):
                return rule
        return None


def _oslo_rules(root: str) -> list[AddressRule]:
    return [
        AddressRule(prefix=f"{root}/multicast", distribution=Distribution.MULTICAST),
        AddressRule(prefix=f"{root}/unicast", distribution=Distribution.CLOSEST),
        AddressRule(prefix=f"{root}/anycast", distribution=Distribution.BALANCED),
    ]


# The routable addresses of oslo.messaging's AMQP 1.0 driver, for RPC and for notifications.
DEFAULT_RULES: tuple[AddressRule, ...] = (
    *_oslo_rules("openstack.org/om/rpc"),
    *_oslo_rules("openstack.org/om/notify"),
)

# Every oslo notification is stored: a listener that is down, restarting or slow misses nothing.
DEFAULT_QUEUE_RULES: tuple[QueueRule, ...] = (QueueRule(prefix="openstack.org/om/notify"),)
