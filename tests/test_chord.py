"""Chord protocol steps on hand-made topologies, over the in-process network."""

from __future__ import annotations

import pytest

from balancer.chord import Chord
from balancer.errors import BadRequestError, IncompatibleConfigError, PeerUnreachableError, RingError
from balancer.keyspace import KeySpace
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.types import NodeInfo

SPACE = KeySpace(8)


async def peer(network: LocalNetwork, ident: int, r: int = 3, **kwargs: object) -> Chord:
    """A Chord node with a fixed id and successor lists of ``r``, serving on the network."""
    transport = LocalTransport(network)
    port = await transport.serve("n", ident + 1, {})
    chord = Chord(NodeInfo(ident, f"n:{port}"), transport.call, space=SPACE, successors=r, **kwargs)  # type: ignore[arg-type]
    network.servers[chord.info.address] = chord.handlers()
    return chord


def link(ring: list[Chord]) -> None:
    """Wire a correct ring by hand: successor lists and predecessors from the sorted ids."""
    ring = sorted(ring, key=lambda c: c.info.id)
    for i, node in enumerate(ring):
        node.successors = [ring[(i + k) % len(ring)].info for k in range(1, min(node.r, len(ring) - 1) + 1)]
        node.wraps = len(ring) - 1 <= node.r
        node.predecessor = ring[i - 1].info


async def test_a_lone_node_owns_everything(network: LocalNetwork) -> None:
    a = await peer(network, 10)
    a.create()
    for ident in (0, 10, 11, 255):
        found = await a.find_successor(ident)
        assert found.owner == a.info
        assert found.hops == 0
    assert a.owns(200)


async def test_two_nodes_find_each_other(network: LocalNetwork) -> None:
    a, b = await peer(network, 10), await peer(network, 100)
    a.create()
    await b.join(a.info.address)
    assert b.successor == a.info
    assert a.predecessor == b.info  # b notified a on joining
    await a.stabilize()
    await b.stabilize()
    assert a.successor == b.info
    assert b.predecessor == a.info
    assert (await a.find_successor(50)).owner == b.info
    assert (await b.find_successor(5)).owner == a.info


async def test_stabilize_does_not_adopt_a_dead_predecessor_of_the_successor(network: LocalNetwork) -> None:
    # Original Chord adopts the successor's predecessor blindly; if that node is dead, the ring breaks.
    a, b, c = await peer(network, 10), await peer(network, 100), await peer(network, 200)
    link([a, b, c])
    ghost = NodeInfo(50, "n:999")  # between a and b, never answered
    b.predecessor = ghost
    await a.stabilize()
    assert a.successor == b.info
    assert b.predecessor == ghost  # a does not precede the ghost, so b keeps it until it checks
    await b.check_predecessor()
    assert b.predecessor is None
    await a.stabilize()
    assert b.predecessor == a.info


async def test_dead_successor_is_replaced_from_the_list(network: LocalNetwork) -> None:
    a, b, c, d = [await peer(network, i) for i in (10, 100, 200, 250)]
    link([a, b, c, d])
    network.kill(b.info.address)
    await a.stabilize()
    assert a.successors[0] == c.info
    assert b.info not in a.successors
    await c.check_predecessor()
    await a.stabilize()
    assert c.predecessor == a.info
    assert a.successors == [c.info, d.info]  # refreshed from c's list, cut before a itself


async def test_every_successor_dead_falls_back_to_a_finger(network: LocalNetwork) -> None:
    a, b, c, d = [await peer(network, i) for i in (10, 100, 200, 250)]
    link([a, b, c, d])
    a.successors = [b.info]
    a.wraps = False
    a.fingers[7] = c.info
    network.kill(b.info.address)
    await a.stabilize()
    assert a.successor == c.info


async def test_graceful_leave_rewires_neighbours_at_once(network: LocalNetwork) -> None:
    a, b, c = await peer(network, 10), await peer(network, 100), await peer(network, 200)
    link([a, b, c])
    await b.leave()
    assert a.successor == c.info
    assert c.predecessor == a.info
    with pytest.raises(RingError):
        await b.handlers()["chord.ping"]({})


async def test_lookup_skips_a_dead_hop_with_one_failed_call(network: LocalNetwork) -> None:
    nodes = [await peer(network, i) for i in range(0, 256, 16)]
    link(nodes)
    for node in nodes:
        await node.fix_fingers()
    start = nodes[0]
    target = 130
    victim = start._closest_preceding(target)[0]
    network.kill(victim.address)
    before = network.failures
    found = await start.find_successor(target)
    assert found.owner.id == 144  # the true successor of 130
    assert network.failures - before == 1
    assert victim not in start.fingers


async def test_hops_are_counted(network: LocalNetwork) -> None:
    nodes = [await peer(network, i) for i in range(0, 256, 8)]
    link(nodes)
    for node in nodes:
        await node.fix_fingers()
    found = await nodes[0].find_successor(130)
    assert found.owner.id == 136
    assert 1 <= found.hops <= 5  # log2(32) = 5
    near = await nodes[0].find_successor(5)
    assert near.hops == 0
    own = await nodes[0].find_successor(250)  # between its predecessor (248) and itself: no message
    assert own.owner.id == 0
    assert own.hops == 0
    assert [n.id for n in own.successors[:3]] == [0, 8, 16]


