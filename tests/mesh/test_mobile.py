"""Mobile addresses: our own updates, others' updates in and out of order, resync, and the reachable view."""

from __future__ import annotations

from meshbus.mesh.messages import MobileAddressUpdate
from meshbus.mesh.mobile import MobileAddresses, Verdict

B, BC, NONE = frozenset({"b"}), frozenset({"b", "c"}), frozenset[str]()


def mau(seq: int, added: tuple[str, ...] = (), removed: tuple[str, ...] = (), instance: int = 200):
    return MobileAddressUpdate("b", instance, seq, added, removed)


def full(seq: int, exist: tuple[str, ...], instance: int = 200) -> MobileAddressUpdate:
    return MobileAddressUpdate("b", instance, seq, exist=exist)


def reachable_b(instance: int = 200) -> MobileAddresses:
    addresses = MobileAddresses("a", 100)
    assert addresses.count({"b": instance}) == {}
    return addresses


def test_our_changes_go_as_one_update_per_batch() -> None:
    addresses = MobileAddresses("a", 100)
    assert addresses.originate() is None
    addresses.add_local("x")
    addresses.add_local("y")
    addresses.add_local("x")
    assert addresses.originate() == MobileAddressUpdate("a", 100, 1, added=("x", "y"))
    addresses.add_local("z")
    addresses.remove_local("z")  # came and went between two batches: nothing to tell
    assert addresses.originate() is None
    addresses.remove_local("x")
    assert addresses.originate() == MobileAddressUpdate("a", 100, 2, removed=("x",))
    assert addresses.full_update("a") == MobileAddressUpdate("a", 100, 2, exist=("y",))
    assert addresses.version("a") == (100, 2)
    assert addresses.view() == {}  # the view holds other routers only


def test_updates_in_order_apply_and_change_the_view() -> None:
    addresses = reachable_b()
    assert addresses.receive(mau(1, added=("x", "y"))) == (Verdict.APPLIED, {"x": B, "y": B})
    assert addresses.receive(mau(2, removed=("x",))) == (Verdict.APPLIED, {"x": NONE})
    assert addresses.receive(mau(2, removed=("y",))) == (Verdict.KNOWN, {})
    assert addresses.view() == {"y": B}
    assert addresses.full_update("b") == full(2, ("y",))


def test_a_gap_asks_for_the_full_set_which_then_applies() -> None:
    addresses = reachable_b()
    addresses.receive(mau(1, added=("x",)))
    assert addresses.receive(mau(3, added=("z",))) == (Verdict.GAP, {})
    assert addresses.receive(full(2, ("y",))) == (Verdict.APPLIED, {"x": NONE, "y": B})
    assert addresses.receive(full(2, ("x",))) == (Verdict.KNOWN, {})
    assert addresses.receive(mau(3, added=("z",))) == (Verdict.APPLIED, {"z": B})


def test_an_unknown_router_must_start_from_its_first_update() -> None:
    addresses = reachable_b()
    assert addresses.receive(mau(2, added=("x",)))[0] is Verdict.GAP
    assert addresses.receive(mau(1, added=("x",)))[0] is Verdict.APPLIED


def test_a_restarted_router_starts_from_nothing() -> None:
    addresses = reachable_b(instance=201)
    addresses.receive(mau(4, added=("old",), instance=200))
    assert addresses.receive(mau(1, added=("new",), instance=201)) == (Verdict.APPLIED, {"new": B})
    assert addresses.receive(mau(5, added=("older",), instance=200)) == (Verdict.KNOWN, {})
    assert addresses.view() == {"new": B}


def test_only_reachable_routers_at_their_link_state_instance_count() -> None:
    addresses = MobileAddresses("a", 100)
    assert addresses.receive(mau(1, added=("x",))) == (Verdict.APPLIED, {})  # b not reachable yet
    assert addresses.routers("x") == NONE
    assert addresses.count({"b": 200}) == {"x": B}
    assert addresses.routers("x") == B
    assert addresses.count({"b": 201}) == {"x": NONE}  # b restarted: its old addresses do not count
    assert addresses.count({"b": 200}) == {"x": B}
    assert addresses.count({}) == {"x": NONE}  # unreachable
    assert addresses.view() == {}


def test_many_routers_share_an_address() -> None:
    addresses = MobileAddresses("a", 100)
    addresses.count({"b": 200, "c": 300})
    addresses.receive(mau(1, added=("x",)))
    assert addresses.receive(MobileAddressUpdate("c", 300, 1, added=("x",))) == (
        Verdict.APPLIED,
        {"x": BC},
    )
    assert addresses.remove("b") == {"x": {"c"}}
    assert addresses.remove("c") == {"x": NONE}
    assert set(addresses.origins()) == set()


def test_addresses_from_before_a_restart_are_dropped() -> None:
    addresses = reachable_b()
    addresses.receive(mau(1, added=("x",)))
    assert addresses.drop_older("b", 200) == {}
    assert addresses.drop_older("b", 201) == {"x": NONE}
    assert addresses.version("b") is None


def test_updates_with_our_id_ahead_of_us_claim_our_id() -> None:
    addresses = MobileAddresses("a", 100)
    addresses.add_local("x")
    addresses.originate()
    assert addresses.receive(MobileAddressUpdate("a", 100, 1, added=("x",)))[0] is Verdict.KNOWN
    assert addresses.receive(MobileAddressUpdate("a", 100, 2, added=("y",)))[0] is Verdict.CLAIMS_OUR_ID
    assert addresses.receive(MobileAddressUpdate("a", 101, 1, exist=()))[0] is Verdict.CLAIMS_OUR_ID
