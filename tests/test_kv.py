"""The key-value service: clocks, storage, routing, hand-off on join and leave, and bad input."""

from __future__ import annotations

import pytest
from helpers import SOLO, RingFactory, converge, settle

from balancer.errors import BadRequestError, KeyNotFoundError, TooLargeError
from balancer.kv import HybridClock


def test_hybrid_clock_never_repeats_or_goes_back() -> None:
    wall = [1000.0]
    clock = HybridClock(lambda: wall[0])
    first = clock.now()
    wall[0] = 999.0  # the wall clock steps back
    second = clock.now()
    assert second > first
    clock.observe(second + 500)
    assert clock.now() > second + 500
    wall[0] = 5000.0
    assert clock.now() == 5_000_000 << 16


async def test_put_get_delete_across_a_ring(make_ring: RingFactory) -> None:
    nodes = await make_ring(5)
    await nodes[0].put("colour", b"blue")
    for node in nodes:
        assert await node.get("colour") == b"blue"
    await nodes[3].put("colour", b"green")  # a later write from elsewhere wins
    assert await nodes[1].get("colour") == b"green"
    await nodes[2].delete("colour")
    for node in nodes:
        with pytest.raises(KeyNotFoundError, match="not found: colour"):
            await node.get("colour")
    with pytest.raises(KeyNotFoundError):
        await nodes[0].delete("colour")
    with pytest.raises(KeyNotFoundError):
        await nodes[0].get("never-written")


async def test_keys_land_on_their_replicas(make_ring: RingFactory) -> None:
    nodes = await make_ring(6)
    for i in range(60):
        await nodes[i % 6].put(f"k{i}", b"x")
    await settle(nodes)
    copies: dict[bytes, int] = {}
    for node in nodes:
        for record in await node.local_records():
            replicas, _ = await node.kv.replica_set(record.key)
            assert node.info in replicas, (node.address, record.key)
            copies[record.key] = copies.get(record.key, 0) + 1
    assert len(copies) == 60
    assert set(copies.values()) == {3}  # N = 3 after the background writes and one maintenance pass


async def test_a_joining_node_receives_its_keys(make_ring: RingFactory) -> None:
    nodes = await make_ring(3, seed=5)
    for i in range(100):
        await nodes[0].put(f"k{i}", f"v{i}".encode())
    more = await make_ring(1, seed=6)  # a lone node, then made to join the ring
    newcomer = more[0]
    await newcomer.chord.join(nodes[0].address)
    everyone = [*nodes, newcomer]
    await converge(everyone)
    await settle(everyone)  # the second pass drops what the first confirmed elsewhere
    mine = await newcomer.local_records()
    assert mine, "the newcomer replicates part of the ring, so some keys must have moved to it"
    for record in mine:
        replicas, _ = await newcomer.kv.replica_set(record.key)
        assert newcomer.info in replicas
    total = sum([len(await n.local_records()) for n in everyone])
    assert total == 3 * 100
    for i in range(100):
        assert await nodes[1].get(f"k{i}") == f"v{i}".encode()


async def test_a_leaving_node_hands_over_every_key(make_ring: RingFactory) -> None:
    nodes = await make_ring(4, seed=2)
    for i in range(100):
        await nodes[0].put(f"k{i}", b"x")
    leaver = max(nodes, key=lambda n: len(n.kv.storage._records))  # type: ignore[attr-defined]
    count = await leaver.storage.count()
    assert count > 0
    successor = leaver.chord.successor
    await leaver.leave()
    rest = [n for n in nodes if n is not leaver]
    heir = next(n for n in rest if n.info == successor)
    assert await heir.storage.count() >= count
    assert not rest[0].chord.left
    for i in range(100):
        assert await rest[i % 3].get(f"k{i}") == b"x"


async def test_bad_keys_and_values_are_refused(make_ring: RingFactory) -> None:
    (node,) = await make_ring(1, max_key_bytes=8, max_value_bytes=16, **SOLO)
    with pytest.raises(TooLargeError, match="key"):
        await node.put("k" * 9, b"v")
    with pytest.raises(TooLargeError, match="value"):
        await node.put("k", b"v" * 17)
    with pytest.raises(BadRequestError):
        await node.put("", b"v")
    with pytest.raises(BadRequestError):
        await node.kv.handlers()["kv.store"]({"records": "nope"})
    with pytest.raises(BadRequestError):
        await node.kv.handlers()["kv.store"]({"records": [{"key": "!!", "value": None, "version": [1, 1]}]})
    with pytest.raises(BadRequestError):
        await node.kv.handlers()["kv.read"]({"key": 5})
    assert await node.storage.count() == 0
    await node.put("k" * 8, b"v" * 16)  # exactly at the limits
    assert await node.get("k" * 8) == b"v" * 16
