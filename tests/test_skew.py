"""Clock offsets from round trips, the fence of a node whose clock is off from the ring's, and what a
write stamped by a clock its replicas refuse leaves behind (nothing)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from helpers import RingFactory, settle

from balancer.errors import ClockFencedError, PeerUnreachableError, QuorumError
from balancer.kv import HybridClock
from balancer.kv.shared import PeerWarnings
from balancer.node import Node
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.skew import FENCE_FRACTION, Fence, PeerClocks, Skew, readable, wall_clock
from balancer.types import Record, Version


class Ticking:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def clocks(bound: float = 48.0) -> tuple[PeerClocks, Ticking]:
    mono = Ticking()
    return PeerClocks(bound, wall=lambda: 1_000_000.0, monotonic=mono), mono


# -- estimates ------------------------------------------------------------------------------------


def test_the_offset_is_the_reading_minus_the_round_trips_midpoint() -> None:
    peers, _ = clocks()
    # sent at 1,000 by our clock, answered 0.2 s later; the peer read 1,120.1 on its clock
    peers.sample("b:1", 1000.0, 0.2, 1120.1)
    found = peers.offset("b:1")
    assert found is not None
    assert found.seconds == pytest.approx(120.0)
    assert found.error == pytest.approx(0.1)


def test_the_estimate_is_the_sample_with_the_shortest_round_trip() -> None:
    peers, _ = clocks()
    peers.sample("b:1", 1000.0, 2.0, 1005.0)  # slow: the peer read somewhere in 1,000 .. 1,002
    peers.sample("b:1", 1010.0, 0.02, 1013.01)  # fast: 3 s ahead, +-0.01
    peers.sample("b:1", 1020.0, 1.0, 1020.0)
    found = peers.offset("b:1")
    assert found is not None
    assert found.seconds == pytest.approx(3.0)
    assert found.error == pytest.approx(0.01)


def test_stale_samples_stop_counting_and_only_the_last_few_are_kept() -> None:
    peers, mono = clocks()
    peers.sample("b:1", 1000.0, 0.0, 1000.0)
    mono.now += 61
    assert peers.offset("b:1") is None
    assert peers.offsets() == {}  # and the peer is forgotten
    for i in range(20):  # a clock that stepped: after KEEP samples, only the new offset is known
        peers.sample("c:1", 1000.0, 0.001 if i < 10 else 0.5, 1000.0 + (0 if i < 10 else 200))
    found = peers.offset("c:1")
    assert found is not None
    assert found.seconds == pytest.approx(200 - 0.25)


@pytest.mark.parametrize(
    "value", [True, "1700000000", None, float("nan"), float("inf"), -5.0, 0, 1e12, [1.0], {"t": 1}]
)
def test_a_clock_that_is_not_a_plausible_reading_is_ignored(value: object) -> None:
    assert readable(value) is None


async def test_monitor_samples_answers_of_clocked_methods_only() -> None:
    peers, mono = clocks()
    answers: dict[str, Any] = {
        "chord.state": {"successors": [], "clock": 1_000_030.0},
        "kv.store": {"each": [], "clock": 1_000_500.0},  # not a method that tells time: not sampled
        "chord.ping": {"id": 1, "clock": "soon"},  # hostile: ignored, the answer still returned
    }

    async def call(address: str, method: str, payload: dict[str, Any], timeout: float) -> Any:
        mono.now += 0.01
        return answers[method]

    monitored = peers.monitor(call)
    assert await monitored("b:1", "chord.ping", {}, 1.0) == answers["chord.ping"]
    assert peers.offset("b:1") is None
    await monitored("b:1", "kv.store", {}, 1.0)
    assert peers.offset("b:1") is None
    await monitored("b:1", "chord.state", {}, 1.0)
    found = peers.offset("b:1")
    assert found is not None
    assert found.seconds == pytest.approx(30 - 0.005)


# -- the verdict ------------------------------------------------------------------------------------


def test_a_node_is_fenced_when_a_majority_of_the_processes_disagree_with_its_clock() -> None:
    peers, _ = clocks(bound=48.0)
    assert not peers.skew().fenced  # nobody measured: its clock is the ring's
    for p in ("b:1", "c:1", "d:1", "e:1"):  # four peers 120 s behind: this node is 120 s ahead
        peers.sample(p, 1000.0, 0.01, 880.0)
    skew = peers.skew()
    assert (skew.fenced, skew.far, skew.peers) == (True, 4, 4)
    assert skew.ahead == pytest.approx(120.005, abs=0.01)
    assert "120.0 s ahead of the ring's" in skew.describe()
    # one peer off and three agreeing: that peer's clock is wrong, not this one's
    right, _ = clocks(bound=48.0)
    right.sample("bad:1", 1000.0, 0.01, 1120.0)
    for p in ("c:1", "d:1", "e:1"):
        right.sample(p, 1000.0, 0.01, 1000.0)
    skew = right.skew()
    assert (skew.fenced, skew.far) == (False, 1)
    assert abs(skew.ahead) < 0.1
    assert right.skew(among=["bad:1"]).fenced  # counted against that peer alone: a tie fences


def test_a_clock_within_the_bound_or_too_uncertain_to_tell_is_not_far() -> None:
    peers, _ = clocks(bound=48.0)
    peers.sample("b:1", 1000.0, 0.01, 1030.0)  # +30 s: inside the bound
    peers.sample("c:1", 1000.0, 20.0, 1010.0 + 58.0)  # 58 s +-10: maybe within 48
    skew = peers.skew()
    assert (skew.far, skew.fenced) == (0, False)


def test_the_fence_logs_each_change_once_and_rewinds_when_it_lifts(caplog: pytest.LogCaptureFixture) -> None:
    peers, _ = clocks(bound=48.0)
    lifted: list[bool] = []
    fence = Fence(peers, name="a:1", on_lifted=lambda: lifted.append(True))
    caplog.set_level(logging.INFO, logger="balancer.skew")
    for p in ("b:1", "c:1"):
        peers.sample(p, 1000.0, 0.01, 1000.0 - 120)
    for _ in range(3):
        fence.update()
    assert isinstance(fence.fenced, ClockFencedError)
    assert fence.fenced.ahead == pytest.approx(120, abs=0.1)
    assert fence.fenced.bound == 48.0
    assert "120.0 s ahead" in str(fence.fenced)
    for p in ("b:1", "c:1"):  # the clock is set right: the next samples agree
        for _ in range(8):
            peers.sample(p, 1000.0, 0.001, 1000.0)
    for _ in range(3):
        fence.update()
    assert fence.fenced is None
    assert lifted == [True]
    lines = [r.getMessage() for r in caplog.records if r.name == "balancer.skew"]
    assert [("lifted" in line) for line in lines] == [False, True], lines
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "balancer.skew")


def test_the_fraction_leaves_a_margin_below_the_skew_replicas_accept() -> None:
    assert 0.5 < FENCE_FRACTION < 1  # +30 s of a 60 s skew is inside the bound, 60 s is not
    assert not Skew(30.0, 0.1, 4, 0, FENCE_FRACTION * 60).fenced


def test_a_drifting_test_clock_gains_from_its_start() -> None:
    wall = wall_clock(offset=5.0, drift=10.0)
    first = wall() - time.time()
    assert 4.9 < first < 6
    assert wall_clock() is time.time


def test_rewind_forgets_stamps_ahead_of_the_wall_clock_only() -> None:
    wall = [1000.0]
    clock = HybridClock(lambda: wall[0])
    ahead = clock.now()
    wall[0] = 880.0  # the clock was set back 120 s
    clock.rewind()
    assert clock.now() < ahead
    behind = HybridClock(lambda: 1000.0)
    stamp = behind.now()
    behind.rewind()  # nothing ahead: nothing changes
    assert behind.now() > stamp


# -- rings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [120.0, -120.0])
async def test_a_joiner_whose_clock_is_far_off_is_refused_at_join(
    make_ring: RingFactory, network: LocalNetwork, offset: float
) -> None:
    nodes = await make_ring(2)
    joiner = Node(nodes[0].config.evolve(clock_offset=offset), join=nodes[1].address, pm=nodes[0].pm,
                  transport=LocalTransport(network))  # fmt: skip
    side = "ahead of" if offset > 0 else "behind"
    with pytest.raises(ClockFencedError, match=rf"clock is 12\d\.\d s {side} the ring's") as refused:
        await joiner.start()
    assert abs(refused.value.ahead - offset) < 1
    assert not joiner.member
    assert all(m.address != joiner.config.advertised for n in nodes for m in n.members())


async def fenced_ring(make_ring: RingFactory, network: LocalNetwork, drift: float) -> list[Node]:
    """A ring of four whose last node's clock drifts ``drift`` s per second, polled until it is fenced."""
    nodes = await make_ring(3, replicas=3, write_quorum=2, read_quorum=2)
    config = nodes[0].config.evolve(clock_drift=drift)
    drifter = Node(config, join=nodes[0].address, pm=nodes[0].pm, transport=LocalTransport(network))
    await drifter.start()
    nodes.append(drifter)
    deadline = time.monotonic() + 60
    while drifter.fence.fenced is None:
        assert time.monotonic() < deadline, f"not fenced within 60 s: {drifter.fence.skew}"
        for node in nodes:
            await node.ring.stabilize()  # round trips that carry the peers' clocks
            await node.ring_status()
            node.fence.update()
    return nodes


