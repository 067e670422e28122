"""Seeded simulations on the in-process network: rings form, survive mass failure, and keep keys."""

from __future__ import annotations

import random

from helpers import RingFactory, addresses, converge, copies, ring_is_correct, settle

from balancer.plugins.local_transport import LocalNetwork


async def test_64_nodes_converge_then_survive_a_quarter_failing(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(64, seed=7, vnodes=8)
    assert ring_is_correct(nodes)
    for node in nodes:
        for vnode in node.ring.vnodes:  # eight distinct processes after each vnode
            assert len(addresses(vnode.successors)) == len(vnode.successors) == 8

    rng = random.Random(11)
    keys = [f"key-{i}" for i in range(400)]
    for key in keys:
        await rng.choice(nodes).put(key, key.encode())
    await settle(nodes, passes=1)
    holders = {node.address: {r.key for r in await node.local_records()} for node in nodes}
    assert set((await copies(nodes)).values()) == {3}  # N = 3

    dead = rng.sample(nodes, 16)
    for node in dead:
        network.kill(node.address)
    alive = [n for n in nodes if n not in dead]
    rounds = await converge(alive)
    assert rounds > 0
    assert ring_is_correct(alive)

    # every lookup from every survivor names the true owner: the vnode with the first id at or after
    ring = sorted(v.info for n in alive for v in n.ring.vnodes)
    for i in range(200):
        key = f"probe-{i}"
        ident = nodes[0].space.id(key.encode())
        owner = next((v for v in ring if v.id >= ident), ring[0])
        found = await alive[i % len(alive)].lookup(key)
        assert found.owner == owner, (key, found)
        assert len(addresses(found.successors)) == len(found.successors)  # distinct processes

    # every key that kept a replica is readable through any survivor, and is copied back to N = 3
    survived = set().union(*(holders[n.address] for n in alive))
    assert len(survived) > 0.95 * len(keys)  # all three replicas of a key die together rarely
    for key in keys:
        if key.encode() in survived:
            assert await rng.choice(alive).get(key) == key.encode()
    await settle(alive)
    assert set((await copies(alive)).values()) == {3}


async def test_mean_hops_stay_near_half_log_n(make_ring: RingFactory) -> None:
    nodes = await make_ring(64, seed=3, vnodes=8)
    hops = [(await nodes[i % 64].lookup(f"h{i}")).hops for i in range(500)]  # network messages
    mean = sum(hops) / len(hops)
    assert mean <= 0.5 * 6 * 1.15  # 0.5 log2 64, with the design's 15 % allowance
    assert max(hops) <= 12
