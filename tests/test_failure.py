"""Failure detection: a slow peer is suspected and waited for, a silent one declared failed, a refusing
one failed at once; and the coordinator paths that give up on a peer leave nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import pytest
from helpers import RingFactory, addresses, http_ring, until

from balancer.errors import CutOffError, PeerUnreachableError, QuorumError
from balancer.failure import FailureDetector
from balancer.node import REJOIN_AFTER
from balancer.plugins.local_transport import LocalNetwork


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _timeout(address: str = "peer:1") -> PeerUnreachableError:
    return PeerUnreachableError(address, "timed out")


def test_a_peer_that_misses_one_call_is_only_suspected() -> None:
    clock = FakeClock()
    detector = FailureDetector(1.0, threshold=8.0, clock=clock)
    for _ in range(20):  # answers every half second
        clock.now += 0.5
        detector.answered("peer:1", 0.01)
    clock.now += 1.0
    detector.missed("peer:1", _timeout())
    assert detector.suspect("peer:1")
    assert not detector.failed("peer:1")
    detector.answered("peer:1", 0.9)  # it was only slow
    assert not detector.suspect("peer:1")


def test_a_silent_peer_is_failed_once_phi_reaches_the_threshold() -> None:
    clock = FakeClock()
    detector = FailureDetector(1.0, threshold=8.0, clock=clock)
    for _ in range(20):
        clock.now += 0.5
        detector.answered("peer:1", 0.01)
    detector.missed("peer:1", _timeout())
    silences = []
    while not detector.failed("peer:1"):
        clock.now += 0.5
        detector.missed("peer:1", _timeout())
        silences.append(clock.now)
        assert len(silences) < 100
    # about 18 mean intervals of silence (the mean has come down to about 0.56 s from its first guess,
    # the base timeout; it is never below half of that)
    assert 9.0 <= len(silences) * 0.5 <= 11.0
    assert detector.phi("peer:1") >= 8.0


def test_silence_counts_from_the_first_unanswered_call_not_the_last_answer() -> None:
    clock = FakeClock()
    detector = FailureDetector(1.0, threshold=8.0, clock=clock)
    detector.answered("peer:1", 0.01)
    clock.now += 60  # nobody called it for a minute
    detector.missed("peer:1", _timeout(), since=clock.now - 1.0)  # one call, one timeout
    assert detector.suspect("peer:1")
    assert not detector.failed("peer:1")
    assert detector.phi("peer:1") < 1


def test_a_refused_connection_fails_the_peer_at_once() -> None:
    detector = FailureDetector(1.0, clock=FakeClock())
    detector.answered("peer:1", 0.01)
    detector.missed("peer:1", PeerUnreachableError("peer:1", "connection refused", refused=True))
    assert detector.failed("peer:1")


def test_timeouts_follow_a_slow_peer_within_bounds() -> None:
    clock = FakeClock()
    detector = FailureDetector(0.5, clock=clock)
    assert detector.timeout("peer:1", 0.5) == 0.5  # nothing known yet: the base timeout
    for _ in range(10):
        clock.now += 1
        detector.answered("peer:1", 0.8)  # slower than the base timeout, consistently
    assert 0.8 < detector.timeout("peer:1", 0.5) <= 4.0
    for _ in range(10):
        clock.now += 1
        detector.answered("peer:1", 60.0)
    assert detector.timeout("peer:1", 0.5) == 4.0  # at most eight base timeouts
    assert detector.timeout("peer:1", 30.0) == 30.0  # a caller's longer deadline is kept


async def test_a_slow_replica_is_waited_for_and_not_forgotten(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3, rpc_timeout=0.2)
    await nodes[0].put("k", b"v")
    slow = nodes[1]
    handlers = network.servers[slow.address]
    delayed = dict(handlers)

    def slowly(method: str) -> Any:
        async def handler(payload: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0.3)  # one and a half base timeouts: slow, not dead
            return await handlers[method](payload)

        return handler

    for method in ("kv.read_many", "kv.store", "chord.state", "chord.ping", "chord.notify"):
        delayed[method] = slowly(method)
    network.servers[slow.address] = delayed
    forgotten: list[str] = []
    for node in (nodes[0], nodes[2]):
        forget = node.chord.forget

        def recorded(peer: Any, event: str = "failed", forget: Any = forget) -> None:
            forgotten.append(peer.address)
            forget(peer, event)

        node.chord.forget = recorded  # type: ignore[method-assign,assignment]
    for i in range(5):
        await nodes[0].put("k", f"v{i}".encode())
        assert await nodes[2].get("k") == f"v{i}".encode()
        for node in (nodes[0], nodes[2]):
            await node.chord.stabilize()
            await node.chord.check_predecessor()
    assert slow.address not in forgotten


async def test_after_a_failure_a_node_counts_itself_in_its_replica_sets(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3)
    await nodes[0].put("k", b"v")
    dead = nodes[2]
    network.kill(dead.address)
    for node in nodes[:2]:
        node.ring.forget(dead.info)  # as a failed call would, before any stabilization round
    for node in nodes[:2]:
        replicas, _ = await node.kv.replica_set(b"k")
        assert {r.address for r in replicas} == {nodes[0].address, nodes[1].address}
        assert await node.get("k") == b"v"  # R = 2 of the 2 nodes alive: no QuorumError


async def test_a_cancelled_read_leaves_no_task_unattended(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3)
    await nodes[0].put("k", b"v")
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    paused = asyncio.Event()
    for node in nodes[1:]:
        handlers = network.servers[node.address]
        original = handlers["kv.read_many"]

        async def held(payload: dict[str, Any], original: Any = original) -> Any:
            await paused.wait()
            return await original(payload)

        network.servers[node.address] = {**handlers, "kv.read_many": held}
    reader = nodes[0]
    for _ in range(20):
        with pytest.raises((TimeoutError, QuorumError)):
            async with asyncio.timeout(0.01):  # the client gives up while the replicas are paused
                await reader.kv.read(b"k")
    for node in nodes[1:]:  # the paused replicas then fail
        network.kill(node.address)
    paused.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not [e for e in errors if "never retrieved" in str(e.get("message"))], errors


async def test_a_failed_peer_leaves_no_per_peer_state_behind(
    make_ring: RingFactory, network: LocalNetwork
) -> None:
    nodes = await make_ring(3)
    await nodes[0].put("k", b"v")
    assert await nodes[0].get("k") == b"v"
    dead = nodes[1]
    assert dead.address in nodes[0].kv.transfer.readers or dead.address in nodes[0].kv.transfer.writers
    network.kill(dead.address)
    await nodes[0].ring.stabilize()
    await nodes[0].ring.check_predecessor()
    await nodes[0].put("k2", b"v")  # calls it, finds it refusing, forgets it
    assert all(dead.address not in addresses(v.successors) for v in nodes[0].ring.vnodes)
    assert dead.address not in nodes[0].kv.transfer.readers
    assert dead.address not in nodes[0].kv.transfer.writers


def test_refusing_peers_are_remembered_after_they_are_forgotten() -> None:
    detector = FailureDetector(0.5)
    detector.missed("dead:1", PeerUnreachableError("dead:1", "refused", refused=True))
    detector.missed("cut:1", _timeout("cut:1"))
    detector.forget("dead:1")
    detector.forget("cut:1")
    assert detector.refusing == {"dead:1"}  # dead, not cut off: it does not count against a majority
    detector.answered("dead:1", 0.01)  # back: a later silence is a silence again
    assert detector.refusing == set()


async def test_a_stall_of_this_process_is_not_the_silence_of_its_peers() -> None:
    """A process paused (SIGSTOP, a long GC) finds its calls timed out when it resumes, long after they
    began: its peers did not fall silent, it stopped listening. Their silence counts from the resumption."""
    clock = FakeClock()
    detector = FailureDetector(1.0, threshold=8.0, clock=clock)
    for address in ("a:1", "b:1"):
        for _ in range(10):
            clock.now += 0.5
            detector.answered(address, 0.01)

    async def frozen(address: str, method: str, payload: dict[str, Any], timeout: float) -> Any:
        clock.now += 30.0  # the process was stopped for 30 s while this call waited
        raise _timeout(address)

    async def timed_out(address: str, method: str, payload: dict[str, Any], timeout: float) -> Any:
        clock.now += timeout  # an ordinary timeout: the peer did not answer in time
        raise _timeout(address)

    with pytest.raises(PeerUnreachableError):
        await detector.monitor(frozen)("a:1", "m", {}, 1.0)
    assert detector.suspect("a:1")
    assert detector.silent_for("a:1") == 0.0  # not 30 s: nobody was listening
    assert not detector.failed("a:1")
    with pytest.raises(PeerUnreachableError):
        await detector.monitor(timed_out)("b:1", "m", {}, 1.0)
    assert detector.silent_for("b:1") == 1.0  # an ordinary timeout after the resumption counts whole
    clock.now += 3.0
    assert detector.silent_for("a:1") == 4.0  # and so does silence after it (b's call took 1 s)
    with pytest.raises(PeerUnreachableError):
        await detector.monitor(timed_out)("b:1", "m", {}, 1.0)  # the first call left unanswered stands
    assert detector.silent_for("b:1") == 6.0  # 1 + 3 + 2 (the second timeout backed off to 2 s)


async def test_a_node_back_from_a_long_stall_syncs_before_it_serves() -> None:
    """A process that did not run for longer than its peers need to declare it failed may come back to a
    ring that moved on: it answers 503 until a maintenance pass synced it, then serves again. A shorter
    stall only restarts the count of its peers' silence."""
    timeout = 0.5  # a machine busy enough to stall the loop for six of these is not expected
    settings = {"rpc_timeout": timeout, "replicas": 3, "write_quorum": 2, "read_quorum": 2}
    async with http_ring(3, **settings) as nodes:
        await nodes[0].put("k", b"v")
        # the fault under test: the whole process stops running, as under SIGSTOP or a long GC pause
        time.sleep(timeout * (REJOIN_AFTER + 2))  # noqa: ASYNC251
        await until(lambda: nodes[0].detector.resumed_at > 0, "the stall being noticed")
        with pytest.raises(CutOffError, match="syncing with the ring again"):
            await nodes[0].get("k")

        async def served() -> bool:
            with contextlib.suppress(CutOffError):
                return await nodes[0].get("k") == b"v"
            return False

        deadline = time.monotonic() + 30
        while not await served():
            assert time.monotonic() < deadline, "the node never served again"
            await asyncio.sleep(0.05)
        time.sleep(timeout * 2)  # noqa: ASYNC251 - a short stall: noticed, but nothing to resync
        resumed = nodes[0].detector.resumed_at
        await until(lambda: nodes[0].detector.resumed_at > resumed, "the short stall being noticed")
        assert await nodes[0].get("k") == b"v"
