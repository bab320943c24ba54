"""The link-state database: versions, restarts, claims on our id, and the graph of two-way links."""

from __future__ import annotations

import pytest

from meshbus.mesh.linkstate import LinkStateDatabase, Verdict
from meshbus.mesh.messages import LinkStateUpdate


def test_our_own_state_changes_only_when_our_links_do() -> None:
    database = LinkStateDatabase("a", 100)
    assert database.version("a") == (100, 0)
    assert database.originate({"b": 1}) == LinkStateUpdate("a", 100, 1, (("b", 1),))
    assert database.originate({"b": 1}) is None
    assert database.originate({"b": 1, "c": 2}) == LinkStateUpdate("a", 100, 2, (("b", 1), ("c", 2)))
    assert database.update_for("a") == LinkStateUpdate("a", 100, 2, (("b", 1), ("c", 2)))


def test_only_newer_versions_replace_a_routers_state() -> None:
    database = LinkStateDatabase("a", 100)
    assert database.receive(LinkStateUpdate("b", 200, 5, (("a", 1),))) is Verdict.NEWER
    assert database.receive(LinkStateUpdate("b", 200, 5, ())) is Verdict.KNOWN
    assert database.receive(LinkStateUpdate("b", 200, 4, ())) is Verdict.KNOWN
    assert database.receive(LinkStateUpdate("b", 201, 1, ())) is Verdict.NEWER  # restarted: seq starts again
    assert database.receive(LinkStateUpdate("b", 200, 9, (("a", 1),))) is Verdict.KNOWN  # its previous life
    assert database.update_for("b") == LinkStateUpdate("b", 201, 1, ())
    assert database.update_for("c") is None


def test_updates_with_our_id_ahead_of_us_claim_our_id() -> None:
    database = LinkStateDatabase("a", 100)
    database.originate({"b": 1})
    assert (
        database.receive(LinkStateUpdate("a", 100, 1, (("b", 1),))) is Verdict.KNOWN
    )  # our own, flooded back
    assert database.receive(LinkStateUpdate("a", 99, 7, ())) is Verdict.KNOWN  # our previous life
    assert database.receive(LinkStateUpdate("a", 100, 2, ())) is Verdict.CLAIMS_OUR_ID
    assert database.receive(LinkStateUpdate("a", 101, 1, ())) is Verdict.CLAIMS_OUR_ID
    assert database.version("a") == (100, 1)


def test_the_graph_has_the_links_both_ends_report_at_the_larger_cost() -> None:
    database = LinkStateDatabase("a", 100)
    database.originate({"b": 1, "c": 4})
    database.receive(LinkStateUpdate("b", 200, 1, (("a", 3), ("c", 1))))
    database.receive(LinkStateUpdate("c", 300, 1, (("d", 1),)))  # c does not report a, nor b
    assert database.graph() == {"a": {"b": 3}, "b": {"a": 3}, "c": {}}
    database.receive(LinkStateUpdate("c", 300, 2, (("a", 2), ("b", 1))))
    assert database.graph() == {"a": {"b": 3, "c": 4}, "b": {"a": 3, "c": 1}, "c": {"a": 4, "b": 1}}


def test_removing_forgets_other_routers_only() -> None:
    database = LinkStateDatabase("a", 100)
    database.receive(LinkStateUpdate("b", 200, 1, ()))
    database.remove("b")
    assert set(database.origins()) == {"a"}
    with pytest.raises(ValueError, match="router a: its own link state cannot be removed"):
        database.remove("a")
