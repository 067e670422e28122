"""Replication strategies as plugins see them: the ``place`` contract, and the ``groups`` strategy."""

from __future__ import annotations

import random

import pytest
from helpers import RingFactory, addresses, copies, settle

from balancer.config import Config
from balancer.errors import ConfigError
from balancer.keyspace import KeySpace
from balancer.plugin import Registry, plugin_manager
from balancer.plugins.replication import Groups
from balancer.types import Member, NodeInfo

SPACE = KeySpace()


def members(count: int, seed: int) -> list[Member]:
    rng = random.Random(seed)
    return [Member(f"10.0.{i // 200}.{i % 200}:9000", (rng.getrandbits(64),)) for i in range(count)]


def groups(strategy: Groups, view: list[Member]) -> list[list[str]]:
    return [list(g) for g in strategy.groups(tuple(view))]


@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("count", [1, 3, 4, 7, 40, 200])
def test_groups_cover_every_live_process_once_with_at_least_size_each(size: int, count: int) -> None:
    view = members(count, seed=count * size)
    formed = groups(Groups(size), view)
    placed = [a for g in formed for a in g]
    assert sorted(placed) == sorted(m.address for m in view)
    assert all(len(g) >= min(size, count) for g in formed)
    if count >= 40:  # on a large ring, groups stay small: no single group swallows the ring
        assert len(formed) >= count // (4 * size)


def changed_groups(strategy: Groups, before: list[Member], after: list[Member]) -> int:
    """How many groups of ``before`` are not groups of ``after``, once the process that joined or left
    is taken out of both (a group that only lost or gained it has not changed)."""
    moved = {m.address for m in before} ^ {m.address for m in after}
    old = {frozenset(g) - moved for g in groups(strategy, before)}
    new = {frozenset(g) - moved for g in groups(strategy, after)}
    return len(old - new)


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_one_process_joining_or_leaving_changes_its_group_and_at_most_the_next(size: int, seed: int) -> None:
    strategy = Groups(size)
    view = members(60, seed=seed * 10 + size)
    for gone in view:  # every process leaving, one at a time
        assert changed_groups(strategy, view, [m for m in view if m != gone]) <= 2, gone
    rng = random.Random(seed)
    for i in range(60):  # and processes joining anywhere
        joiner = Member(f"10.9.{i}.1:9000", (rng.getrandbits(64),))
        assert changed_groups(strategy, view, [*view, joiner]) <= 2, joiner
    down = [Member(m.address, m.ids, state="down") if m == view[7] else m for m in view]
    assert groups(strategy, down) == groups(strategy, [m for m in view if m != view[7]])


def test_short_runs_join_the_group_after_them() -> None:
    """Runs (from one leader to the next) of 3, 2, 1 and 3 processes, with groups of at least 3: the
    runs of 3 anchor groups, and the runs of 2 and 1 join the one after them."""
    strategy = Groups(3)
    leaders = (a for a in (f"10.1.0.{i}:9000" for i in range(1, 255)) if strategy.leads(a))
    others = (a for a in (f"10.2.0.{i}:9000" for i in range(1, 255)) if not strategy.leads(a))
    order = [next(leaders) if k == 0 else next(others) for length in (3, 2, 1, 3) for k in range(length)]
    view = [Member(address, (ident,)) for ident, address in enumerate(order, start=1)]
    assert groups(strategy, view) == [order[:3], order[3:]]  # 3 | 2 + 1 + 3
    without = [m for m in view if m != view[1]]  # the first run drops to 2: it joins the next group
    assert groups(strategy, without) == [[order[0], *order[2:]]]


def test_groups_size_is_a_validated_setting() -> None:
    registry = Registry(plugin_manager(load_entrypoints=False))
    made = registry.replication(Config(replication="groups", extra={"groups": {"size": "5"}}))
    assert isinstance(made, Groups)
    assert made.settings() == {"size": 5}
    for bad in ("2", "many", "65"):
        with pytest.raises(ConfigError, match=r"groups\.size"):
            registry.replication(Config(replication="groups", extra={"groups": {"size": bad}}))


async def test_a_groups_ring_keeps_each_key_on_its_owners_group(make_ring: RingFactory) -> None:
    nodes = await make_ring(12, replication="groups", vnodes=4)
    for node in nodes:
        await node.ring_status()  # every node's view of the members (a survey)
    keys = [f"k{i}".encode() for i in range(90)]
    for i, key in enumerate(keys):
        await nodes[i % 12].put(key, key)
    await settle(nodes)
    assert set((await copies(nodes)).values()) == {3}
    strategy = nodes[0].strategy
    assert isinstance(strategy, Groups)
    formed = strategy.groups(nodes[0].members())
    assert len(formed) >= 2
    assert sorted(a for g in formed for a in g) == sorted(n.address for n in nodes)
    for i, key in enumerate(keys):
        owner = (await nodes[0].lookup(key)).owner.address
        group = next(g for g in formed if owner in g)
        replicas, _ = await nodes[i % 12].kv.replica_set(key)
        assert addresses(replicas) <= set(group)
        assert owner in addresses(replicas)
        assert len(addresses(replicas)) == 3
        assert await nodes[(i + 5) % 12].get(key) == key


async def test_a_strategy_that_sees_the_ring_places_replicas(make_ring: RingFactory) -> None:
    """A third party's ``place``: replicas on every other process of the owner's successor list."""
    from balancer.hookspecs import Placement, ReplicationStrategy

    class EveryOther(ReplicationStrategy):
        async def place(self, key: bytes, replicas: int, ring: Placement) -> list[NodeInfo]:
            after: list[NodeInfo] = []
            for node in await ring.successors(ring.space.id(key)):
                if node.address not in {n.address for n in after}:
                    after.append(node)
            return after[::2] + after[1::2]

    nodes = await make_ring(6, vnodes=1, successors=8)
    for node in nodes:
        node.kv.strategy = EveryOther()
    await nodes[0].put("k", b"v")
    replicas, fallbacks = await nodes[1].kv.replica_set(b"k")
    ring = sorted(nodes, key=lambda n: n.info.id)
    owner = (await nodes[0].lookup("k")).owner.address
    start = [n.address for n in ring].index(owner)
    walk = [ring[(start + i) % 6].address for i in range(6)]
    assert [r.address for r in replicas] == [walk[0], walk[2], walk[4]]
    assert [f.address for f in fallbacks][:2] == [walk[1], walk[3]]
    assert await nodes[2].get("k") == b"v"