@pytest.mark.parametrize("drift", [60.0, -60.0])
async def test_a_node_whose_clock_drifts_away_is_fenced_and_says_so(
    make_ring: RingFactory, network: LocalNetwork, drift: float
) -> None:
    nodes = await fenced_ring(make_ring, network, drift)
    drifter, correct = nodes[-1], nodes[:-1]
    with pytest.raises(ClockFencedError, match="serves no reads or writes"):
        await drifter.put("k", b"v")
    with pytest.raises(ClockFencedError):
        await drifter.get("k")
    status = await drifter.status()
    assert status["clock"]["fenced"] is True
    assert status["clock"]["far"] >= 2
    assert status["clock"]["ahead"] * drift > 0
    assert abs(status["clock"]["ahead"]) > 40
    for node in correct:  # the others are not fenced, flag it, and serve
        node.fence.update()
        assert node.fence.fenced is None
        view = await node.ring_view()
        flagged = {m["address"]: m["fenced"] for m in view["members"]}
        assert flagged[drifter.address] is True
        assert [a for a, fenced in flagged.items() if fenced] == [drifter.address]
    await correct[0].put("k", b"v")
    assert await correct[1].get("k") == b"v"


async def test_a_write_its_replicas_refuse_for_its_stamp_is_kept_nowhere_and_never_wins(
    make_ring: RingFactory,
) -> None:
    nodes = await make_ring(3, replicas=3, write_quorum=2, read_quorum=2)
    first, _, skewed = nodes
    await first.put("k", b"acknowledged")
    # the coordinator's clock jumps 120 s ahead, before any measurement could fence it
    skewed.kv.clock = HybridClock(lambda: time.time() + 120, max_skew=60)
    with pytest.raises(QuorumError):
        await skewed.put("k", b"refused")
    for node in nodes:
        stored = await node.storage.get(b"k")
        assert stored is not None, node.address
        assert stored.value == b"acknowledged", node.address
    # 120 s later by every clock: the refused write must not surface through anti-entropy or repair
    for node in nodes:
        node.kv.clock = HybridClock(lambda: time.time() + 120, max_skew=60)
    await settle(nodes)
    for node in nodes:
        assert await node.get("k") == b"acknowledged"


