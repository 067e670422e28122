"""Virtual nodes: where ids go, replica sets of distinct processes, weights, traffic, and the ring view."""

from __future__ import annotations

import asyncio
import random
import statistics

import pluggy
import pytest
from helpers import QUIET, RingFactory, addresses, converge
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import Config
from balancer.errors import IncompatibleConfigError
from balancer.keyspace import KeySpace
from balancer.node import Node
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.ring import NEIGHBOURS_PER_ROUND
from balancer.vnodes import allocate_ids, derived_ids, ownership, vnode_count

SPACE = KeySpace()


def placed_ring(processes: int, vnodes: int, weights: dict[str, float] | None = None) -> dict[int, str]:
    """Ids of ``processes`` processes joining one after another, each placed as a joining node does."""
    weights = weights or {}
    ring: dict[int, str] = {}
    for p in range(processes):
        address = f"10.0.{p // 250}.{p % 250}:9000"
        weight = weights.get(address, 1.0)
        count = vnode_count(vnodes, weight)
        fallback = derived_ids(address, count, SPACE)
        for ident in allocate_ids(ring, weights, weight, count, SPACE, fallback, address):
            ring[ident] = address
    return ring


def test_vnode_counts_and_derived_ids() -> None:
    assert vnode_count(32, 1.0) == 32
    assert vnode_count(32, 0.5) == 16
    assert vnode_count(32, 0.01) == 1
    ids = derived_ids("10.0.0.1:9000", 8, SPACE)
    assert ids == derived_ids("10.0.0.1:9000", 8, SPACE)  # stable
    assert len(set(ids)) == 8
    assert ids[0] == SPACE.id("10.0.0.1:9000")  # the first is the address's own hash


@pytest.mark.parametrize(("processes", "bound"), [(3, 1.01), (10, 1.05), (100, 1.05)])
def test_placed_ids_share_the_space_evenly(processes: int, bound: float) -> None:
    owned = ownership(placed_ring(processes, 32), SPACE)
    assert len(owned) == processes
    assert max(owned.values()) / statistics.mean(owned.values()) <= bound


def test_a_joiner_takes_exactly_its_share_and_only_from_others() -> None:
    before = placed_ring(9, 16)
    shares = ownership(before, SPACE)
    ids = allocate_ids(before, {}, 1.0, 16, SPACE, address="10.9.9.9:9000")
    assert len(ids) == 16
    assert not set(ids) & set(before)
    after = ownership({**before, **dict.fromkeys(ids, "new")}, SPACE)
    assert after["new"] == pytest.approx(SPACE.size / 10, rel=0.01)
    assert all(after[a] <= shares[a] for a in shares)  # nobody gains from a join


def test_two_joiners_with_the_same_view_pick_different_ids() -> None:
    ring = placed_ring(4, 8)
    first = allocate_ids(ring, {}, 1.0, 8, SPACE, address="10.1.0.1:9000")
    second = allocate_ids(ring, {}, 1.0, 8, SPACE, address="10.1.0.2:9000")
    assert not set(first) & set(second)


def test_weight_buys_a_proportional_share() -> None:
    heavy = "10.0.0.3:9000"
    owned = ownership(placed_ring(6, 16, {heavy: 2.0}), SPACE)
    light = statistics.mean(v for a, v in owned.items() if a != heavy)
    assert owned[heavy] / light == pytest.approx(2.0, rel=0.1)


