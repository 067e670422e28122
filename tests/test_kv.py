"""The key-value service: clocks, storage, routing, hand-off on join and leave, and bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time

import pluggy
import pytest
from helpers import SOLO, RingFactory, addresses, converge, copies, ring_is_correct, settle

from balancer.errors import BadRequestError, CutOffError, KeyNotFoundError, QuorumError, TooLargeError
from balancer.kv import HybridClock
from balancer.node import Node
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.types import Record, Version


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
            assert node.address in addresses(replicas), (node.address, record.key)
            copies[record.key] = copies.get(record.key, 0) + 1
    assert len(copies) == 60
    assert set(copies.values()) == {3}  # N = 3 after the background writes and one maintenance pass


async def test_a_joining_node_receives_its_keys(make_ring: RingFactory) -> None:
    nodes = await make_ring(3, seed=5)
    for i in range(100):
        await nodes[0].put(f"k{i}", f"v{i}".encode())
    more = await make_ring(1, seed=6)  # a lone node, then made to join the ring
    newcomer = more[0]
    await newcomer.ring.join(nodes[0].address)
    everyone = [*nodes, newcomer]
    await converge(everyone)
    await settle(everyone)  # the second pass drops what the first confirmed elsewhere
    mine = await newcomer.local_records()
    assert mine, "the newcomer replicates part of the ring, so some keys must have moved to it"
    for record in mine:
        replicas, _ = await newcomer.kv.replica_set(record.key)
        assert newcomer.address in addresses(replicas)
    total = sum([len(await n.local_records()) for n in everyone])
    assert total == 3 * 100
    for i in range(100):
        assert await nodes[1].get(f"k{i}") == f"v{i}".encode()


async def test_a_leaving_node_hands_over_every_key(make_ring: RingFactory) -> None:
    nodes = await make_ring(4, seed=2)
    for i in range(100):
        await nodes[0].put(f"k{i}", b"x")
    held = {node.address: await node.storage.count() for node in nodes}
    leaver = max(nodes, key=lambda n: held[n.address])
    count = held[leaver.address]
    assert count > 0
    successor = leaver.chord.successor
    await leaver.leave()
    rest = [n for n in nodes if n is not leaver]
    heir = next(n for n in rest if n.address == successor.address)
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
        await node.kv.handlers()["kv.read_many"]({"keys": [5]})
    with pytest.raises(BadRequestError):
        await node.kv.handlers()["kv.read_many"]({"keys": "nope"})
    assert await node.storage.count() == 0
    await node.put("k" * 8, b"v" * 16)  # exactly at the limits
    assert await node.get("k" * 8) == b"v" * 16


async def test_a_read_repairs_a_stale_replica(make_ring: RingFactory) -> None:
    nodes = await make_ring(5)
    await nodes[0].put("k", b"old")
    await settle(nodes)
    replicas, _ = await nodes[0].kv.replica_set(b"k")
    holders = [n for n in nodes if n.address in addresses(replicas)]
    laggard = holders[-1]
    # the laggard misses the next write: it holds "old" while the others hold "new"
    newer = Record(b"k", b"new", Version(nodes[0].kv.clock.now(), nodes[0].info.id))
    for node in holders[:-1]:
        await node.storage.put(newer)
    reader = holders[-1]  # reads ask the local copy first, so the stale one is always among the answers
    assert await reader.get("k") == b"new"
    await reader.kv.drain()
    assert await laggard.storage.get(b"k") == newer


async def test_anti_entropy_converges_replicas_without_reads(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(5)
    await settle(nodes)
    victim = nodes[2]
    others = [n for n in nodes if n is not victim]
    for other in others:  # the victim is cut off while the writes happen
        network.cut_link(victim.address, other.address)
    written = 0
    for i in range(120):
        try:
            await others[i % 4].put(f"k{i}", b"v")
            written += 1
        except QuorumError:
            pass
    assert written == 120  # W = 2 of 3 always reachable among the other four
    for other in others:
        network.heal_link(victim.address, other.address)
    await converge(nodes)  # stabilization finds the victim again
    before = await victim.storage.count()
    reports = [await node.kv.maintain() for node in nodes]  # no reads: digests find what differs
    assert sum(r.pushed for r in reports) > 0
    assert await victim.storage.count() > before
    for node in nodes:
        await node.kv.maintain()  # substitutes drop what the victim now holds
    counts = await copies(nodes)
    assert set(counts.values()) == {3}
    assert len(counts) == 120


async def test_a_replica_that_lost_keys_gets_them_back_when_it_compares(make_ring: RingFactory) -> None:
    """The lost keys are in nobody's list but the peers': they come back as the records a peer reads from
    its own storage for the buckets that differ (no copy of the keys is kept between passes)."""
    nodes = await make_ring(3)  # N = 3: every node replicates every key
    for i in range(60):
        await nodes[i % 3].put(f"k{i}", f"v{i}".encode())
    await settle(nodes)
    amnesiac = nodes[1]
    lost = [r for r in await amnesiac.local_records() if int(r.key[1:]) % 4 == 0]
    assert await amnesiac.storage.remove(lost) == 15
    report = await amnesiac.kv.maintain()  # the peers only answer: their last passes placed the keys
    assert report.pulled == 15
    assert report.pushed == 0
    for record in lost:
        assert await amnesiac.storage.get(record.key) == record
    again = await amnesiac.kv.maintain()
    assert (again.pulled, again.pushed) == (0, 0)


async def test_a_maintenance_pass_yields_to_the_event_loop_between_slices(make_ring: RingFactory) -> None:
    (node,) = await make_ring(1, **SOLO)
    for i in range(500):
        await node.storage.put(Record(f"k{i}".encode(), b"v", Version(node.kv.clock.now(), node.info.id)))
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0)
            ticks += 1

    node.kv.slice = 0.0  # every record is a slice: the count of turns the loop gets is exact
    task = asyncio.ensure_future(ticker())
    try:
        report = await node.kv.maintain()
    finally:
        stop.set()
        await task
    assert report.records == 500
    assert ticks >= 500  # a pass that never yielded would let the ticker run once at most, at the end


async def test_old_tombstones_are_collected(make_ring: RingFactory) -> None:
    nodes = await make_ring(3, tombstone_grace=60.0)
    await nodes[0].put("gone", b"x")
    await nodes[0].delete("gone")
    await settle(nodes)
    assert set((await copies(nodes)).values()) == {3}  # tombstones are replicated like values
    old = Record(b"ancient", None, Version(int((time.time() - 120) * 1000) << 16, 1))
    for node in nodes:
        await node.storage.put(old)
    reports = [await node.kv.maintain() for node in nodes]
    assert all(r.collected == 1 for r in reports)
    for node in nodes:
        assert await node.storage.get(b"ancient") is None
        assert (await node.storage.get(b"gone")) is not None  # younger than the grace period


async def test_writes_fail_clearly_without_a_quorum(make_ring: RingFactory, network: LocalNetwork) -> None:
    nodes = await make_ring(3)
    for node in nodes[1:]:
        network.kill(node.address)
    with pytest.raises(QuorumError, match="write quorum not reached: 0 of 2 replicas answered"):
        await nodes[0].put("k", b"v")
    with pytest.raises(QuorumError, match="read quorum not reached"):
        await nodes[0].get("k")


async def test_multi_ring_places_replicas_apart(make_ring: RingFactory) -> None:
    nodes = await make_ring(8, replication="multi-ring", vnodes=1)  # one id each: adjacency is plain
    for i in range(80):
        await nodes[i % 8].put(f"k{i}", f"v{i}".encode())
    await settle(nodes)
    counts = await copies(nodes)
    assert set(counts.values()) == {3}
    adjacent = 0
    ring = sorted(nodes, key=lambda n: n.info.id)
    for i in range(80):
        replicas, _ = await nodes[0].kv.replica_set(f"k{i}".encode())
        assert len(addresses(replicas)) == 3
        places = sorted(ring.index(next(n for n in ring if n.info == r)) for r in replicas)
        adjacent += places == list(range(places[0], places[0] + 3))
    assert adjacent < 40  # the successor strategy would make all 80 adjacent
    for i in range(80):
        assert await nodes[(i + 3) % 8].get(f"k{i}") == f"v{i}".encode()


async def test_a_later_write_through_another_node_in_the_same_instant_wins(make_ring: RingFactory) -> None:
    nodes = await make_ring(4)
    # the second coordinator's clock is behind (within the allowed skew): without the refusal-and-restamp
    # rule its write would lose
    frozen = [time.time() - 20]
    nodes[1].kv.clock = HybridClock(lambda: frozen[0])
    await nodes[0].put("k", b"first")
    await nodes[1].put("k", b"second")
    for node in nodes:
        assert await node.get("k") == b"second"


async def test_concurrent_requests_to_one_peer_share_messages(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3)
    keys = [f"c{i}" for i in range(60)]
    stores = network.calls["kv.store"]
    await asyncio.gather(*(nodes[0].put(key, key.encode()) for key in keys))
    # 60 writes, each to two remote replicas: batched, far fewer than 120 messages
    assert network.calls["kv.store"] - stores <= 10
    reads = network.calls["kv.read_many"]
    values = await asyncio.gather(*(nodes[0].get(key) for key in keys))
    assert values == [key.encode() for key in keys]
    assert network.calls["kv.read_many"] - reads <= 10


async def test_a_miss_on_the_replicas_asks_the_fallbacks(make_ring: RingFactory) -> None:
    nodes = await make_ring(6)
    replicas, fallbacks = await nodes[0].kv.replica_set(b"stray")
    assert fallbacks
    elsewhere = next(n for n in nodes if n.address == fallbacks[0].address)
    record = Record(b"stray", b"found", Version(nodes[0].kv.clock.now(), 1))
    await elsewhere.storage.put(record)  # as if placed by a node whose view of the ring differed
    assert await nodes[0].get("stray") == b"found"
    await nodes[0].kv.drain()
    for node in nodes:
        if node.address in addresses(replicas):
            assert await node.storage.get(b"stray") == record  # the replicas were repaired
    with pytest.raises(KeyNotFoundError):
        await nodes[0].get("never-written-anywhere")


async def test_more_reads_in_one_turn_than_a_message_carries_are_split(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(2, replicas=2, write_quorum=2, read_quorum=2)
    await nodes[0].put("k", b"v")
    reads = network.calls["kv.read_many"]
    values = await asyncio.gather(*(nodes[0].get("k") for _ in range(5000)))  # one turn, one peer
    assert values == [b"v"] * 5000
    assert network.calls["kv.read_many"] - reads == 2  # 4,096 keys, then the rest


async def test_a_tombstone_is_kept_while_a_replica_holds_an_older_value(make_ring: RingFactory) -> None:
    nodes = await make_ring(3, tombstone_grace=60.0)
    stamp = int((time.time() - 120) * 1000) << 16
    live = Record(b"old", b"value", Version(stamp, 1))
    tombstone = Record(b"old", None, Version(stamp + 1, 1))
    await nodes[0].storage.put(tombstone)
    await nodes[1].storage.put(tombstone)
    await nodes[2].storage.put(live)  # a replica that missed the delete
    report = await nodes[0].kv.maintain()
    assert report.collected == 0  # dropping it now would let the live value come back
    await nodes[0].kv.drain()
    assert await nodes[2].storage.get(b"old") == tombstone  # the laggard was sent the tombstone
    assert (await nodes[0].kv.maintain()).collected == 1  # every replica holds it now
    assert await nodes[0].storage.get(b"old") is None
    assert (await nodes[1].kv.maintain()).collected == 1  # a replica that holds nothing confirms too


async def test_a_tombstone_is_kept_while_a_replica_is_unreachable(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3, tombstone_grace=60.0)
    tombstone = Record(b"old", None, Version(int((time.time() - 120) * 1000) << 16, 1))
    for node in nodes:
        await node.storage.put(tombstone)
    network.cut_link(nodes[0].address, nodes[2].address)
    assert (await nodes[0].kv.maintain()).collected == 0
    network.heal_link(nodes[0].address, nodes[2].address)
    assert (await nodes[0].kv.maintain()).collected == 1


async def test_a_node_that_joins_is_unsettled_until_it_synced(
    make_ring: RingFactory, network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    nodes = await make_ring(3)
    for i in range(30):
        await nodes[0].put(f"k{i}", b"v")
    await settle(nodes)
    assert all(n.kv.settled for n in nodes)
    joiner = Node(nodes[0].config, join=nodes[0].address, pm=pm, transport=LocalTransport(network))
    await joiner.start()
    try:
        assert not joiner.kv.settled  # it may lack writes acknowledged before it joined
        answer = await joiner.kv.handlers()["kv.read_many"]({"keys": [base64.b64encode(b"k0").decode()]})
        assert answer["settled"] is False  # so a reader that meets it widens its quorum
        everyone = [*nodes, joiner]
        await converge(everyone)
        await settle(everyone)
        assert joiner.kv.settled
        assert await joiner.storage.count() > 0  # it pulled its share while unsettled
    finally:
        await joiner.close()


async def test_a_node_that_sees_no_majority_serves_nothing(make_ring: RingFactory) -> None:
    nodes = await make_ring(3)
    node = nodes[0]
    await node.put("k", b"v")
    await node.ring_status()
    others = [m.address for m in node.members() if m.address != node.address]
    assert len(others) == 2
    # both peers declared failed by silence (a partition) and not found again: 1 of 3 is no majority
    node._lost = dict.fromkeys(others, time.monotonic())
    with pytest.raises(CutOffError, match="sees 1 of 3 ring members up"):
        await node.get("k")
    with pytest.raises(CutOffError):
        await node.put("k", b"w")
    node.detector.refusing.update(others)  # refused connections: dead processes, not a partition
    assert await node.get("k") == b"v"


async def test_two_rings_that_were_one_merge_and_keep_every_write(make_ring: RingFactory) -> None:
    """After a partition heals, each side is a ring of its own: reuniting merges them, and anti-entropy
    leaves every key, written on either side, readable through any node."""
    left = await make_ring(3, seed=1)
    right = await make_ring(2, seed=2)  # the same network and settings: the other side of a cut
    for i in range(20):
        await left[i % 3].put(f"left{i}", b"l")
        await right[i % 2].put(f"right{i}", b"r")
    assert not ring_is_correct([*left, *right])
    assert await right[0].ring.reunite(left[0].address)  # found closer successors over there
    await left[1].ring.reunite(right[1].address)
    everyone = [*left, *right]
    await converge(everyone)
    assert ring_is_correct(everyone)
    await settle(everyone)
    for node in everyone:
        for i in range(20):
            assert await node.get(f"left{i}") == b"l"
            assert await node.get(f"right{i}") == b"r"


async def test_a_replica_that_fails_writes_is_a_warning_once_until_it_answers(
    make_ring: RingFactory, network: LocalNetwork, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = await make_ring(4, vnodes=1)
    coordinator = nodes[0]
    keys = [f"k{i}" for i in range(40)]
    replicas = {key: addresses((await coordinator.kv.replica_set(key.encode()))[0]) for key in keys}
    victim = next(a for a in (n.address for n in nodes[1:]) if sum(a in r for r in replicas.values()) >= 3)
    network.cut_link(coordinator.address, victim)  # down as far as the coordinator can tell
    with caplog.at_level(logging.WARNING, logger="balancer.kv"):
        for key in keys:
            if victim in replicas[key]:
                with contextlib.suppress(QuorumError):
                    await coordinator.put(key, b"v")
        await coordinator.kv.drain()
    warned = [r.getMessage() for r in caplog.records if f"a replica write with {victim}" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "not logged again until it answers" in warned[0]
    warnings = coordinator.kv.shared.warnings
    with caplog.at_level(logging.WARNING, logger="balancer.kv"):
        warnings.failed("a replica write", victim, "timed out", coordinator.ring.info)  # again: quiet
    assert sum(f"a replica write with {victim}" in r.getMessage() for r in caplog.records) == 1
    warnings.answered("a replica write", victim)  # it answered: its next failure is worth a warning
    with caplog.at_level(logging.WARNING, logger="balancer.kv"):
        warnings.failed("a replica write", victim, "timed out", coordinator.ring.info)
    assert sum(f"a replica write with {victim}" in r.getMessage() for r in caplog.records) == 2