async def test_join_refuses_other_settings(network: LocalNetwork) -> None:
    a = await peer(network, 10)
    a.create()
    b = await peer(network, 100, settings={"bits": 16})
    with pytest.raises(IncompatibleConfigError, match="bits"):
        await b.join(a.info.address)
    assert a.predecessor is None  # nothing changed at the ring


async def test_join_refuses_a_taken_id(network: LocalNetwork) -> None:
    a = await peer(network, 10)
    a.create()
    transport = LocalTransport(network)
    await transport.serve("m", 1, {})
    twin = Chord(NodeInfo(10, "m:1"), transport.call, space=SPACE)
    with pytest.raises(RingError, match="already taken"):
        await twin.join(a.info.address)


async def test_join_through_a_dead_node_fails_cleanly(network: LocalNetwork) -> None:
    b = await peer(network, 100)
    with pytest.raises(PeerUnreachableError):
        await b.join("n:12345")


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("chord.notify", {"node": "nonsense"}),
        ("chord.notify", {}),
        ("chord.find_step", {"id": -1}),
        ("chord.find_step", {"id": 1 << 8}),
        ("chord.find_step", {"id": "12"}),
        ("chord.leaving", {"node": [1, "x:1"], "successors": "no"}),
        ("chord.join", {"node": [1]}),
    ],
)
async def test_malformed_payloads_are_refused(
    network: LocalNetwork, method: str, payload: dict[str, object]
) -> None:
    a = await peer(network, 10)
    a.create()
    with pytest.raises(BadRequestError):
        await a.handlers()[method](payload)
    assert a.predecessor is None
    assert a.successors == [a.info]


async def test_fingers_at_64_bits(network: LocalNetwork) -> None:
    space = KeySpace(64)
    top = space.size - 16
    transport = LocalTransport(network)
    await transport.serve("t", 1, {})
    chord = Chord(NodeInfo(top, "t:1"), transport.call, space=space)
    chord.create()
    await chord.fix_fingers()
    assert all(f == chord.info for f in chord.fingers)  # alone: every finger is itself
    assert chord.view().fingers == ()


async def test_lookup_past_five_dead_successors_reaches_the_live_owner(network: LocalNetwork) -> None:
    nodes = [await peer(network, i, r=8) for i in range(0, 256, 16)]
    link(nodes)
    for node in nodes:
        await node.fix_fingers()
    for ident in (16, 32, 48, 64, 80):
        network.kill(f"n:{ident + 1}")
    found = await nodes[8].find_successor(90)  # from node 128; the owner of 90 is now 96
    assert found.owner.id == 96


async def test_stabilize_walks_back_many_nodes_in_one_round(network: LocalNetwork) -> None:
    nodes = [await peer(network, i, r=8) for i in range(0, 256, 8)]
    link(nodes)
    first = nodes[0]
    first.successors = [nodes[9].info]  # eight nodes ahead, as after falling back to a finger
    first.wraps = False
    await first.stabilize()
    assert first.successor == nodes[1].info


async def test_a_small_ring_answers_every_lookup_locally(network: LocalNetwork) -> None:
    nodes = [await peer(network, i, r=8) for i in (10, 100, 200)]
    link(nodes)
    before = sum(network.calls.values())
    for ident, owner in ((50, 100), (150, 200), (250, 10), (5, 10), (100, 100)):
        found = await nodes[0].find_successor(ident)
        assert found.owner.id == owner
        assert found.hops == 0
        assert len(found.successors) == 3
    assert sum(network.calls.values()) == before


async def test_a_list_shortened_by_failures_is_not_taken_for_the_whole_ring(network: LocalNetwork) -> None:
    nodes = [await peer(network, i, r=4) for i in range(0, 256, 16)]
    link(nodes)
    start = nodes[0]
    assert not start.wraps
    network.kill(nodes[1].info.address)
    start.forget(nodes[1].info)  # the list is now 3 long, shorter than r, but the ring is not that small
    assert not start.wraps
    found = await start.find_successor(200)
    assert found.owner.id == 208


async def test_a_node_that_loses_every_successor_falls_back_to_its_nearest_healthy_finger(
    network: LocalNetwork,
) -> None:
    from balancer.failure import FailureDetector

    detector = FailureDetector(1.0)
    me = await peer(network, 10, r=1, detector=detector)
    near, far, succ = NodeInfo(20, "near:1"), NodeInfo(200, "far:1"), NodeInfo(15, "succ:1")
    me.successors = [succ]
    me.fingers = [near, far] + [None] * (len(me.fingers) - 2)
    detector.missed(near.address, PeerUnreachableError(near.address, "timed out"))  # near is only slow...
    detector.answered(near.address, 0.5)  # ...and answered since
    detector.missed(far.address, PeerUnreachableError(far.address, "timed out"))  # far is suspected
    me.forget(succ)
    assert me.successors == [near]