async def test_vnodes_of_one_process_talk_without_the_network(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    config = Config(
        transport="local",
        load_entrypoints=False,
        vnodes=8,
        replicas=1,
        write_quorum=1,
        read_quorum=1,
    ).evolve(**QUIET)
    async with Node(config, pm=pm, transport=LocalTransport(network)) as alone:
        for _ in range(3):
            await alone.ring.stabilize()
            await alone.ring.check_predecessor()
        await alone.ring.fix_all()
        await alone.put("k", b"v")
        assert await alone.get("k") == b"v"
        assert len(alone.ring.vnodes) == 8
        assert sum(network.calls.values()) == 0


@pytest.mark.parametrize(("processes", "vnodes"), [(3, 32), (12, 16)])
async def test_maintenance_messages_do_not_grow_with_vnodes(
    make_ring: RingFactory, network: LocalNetwork, processes: int, vnodes: int
) -> None:
    nodes = await make_ring(processes, vnodes=vnodes)
    bound = min(processes - 1, NEIGHBOURS_PER_ROUND)
    for node in nodes:
        for _ in range(3):  # the round robin moves on: every round stays within the bound
            network.calls.clear()
            await node.ring.stabilize()
            await node.ring.check_predecessor()
            # a batch of states and one of notifications to each process of the round, a batch of pings
            assert sum(network.calls.values()) <= 3 * bound, network.calls


@settings(max_examples=12)
@given(
    layout=st.lists(st.tuples(st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0])), min_size=1, max_size=5),
    strategy=st.sampled_from(["successor", "multi-ring"]),
    seed=st.integers(0, 2**16),
)
async def test_replica_sets_never_repeat_a_process(
    layout: list[tuple[int, float]], strategy: str, seed: int
) -> None:
    network = LocalNetwork()
    nodes: list[Node] = []
    rng = random.Random(seed)
    replicas = min(3, len(layout))
    try:
        for vnodes, weight in layout:
            config = Config(
                transport="local",
                load_entrypoints=False,
                vnodes=vnodes,
                weight=weight,
                replication=strategy,
                replicas=replicas,
                write_quorum=1,
                read_quorum=1,
            ).evolve(**QUIET)
            join = rng.choice(nodes).address if nodes else None
            node = Node(config, join=join, transport=LocalTransport(network))
            await node.start()
            nodes.append(node)
        await converge(nodes)
        for i in range(40):
            key = f"key-{rng.random()}-{i}".encode()
            found, _ = await nodes[i % len(nodes)].kv.replica_set(key)
            assert len(found) == len(addresses(found)) == replicas, found
            owner = (await nodes[0].ring.find_successor(SPACE.id(key))).owner
            assert owner.id in {v.info.id for n in nodes for v in n.ring.vnodes}  # a vnode, by its id
    finally:
        for node in nodes:
            await node.close()


async def test_a_joiner_with_other_replication_settings_is_refused(
    make_ring: RingFactory, network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    (first,) = await make_ring(1, replicas=1, write_quorum=1, read_quorum=1)
    changes: list[dict[str, object]] = [
        {"replication": "multi-ring"},
        {"replication": "groups"},
        {"write_quorum": 1, "read_quorum": 1, "replicas": 2},
    ]
    for change in changes:
        config = first.config.evolve(**change)
        with pytest.raises(IncompatibleConfigError, match="differ in"):
            await Node(config, join=first.address, pm=pm, transport=LocalTransport(network)).start()
    # the strategy's own settings are ring settings too
    (grouped,) = await make_ring(1, replication="groups", replicas=1, write_quorum=1, read_quorum=1)
    larger = grouped.config.evolve(extra={"groups": {"size": 4}})
    with pytest.raises(IncompatibleConfigError, match=r"differ in groups\.size"):
        await Node(larger, join=grouped.address, pm=pm, transport=LocalTransport(network)).start()
    other_size = first.config.evolve(vnodes=4, weight=2.0)  # size is not a ring setting
    async with Node(other_size, join=first.address, pm=pm, transport=LocalTransport(network)) as joined:
        assert len(joined.ring.vnodes) == 8


async def test_the_ring_view_lists_every_member_and_marks_a_dead_one_down(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(4, vnodes=8)
    for i in range(40):
        await nodes[i % 4].put(f"k{i}", b"v")
    status = await nodes[0].ring_status()
    assert status.settled
    assert [m.address for m in status.members] == sorted(n.address for n in nodes)
    assert all(m.state == "up" and len(m.ids) == 8 for m in status.members)
    assert sum(m.share or 0 for m in status.members) == pytest.approx(1.0)
    assert sum(m.records or 0 for m in status.members) == 3 * 40
    assert nodes[1].members() != ()
    dead = nodes[3]
    network.kill(dead.address)
    status = await nodes[0].ring_status()
    states = {m.address: m.state for m in status.members}
    assert states[dead.address] == "down"
    assert [states[n.address] for n in nodes[:3]] == ["up"] * 3
    assert not status.settled  # the others still point at it
    await converge(nodes[:3])
    status = await nodes[0].ring_status()
    assert status.settled
    assert {m.address: m.state for m in status.members}[dead.address] == "down"  # still listed
    assert nodes[0].members() == status.members


async def test_ring_view_requests_share_surveys(
    make_ring: RingFactory, network: LocalNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("balancer.node.VIEW_REUSE", 3600.0)  # however slow this machine is today
    nodes = await make_ring(3, vnodes=4)
    before = network.calls["ring.describe"]
    views = await asyncio.gather(*(nodes[0].ring_view() for _ in range(20)))
    assert all(view == views[0] for view in views)
    surveyed = network.calls["ring.describe"] - before
    assert 0 < surveyed <= 2  # one survey: a message to each of the two other processes
    again = await nodes[0].ring_view()  # within VIEW_REUSE of the last survey: answered from it
    assert again == views[0]
    assert network.calls["ring.describe"] - before == surveyed