async def test_a_read_returns_a_record_a_replica_accepted_from_a_clock_ahead_of_its_own(
    make_ring: RingFactory,
) -> None:
    nodes = await make_ring(3, replicas=3, write_quorum=2, read_quorum=2)
    ahead, behind, _ = nodes
    await behind.put("k", b"older")
    ahead.kv.clock = HybridClock(lambda: time.time() + 50, max_skew=60)  # inside what replicas accept
    await ahead.put("k", b"newer")
    # 20 s behind: the version is 70 s ahead of this clock, past its skew but not past a read's horizon
    behind.kv.clock = HybridClock(lambda: time.time() - 20, max_skew=60)
    assert await behind.get("k") == b"newer"
    with pytest.raises(QuorumError):  # and it cannot order a write before that version: it refuses
        await behind.put("k", b"ordered before newer")
    assert await nodes[2].get("k") == b"newer"


def test_an_absurd_peer_clock_is_far_and_no_further() -> None:
    peers, _ = clocks()
    peers.sample("dead-battery:1", 1_700_000_000.0, 0.01, 1.0)  # a clock reading 1970
    found = peers.offset("dead-battery:1")
    assert found is not None
    assert found.seconds == -1e6
    assert peers.skew().ahead <= 1e6  # what ring.describe reports stays inside its schema


def test_a_fence_lifts_only_well_inside_the_bound() -> None:
    peers, _ = clocks(bound=48.0)
    fence = Fence(peers)  # lifts at 42 s (0.7 of a 60 s skew)
    for offset, fenced in ((-50.0, True), (-45.0, True), (-43.0, True), (-40.0, False), (-45.0, False)):
        for p in ("b:1", "c:1"):
            for _ in range(4):
                peers.sample(p, 1000.0, 0.001, 1000.0 + offset)
        fence.update()
        assert (fence.fenced is not None) == fenced, offset
    peers.sample("b:1", 1000.0, 0.001, 900.0)
    first, second = Fence(peers), Fence(peers)
    assert first.error() is not second.error()  # a fresh error per refused operation


