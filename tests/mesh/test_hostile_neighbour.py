"""A neighbour that sends any sequence of well-formed protocol messages, lies included (our own id, stale or
enormous sequence numbers, links to routers it does not have): the node never fails, and every route it
gives the forwarding layer leads out through a link that is up."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshbus.mesh.config import MeshConfig
from meshbus.mesh.messages import (
    Hello,
    LinkStateRequest,
    LinkStateUpdate,
    Message,
    MessageError,
    MobileAddressRequest,
    MobileAddressUpdate,
    RouterAdvertisement,
    Summary,
    decode,
)
from meshbus.mesh.node import MeshNode
from tests.mesh.test_node import Recorder

IDS = st.sampled_from(["a", "b", "c", "d"])  # "a" is the node's own
INSTANCES = st.sampled_from([0, 1, 2, 3, 2**63 - 1])
SEQS = st.one_of(st.integers(0, 5), st.just(2**63 - 1))
ADDRESSES = st.lists(st.sampled_from(["x", "y", "z"]), unique=True, max_size=3).map(tuple)
MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, IDS, INSTANCES, st.lists(IDS, unique=True).map(tuple)),
    st.builds(
        LinkStateUpdate,
        IDS,
        INSTANCES,
        SEQS,
        st.lists(st.tuples(IDS, st.integers(0, 2**31)), unique_by=lambda link: link[0]).map(tuple),
    ),
    st.builds(LinkStateRequest, st.lists(IDS, unique=True).map(tuple)),
    st.builds(MobileAddressUpdate, IDS, INSTANCES, SEQS, ADDRESSES, ADDRESSES, st.none() | ADDRESSES),
    st.builds(MobileAddressRequest, st.lists(IDS, unique=True).map(tuple)),
    st.builds(
        RouterAdvertisement,
        st.lists(st.builds(Summary, IDS, INSTANCES, SEQS, SEQS), max_size=4).map(tuple),
    ),
)
LINKS = ["L1", "L2"]
STEPS = st.lists(st.tuples(st.sampled_from(LINKS), MESSAGES | st.sampled_from(["tick", "down", "up"])))


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_any_well_formed_messages_leave_the_node_working(steps: list[tuple[str, Message | str]]) -> None:
    recorder = Recorder()
    node = MeshNode("a", 1, MeshConfig(), recorder, random.Random(0))
    up: set[str] = set()
    now = 0.0
    for link in LINKS:
        node.link_up(link, 1, now)
        up.add(link)
    for link, step in steps:
        now += 0.3
        if step == "tick":
            node.tick(max(now, node.next_tick()))
        elif step == "down" and link in up:
            node.link_down(link, now)
            up.discard(link)
        elif step == "up" and link not in up:
            node.link_up(link, 1, now)
            up.add(link)
        elif isinstance(step, str):
            continue
        elif link in up:
            try:  # what the wire refuses never reaches the node
                message = decode(step.to_dict())
            except MessageError:
                continue
            node.handle(link, message, now)
        if recorder.tables:  # the table in force
            table = recorder.tables[-1]
            for router_id in table.routes:
                assert table.link_to(router_id) in up, f"the route to {router_id} uses a link that is down"