async def test_a_write_refused_for_its_stamp_leaves_no_copy_on_a_coordinator_that_is_only_a_spare(
    make_ring: RingFactory,
) -> None:
    nodes = await make_ring(4, replicas=3, write_quorum=2, read_quorum=2)
    skewed = nodes[-1]
    for i in range(500):  # a key whose replicas are the other three, with the coordinator next in line
        key = f"k{i}"
        replicas, fallbacks = await skewed.kv.replica_set(key.encode())
        if fallbacks and fallbacks[0].address == skewed.address:
            break
    else:
        pytest.fail("no key has the coordinator as its first stand-in")
    assert skewed.address not in {n.address for n in replicas}
    await nodes[0].put(key, b"acknowledged")
    skewed.kv.clock = HybridClock(lambda: time.time() + 120, max_skew=60)
    with pytest.raises(QuorumError):
        await skewed.put(key, b"refused")
    assert await skewed.storage.get(key.encode()) is None
    for node in nodes:
        node.kv.clock = HybridClock(lambda: time.time() + 70, max_skew=60)
    await settle(nodes)
    for node in nodes:
        assert await node.get(key) == b"acknowledged"


async def test_a_write_no_replica_answered_keeps_no_copy_unless_it_makes_the_quorum(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3, replicas=3, write_quorum=2, read_quorum=2)
    alone = nodes[0]
    for node in nodes[1:]:
        network.kill(node.address)
    with pytest.raises(QuorumError):
        await alone.kv.put("k", b"unchecked")
    assert await alone.storage.get(b"k") is None  # W = 2: its copy alone could not make the write
    solo = await make_ring(3, replicas=3, write_quorum=1, read_quorum=3, seed=2)
    for node in solo[1:]:
        network.kill(node.address)
    await solo[0].kv.put("k", b"kept")  # W = 1: its own copy is the quorum
    stored = await solo[0].storage.get(b"k")
    assert stored is not None
    assert stored.value == b"kept"


async def test_the_same_version_with_other_contents_is_beaten_not_kept(make_ring: RingFactory) -> None:
    (node,) = await make_ring(1, replicas=1, write_quorum=1, read_quorum=1)
    first = Record(b"k", b"one", Version(5 << 16, 7))
    assert await node.kv.transfer.store_here([first]) == [(True, None)]
    assert await node.kv.transfer.store_here([first]) == [(False, None)]  # a copy: nothing to beat
    twin = Record(b"k", b"two", first.version)  # a rewound clock's repeat: the writer must stamp past
    assert await node.kv.transfer.store_here([twin]) == [(False, first.version)]


def test_a_peer_back_in_the_ring_is_worth_warnings_again(caplog: pytest.LogCaptureFixture) -> None:
    warnings = PeerWarnings()
    caplog.set_level(logging.INFO, logger="balancer.kv")
    warnings.departed("b:1")
    warnings.failed("anti-entropy", "b:1", PeerUnreachableError("b:1", "refused", refused=True), "a:1")
    warnings.back("b:1")
    down = PeerUnreachableError("b:1", "timed out")
    warnings.failed("anti-entropy", "b:1", down, "a:1")
    levels = [r.levelno for r in caplog.records if r.name == "balancer.kv"]
    assert levels == [logging.INFO, logging.WARNING]


async def test_a_joiner_may_break_a_tie_between_two_clocks(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    (first,) = await make_ring(1)
    drifter = Node(first.config.evolve(clock_drift=60.0), join=first.address, pm=first.pm,
                   transport=LocalTransport(network))  # fmt: skip
    await drifter.start()
    pair = [first, drifter]
    deadline = time.monotonic() + 60
    while first.fence.fenced is None or drifter.fence.fenced is None:  # two clocks: both fenced
        assert time.monotonic() < deadline, (first.fence.skew, drifter.fence.skew)
        await poll_clocks(pair)
    joiner = Node(first.config, join=first.address, pm=first.pm, transport=LocalTransport(network))
    await joiner.start()  # through a fenced seed: judged once a member, not refused
    trio = [*pair, joiner]
    try:
        deadline = time.monotonic() + 60
        while first.fence.fenced is not None:  # the majority's clock is the first's and the joiner's
            assert time.monotonic() < deadline, first.fence.skew
            await poll_clocks(trio)
        assert drifter.fence.fenced is not None
        assert joiner.fence.fenced is None
    finally:
        await joiner.close()


async def poll_clocks(nodes: list[Node]) -> None:
    """One round of the round trips that carry clocks, then every node's fence updated."""
    for node in nodes:
        await node.ring.stabilize()
        await node.ring_status()
    for node in nodes:
        node.fence.update(m.address for m in node.members() if m.live and m.address != node.address)
