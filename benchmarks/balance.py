"""Benchmark: how evenly virtual nodes spread keys over processes, what a join or a leave moves, and
what vnodes cost in maintenance messages and lookup hops.

Ids are placed as real nodes place them: the first process of a ring takes
``derived_ids(address, V, space)``; every later process, in join order, takes
``allocate_ids(ring, weights, 1.0, V, space, derived_ids(...), address)`` topped up with unused derived
ids, which is what ``Node._rpc_place`` does. Sections 1 and 2 compute that with the pure functions of
:mod:`balancer.vnodes` for every ring size (the whole ring is grown once per V, join by join, and read at
each size; see :class:`Placement` for why it is incremental and how it is checked against
``allocate_ids``). Sections 3 and 4 run real :class:`~balancer.node.Node` processes on the in-process
network. For every V (``--vnodes``, default 1, 8, 16, 32) and ring size N (``--sizes``, default 3, 10,
100, 1,000 processes) it measures:

1. Keys owned per process, for ``--keys`` seeded keys (owner = the first vnode id at or after the key's
   id, wrapping): max/mean and coefficient of variation (stdev/mean), with placed ids and with "random
   ids" (every process keeps its derived ids, no placement); also the largest exact share of the key
   space over the fair share, uhashring (the ``bench`` extra, 160 points per node) on the same keys and
   process names, and "equal arcs" (N equal arcs of the space): the floor that the sampling of the keys
   alone sets, whatever the placement.
2. Keys moved by one join (a new process placed with ``allocate_ids``) and one leave (a seeded random
   process's ids removed; its keys go to the next id's owner), as a fraction of all keys and as a ratio
   to the ideal (1/(N+1) for a join, 1/N for a leave); heirs = processes that took the leaver's keys.
3. Maintenance traffic of a live ring of ``--processes`` processes (default 10) at ``--live-vnodes``
   (default 1, 8, 32), after convergence: each round runs one stabilize, one check_predecessor and one
   fix_fingers step on every process, by hand (the nodes' own loops are set never to fire); the RPCs each
   step sent (``LocalNetwork.calls``) become RPCs per node per second at the default intervals. Calls
   between vnodes of one process never touch the network, and calls to one process in the same turn
   travel as one ``chord.batch`` message. A second table predicts the stabilize + check_predecessor
   messages of larger rings from the placed ids of section 1 (one batch per neighbouring process, at
   most ``NEIGHBOURS_PER_ROUND`` processes a round).
4. Mean hops (network messages) of ``node.lookup(key)`` from random processes of that live ring, against
   0.5·log2 N (N = processes), each lookup forgetting the ranges learned from earlier ones; and the mean
   of a burst of lookups that keeps them (a node forgets them at every stabilize).

Targets, at the default V (``Config().vnodes``): keys max/mean <= 1.25 at 3 processes and <= 1.1 at 100
processes; keys moved by a join and by a leave within 10 % of the ideal (N = 3, 10, 100). Keys are a
sample: a process's count varies by about 1/sqrt(keys/N) even on equal arcs, which the "equal arcs"
column and the exact share columns show apart from placement.

A default run takes about 15 s on a 2-core machine; ``--quick`` runs a small one in about 3 s.

Exit status: 0 when the run completes, even if a target is missed (unless ``--strict``); 1 if a check
fails: the incremental placement differs from ``allocate_ids``, a live ring's ids differ from the
placement, a live ring does not converge, or a lookup names the wrong owner.

Run: python benchmarks/balance.py [--keys 100000] [--sizes 3,10,100,1000] [--vnodes 1,8,16,32]
     [--processes 10] [--live-vnodes 1,8,32] [--lookups 2000] [--rounds 32] [--seed S] [--quick]
     [--json out.json] [--baseline old.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from _harness import Baseline, add_common_arguments, addresses, percentile, table, write_json

from balancer.config import Config
from balancer.hookspecs import Payload
from balancer.keyspace import KeySpace
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.ring import NEIGHBOURS_PER_ROUND, Ring
from balancer.survey import expected_successors
from balancer.types import NodeInfo
from balancer.vnodes import allocate_ids, derived_ids, ownership

SPACE = KeySpace()
DEFAULTS = Config()
DEFAULT_V = DEFAULTS.vnodes
SIZES = (3, 10, 100, 1000)
VNODES = (1, 8, 16, 32)
LIVE_VNODES = (1, 8, 32)
BALANCE_TARGETS = {3: 1.25, 100: 1.1}  # processes: the most keys max/mean may be at the default V
MOVED_SIZES = (3, 10, 100)  # ring sizes the keys-moved target is judged at
MOVED_SLACK = 0.10  # keys moved may differ from the ideal by this fraction of it
CHECKED_JOINS = 48  # joins of each grown ring checked against allocate_ids itself
# The nodes' own loops must never fire: the benchmark drives every maintenance step.
QUIET = {
    "stabilize_interval": 3600.0,
    "fix_fingers_interval": 3600.0,
    "check_predecessor_interval": 3600.0,
    "anti_entropy_interval": 3600.0,
    "survey_interval": 3600.0,
}
STEPS: dict[str, Callable[[Ring], Awaitable[object]]] = {
    "stabilize": Ring.stabilize,
    "check_predecessor": Ring.check_predecessor,
    "fix_fingers": Ring.fix_fingers,  # one vnode's finger table per round, round robin, as Node runs it
}
PERIODS = {
    "stabilize": DEFAULTS.stabilize_interval,
    "check_predecessor": DEFAULTS.check_predecessor_interval,
    "fix_fingers": DEFAULTS.fix_fingers_interval,
}
METHODS = ("chord.state", "chord.notify", "chord.ping", "chord.batch", "chord.find_step")

IdMap = dict[int, str]
"""Every vnode id of a ring -> the address of the process holding it."""


class CheckFailed(Exception):
    """A result the benchmark relies on is wrong (the run's figures would mean nothing)."""


# -- placement --------------------------------------------------------------------------------------


def place(ring: Mapping[int, str], address: str, vnodes: int) -> list[int]:
    """The ids of a process of weight 1 joining ``ring``, as ``Node`` places them: derived ids on an
    empty ring, else ``allocate_ids`` topped up with unused derived ids (``Node._rpc_place``)."""
    derived = derived_ids(address, vnodes, SPACE)
    ids = allocate_ids(ring, {}, 1.0, vnodes, SPACE, derived, address)
    spare = (i for i in derived if i not in ring and i not in ids)
    return sorted({*ids, *itertools.islice(spare, vnodes - len(ids))})


class Placement:
    """A ring grown one process of weight 1 and ``vnodes`` ids at a time, each placed exactly as
    :func:`place` would place it, kept incrementally.

    ``allocate_ids`` rebuilds every arc of the ring on each call and scans every process for each id it
    places: O(ids + V·N) per join, so growing a ring of 1,000 processes with 32 vnodes takes about 50 s.
    This keeps the same state between joins (each process's arcs as a max-heap, its share, and a heap
    of shares with stale entries skipped) and repeats ``allocate_ids``' steps on it, same arithmetic and
    same tie-breaks, in O(V·log) per join. ``check`` joins are compared with :func:`place` itself, and
    :meth:`verify` compares the shares with ``ownership`` of the whole ring.
    """

    def __init__(self, vnodes: int, check: int = CHECKED_JOINS) -> None:
        self.vnodes = vnodes
        self.check = check
        self.ring: IdMap = {}
        self.order: list[str] = []
        self.owned: dict[str, int] = {}
        self._arcs: dict[str, list[tuple[int, int, int]]] = {}  # max-heap of (-length, end, start)
        self._shares: list[tuple[int, str]] = []  # max-heap of (-owned, address); stale when owned moved

    def join(self, address: str) -> list[int]:
        """Place the process at ``address`` and add it to the ring; returns its ids, sorted.

        Raises :class:`CheckFailed` if a checked join differs from :func:`place`.
        """
        expected = place(self.ring, address, self.vnodes) if len(self.order) < self.check else None
        derived = derived_ids(address, self.vnodes, SPACE)
        if not self.ring:
            ids, arcs = sorted(set(derived))[: self.vnodes], None
        else:
            ids, arcs = self._allocate(address)
        spare = (i for i in derived if i not in self.ring and i not in ids)
        topped = sorted({*ids, *itertools.islice(spare, self.vnodes - len(ids))})
        self.ring.update(dict.fromkeys(topped, address))
        self.order.append(address)
        if arcs is None or topped != ids:  # a first process, or derived ids added (tiny spaces only)
            self._rebuild()
        else:
            self._arcs[address] = arcs
            heapq.heapify(arcs)
            self.owned[address] = sum(-negative for negative, _, _ in arcs)
            heapq.heappush(self._shares, (-self.owned[address], address))
        if expected is not None and expected != topped:
            raise CheckFailed(f"incremental placement of {address} differs from allocate_ids")
        return topped

    def verify(self) -> None:
        """Raise :class:`CheckFailed` unless every share equals ``ownership`` of the whole ring."""
        if ownership(self.ring, SPACE) != self.owned:
            raise CheckFailed(f"incremental shares differ from ownership() at {len(self.order)} processes")

    def _rebuild(self) -> None:
        """Every arc and share from the ring itself, as ``allocate_ids`` computes them."""
        size = SPACE.size
        self.owned = ownership(self.ring, SPACE)
        self._arcs = {address: [] for address in self.owned}
        ids = sorted(self.ring)
        for previous, ident in zip(ids[-1:] + ids[:-1], ids, strict=True):
            self._arcs[self.ring[ident]].append((-((ident - previous) % size or size), ident, previous))
        for heap in self._arcs.values():
            heapq.heapify(heap)
        self._shares = [(-owned, address) for address, owned in self.owned.items()]
        heapq.heapify(self._shares)

    def _donor(self, fair: float) -> str | None:
        """``allocate_ids``' donor: the process with an arc longer than 1 and the largest
        ``(owned - fair, address)``, found from the top of the heap of shares."""
        best: tuple[float, str] | None = None
        kept: list[tuple[int, str]] = []
        while self._shares:
            negative, address = self._shares[0]
            if self.owned[address] != -negative:  # stale: the share changed since
                heapq.heappop(self._shares)
                continue
            arcs = self._arcs[address]
            if arcs and -arcs[0][0] > 1:
                key = (-negative - fair, address)
                if best is not None and key[0] < best[0]:
                    break  # owned - fair only falls from here on; ties were all seen
                best = key if best is None or key > best else best
            kept.append(heapq.heappop(self._shares))
        for entry in kept:
            heapq.heappush(self._shares, entry)
        return None if best is None else best[1]

    def _allocate(self, address: str) -> tuple[list[int], list[tuple[int, int, int]]]:
        """``allocate_ids(ring, {}, 1.0, vnodes, SPACE, address=address)`` on the kept state, which it
        updates for every donor; returns the ids and the newcomer's arcs."""
        size, count = SPACE.size, self.vnodes
        # the same float arithmetic as allocate_ids (weights of 1.0), so that ties break the same way
        total = sum(1.0 for _ in self.owned) + 1.0
        fair = size * 1.0 / total
        need = size * 1.0 / total
        placed: list[int] = []
        arcs: list[tuple[int, int, int]] = []
        for k in range(count):
            donor = self._donor(fair)
            if donor is None:
                break
            slice_ = max(1, round(need / (count - k)))
            negative, end, start = heapq.heappop(self._arcs[donor])
            length = -negative
            cut = min(slice_, length - 1)
            cut -= SPACE.id(f"{address}#{k}", salt=1) % max(1, cut // 1024)
            ident = (start + cut) % size
            if ident in self.ring or ident in placed:
                heapq.heappush(self._arcs[donor], (negative, end, start))
                continue
            placed.append(ident)
            arcs.append((-cut, ident, start))
            self.owned[donor] -= cut
            heapq.heappush(self._shares, (-self.owned[donor], donor))
            need -= cut
            heapq.heappush(self._arcs[donor], (-(length - cut), end, ident))
        return sorted(placed), arcs


def grow(order: Sequence[str], vnodes: int, sizes: Iterable[int]) -> dict[int, IdMap]:
    """The placed ring of the first N processes of ``order``, for every N of ``sizes``."""
    wanted = set(sizes)
    growing = Placement(vnodes)
    rings: dict[int, IdMap] = {}
    for address in order[: max(wanted)]:
        growing.join(address)
        if len(growing.order) in wanted:
            growing.verify()
            rings[len(growing.order)] = dict(growing.ring)
    return rings


def random_ring(order: Sequence[str], vnodes: int) -> IdMap:
    """Every process of ``order`` on its derived ids (hashes, no placement)."""
    return {ident: a for a in order for ident in derived_ids(a, vnodes, SPACE)}


# -- keys -------------------------------------------------------------------------------------------


def owners(ring: Mapping[int, str], keys: Sequence[int]) -> list[str]:
    """The owner of every key id of ``keys`` (sorted): the process of the first id at or after it."""
    ids = sorted(ring)
    found = [ring[ids[0]]] * len(keys)  # keys after the last id wrap to the first
    low = 0
    for ident in ids:
        high = bisect.bisect_right(keys, ident, low)
        found[low:high] = [ring[ident]] * (high - low)
        low = high
    return found


def spread(counts: Sequence[int]) -> tuple[float, float]:
    """(max / mean, stdev / mean) of per-process counts."""
    mean = statistics.fmean(counts)
    return max(counts) / mean, statistics.pstdev(counts) / mean


def spread_of(found: Sequence[str], processes: Iterable[str]) -> tuple[float, float]:
    """:func:`spread` of the keys each of ``processes`` owns (none counts as 0)."""
    counts = Counter(found)
    return spread([counts.get(a, 0) for a in processes])


def moved(before: Sequence[str], after: Sequence[str]) -> list[int]:
    """Indexes of the keys whose owner differs."""
    return [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def top_share(ring: IdMap) -> float:
    """The largest process's exact share of the key space, over the fair share 1/N."""
    owned = ownership(ring, SPACE)
    return max(owned.values()) * len(owned) / SPACE.size


@dataclass(frozen=True, slots=True)
class Peer:
    """uhashring's figures for one ring size: (max/mean, CV) of keys, and keys moved by the same join
    and leave as the placed ring's."""

    spread: tuple[float, float]
    join: float
    leave: float


def bench_uhashring(names: Sequence[str], newcomer: str, leaver: str, keys: Sequence[str]) -> Peer | None:
    """uhashring (default 160 points per node) over ``names``; None when it is not installed."""
    try:
        from uhashring import HashRing
    except ImportError:
        return None
    ring = HashRing(nodes=list(names))
    base = [ring.get_node(k) for k in keys]
    ring.add_node(newcomer)
    joined = [ring.get_node(k) for k in keys]
    ring.remove_node(newcomer)
    ring.remove_node(leaver)
    left = [ring.get_node(k) for k in keys]
    return Peer(
        spread_of(base, names), len(moved(base, joined)) / len(keys), len(moved(base, left)) / len(keys)
    )


def bench_keys(
    order: Sequence[str],
    keys: Sequence[str],
    key_ids: Sequence[int],
    sizes: Sequence[int],
    vnodes: Sequence[int],
    seed: int,
) -> list[dict[str, Any]]:
    """Rows of sections 1 and 2: one per ring size and V."""
    placed = {v: grow(order, v, sizes) for v in vnodes}
    total = len(key_ids)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        names, newcomer = order[:n], order[n]
        leaver = random.Random(f"{seed}/leave/{n}").choice(names)
        peer = bench_uhashring(names, newcomer, leaver, keys)
        arcs = Counter(k * n // SPACE.size for k in key_ids)  # key -> which of n equal arcs
        floor = spread([arcs.get(i, 0) for i in range(n)])
        for v in vnodes:
            ring = placed[v][n]
            base = owners(ring, key_ids)
            joiner = place(ring, newcomer, v)
            joined = {**ring, **dict.fromkeys(joiner, newcomer)}
            left = {i: a for i, a in ring.items() if a != leaver}
            after_join = owners(joined, key_ids)
            after_leave = owners(left, key_ids)
            moved_join = moved(base, after_join)
            moved_leave = moved(base, after_leave)
            heirs = {after_leave[i] for i in moved_leave}
            hashed = random_ring(names, v)
            hashed_base = owners(hashed, key_ids)
            hashed_join = owners(
                {**hashed, **dict.fromkeys(derived_ids(newcomer, v, SPACE), newcomer)}, key_ids
            )
            hashed_leave = owners({i: a for i, a in hashed.items() if a != leaver}, key_ids)
            rows.append(
                {
                    "section": "keys",
                    "n": n,
                    "v": v,
                    "keys": total,
                    "spread": spread_of(base, names),
                    "top_share": top_share(ring),
                    "random_spread": spread_of(hashed_base, names),
                    "random_top_share": top_share(hashed),
                    "uhashring_spread": peer.spread if peer else None,
                    "floor_spread": floor,
                    "moved_join": len(moved_join) / total,
                    "share_join": ownership(joined, SPACE)[newcomer] / SPACE.size,
                    "moved_leave": len(moved_leave) / total,
                    "share_leave": ownership(ring, SPACE)[leaver] / SPACE.size,
                    "heirs": len(heirs),
                    "random_join": len(moved(hashed_base, hashed_join)) / total,
                    "random_leave": len(moved(hashed_base, hashed_leave)) / total,
                    "uhashring_join": peer.join if peer else None,
                    "uhashring_leave": peer.leave if peer else None,
                    "successor_processes": neighbours(ring, 1),
                    "predecessor_processes": neighbours(ring, -1),
                }
            )
    return rows


def neighbours(ring: IdMap, step: int) -> float:
    """Mean over processes of how many other processes hold the id right after (``step`` 1) or right
    before (-1) one of its ids: the processes its stabilize (or check_predecessor) talks to."""
    ids = sorted(ring)
    found: dict[str, set[str]] = {a: set() for a in ring.values()}
    for i, ident in enumerate(ids):
        other = ring[ids[(i + step) % len(ids)]]
        if other != ring[ident]:
            found[ring[ident]].add(other)
    return statistics.fmean(len(s) for s in found.values())


# -- the live ring ----------------------------------------------------------------------------------


class CountingTransport(LocalTransport):
    """A :class:`LocalTransport` that also counts the calls each ``chord.batch`` message carries, so that
    calls before batching can be set against messages sent."""

    def __init__(self, network: LocalNetwork, unbatched: Counter[str]) -> None:
        super().__init__(network)
        self.unbatched = unbatched

    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Count the call (each one a batch carries), then deliver it."""
        if method == "chord.batch":
            self.unbatched.update(str(m) for m, _ in payload["calls"])
        else:
            self.unbatched[method] += 1
        return await super().call(address, method, payload, timeout)


def ring_is_correct(nodes: Sequence[Node]) -> bool:
    """Every vnode's predecessor and successor list are what the sorted ids of all processes imply."""
    vnodes = {v.info.id: v for node in nodes for v in node.ring.vnodes}
    owner = {ident: v.info.address for ident, v in vnodes.items()}
    ids = sorted(owner)
    for i, ident in enumerate(ids):
        vnode = vnodes[ident]
        walk = expected_successors(ids, owner, ident, vnode.r)
        before = ids[i - 1]
        if vnode.successors != [NodeInfo(j, owner[j]) for j in walk]:
            return False
        if len(ids) > 1 and vnode.predecessor != NodeInfo(before, owner[before]):
            return False
    return True


async def live_ring(
    network: LocalNetwork, unbatched: Counter[str], processes: int, vnodes: int, seed: int
) -> list[Node]:
    """``processes`` nodes of ``vnodes`` each, joined one by one through seeded random members (each
    member stabilizing twice after every join), then converged and their fingers fixed.

    Raises :class:`CheckFailed` if the ids differ from :func:`place`'s or the ring does not converge.
    """
    config = Config(transport="local", load_entrypoints=False, vnodes=vnodes, seed=seed).evolve(**QUIET)
    pm = plugin_manager(load_entrypoints=False)
    rng = random.Random(f"{seed}/live/{vnodes}")
    nodes: list[Node] = []
    try:
        for _ in range(processes):
            join = rng.choice(nodes).address if nodes else None
            node = Node(config, join=join, pm=pm, transport=CountingTransport(network, unbatched))
            nodes.append(node)
            await node.start()
            for _ in range(2):
                for member in nodes:
                    await member.ring.stabilize()
        expected: IdMap = {}
        for node in nodes:
            expected.update(dict.fromkeys(place(expected, node.address, vnodes), node.address))
        if {ident: n.address for n in nodes for ident in n.ring.ids} != expected:
            raise CheckFailed(f"the live ring of V = {vnodes} is not placed as allocate_ids places it")
        for _ in range(60):
            if ring_is_correct(nodes):
                break
            for node in nodes:
                await node.ring.check_predecessor()
                await node.ring.stabilize()
        else:
            raise CheckFailed(f"the live ring of V = {vnodes} did not converge in 60 rounds")
        for node in nodes:
            await node.ring.fix_all()
    except BaseException:
        for node in nodes:
            await node.close()
        raise
    return nodes


async def maintenance(
    nodes: Sequence[Node], network: LocalNetwork, unbatched: Counter[str], rounds: int
) -> dict[str, Any]:
    """RPCs (and bytes, and calls before batching) per node per second of ``rounds`` rounds of every
    step on every node, after one round to warm up, by step and by method."""
    sent: dict[str, Counter[str]] = {step: Counter() for step in STEPS}
    size: dict[str, Counter[str]] = {step: Counter() for step in STEPS}
    calls: dict[str, Counter[str]] = {step: Counter() for step in STEPS}
    for done in range(rounds + 1):
        for node in nodes:
            for step in STEPS:
                before = (Counter(network.calls), Counter(network.bytes), Counter(unbatched))
                await STEPS[step](node.ring)
                if done:  # the first round warms up
                    sent[step].update(network.calls - before[0])
                    size[step].update(network.bytes - before[1])
                    calls[step].update(unbatched - before[2])
    per = len(nodes) * rounds

    def rate(counted: dict[str, Counter[str]], step: str, method: str | None = None) -> float:
        count = counted[step][method] if method else counted[step].total()
        return count / per / PERIODS[step]

    methods = sorted({m for step in STEPS for m in sent[step]}, key=lambda m: (m not in METHODS, m))
    return {
        "steps": {step: rate(sent, step) for step in STEPS},
        "rpcs": sum(rate(sent, step) for step in STEPS),
        "bytes": sum(rate(size, step) for step in STEPS),
        "unbatched": sum(rate(calls, step) for step in STEPS),
        "methods": {m: sum(rate(sent, step, m) for step in STEPS) for m in methods},
    }


def true_owner(nodes: Sequence[Node]) -> Callable[[int], int]:
    """The id of the vnode that owns an id on the ring of ``nodes``."""
    ids = sorted(ident for node in nodes for ident in node.ring.ids)
    return lambda ident: ids[bisect.bisect_left(ids, ident) % len(ids)]


async def hops(
    nodes: Sequence[Node], keys: Sequence[str], rng: random.Random, cold: bool
) -> tuple[list[int], int]:
    """Hops of ``node.lookup(key)`` from a random node for every key, and how many named the wrong owner.

    ``cold`` forgets the ranges learned from earlier lookups before each one; otherwise the whole burst
    starts without any and keeps what it learns.
    """
    owner = true_owner(nodes)
    counts: list[int] = []
    wrong = 0
    for node in nodes:
        node.ring.forget_routes()
    for key in keys:
        node = rng.choice(nodes)
        if cold:
            node.ring.forget_routes()
        found = await node.lookup(key)
        counts.append(found.hops)
        wrong += found.owner.id != owner(SPACE.id(key))
    return counts, wrong


async def bench_live(
    processes: int, vnodes: Sequence[int], rounds: int, keys: Sequence[str], lookups: int, seed: int
) -> list[dict[str, Any]]:
    """Rows of sections 3 and 4: one per V, each on a fresh live ring."""
    rows: list[dict[str, Any]] = []
    for v in vnodes:
        network = LocalNetwork()
        unbatched: Counter[str] = Counter()
        started = time.perf_counter()
        nodes = await live_ring(network, unbatched, processes, v, seed)
        try:
            built = time.perf_counter() - started
            traffic = await maintenance(nodes, network, unbatched, rounds)
            ring = {i: n.address for n in nodes for i in n.ring.ids}
            rng = random.Random(f"{seed}/lookups/{v}")
            cold, wrong_cold = await hops(nodes, keys[:lookups], rng, cold=True)
            warm, wrong_warm = await hops(nodes, keys[lookups : 2 * lookups], rng, cold=False)
        finally:
            for node in nodes:
                await node.close()
        if wrong_cold or wrong_warm:
            raise CheckFailed(f"{wrong_cold + wrong_warm} lookups named the wrong owner at V = {v}")
        target = 0.5 * math.log2(processes)
        rows.append(
            {
                "section": "live",
                "n": processes,
                "v": v,
                "rounds": rounds,
                "build_s": built,
                "top_share": top_share(ring),
                "successor_processes": neighbours(ring, 1),
                "predecessor_processes": neighbours(ring, -1),
                **traffic,
                "lookups": len(cold),
                "hops": statistics.fmean(cold),
                "hops_p99": percentile(cold, 0.99),
                "hops_max": max(cold),
                "hops_warm": statistics.fmean(warm),
                "target": target,
                "ratio": statistics.fmean(cold) / target if target else math.nan,
            }
        )
    return rows


# -- output -----------------------------------------------------------------------------------------


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['section']}/{row['n']}/{row['v']}"


def pair(values: Sequence[float] | None) -> tuple[str, str]:
    """(max/mean, CV) cells."""
    return ("-", "-") if values is None else (f"{values[0]:.3f}", f"{values[1]:.3f}")


def balance_mark(row: Mapping[str, Any]) -> str:
    """The balance target's verdict for this row, or empty when no target applies."""
    limit = BALANCE_TARGETS.get(row["n"])
    if limit is None or row["v"] != DEFAULT_V:
        return ""
    return f"≤ {limit}: {'met' if row['spread'][0] <= limit else 'NOT MET'}"


def within(ratio: float) -> bool:
    """Whether a moved/ideal ratio is within the keys-moved target."""
    return abs(ratio - 1) <= MOVED_SLACK


def ideal_join(row: Mapping[str, Any]) -> float:
    """The newcomer's fair share: 1/(N+1)."""
    return 1 / (int(row["n"]) + 1)


def ideal_leave(row: Mapping[str, Any]) -> float:
    """The leaver's fair share: 1/N."""
    return 1 / int(row["n"])


def print_balance(rows: Sequence[Mapping[str, Any]], baseline: Baseline) -> None:
    """Table 1: keys per process."""
    head = [
        "N",
        "V",
        "placed: max/mean",
        "CV",
        "largest share / fair",
        "random ids: max/mean",
        "CV",
        "largest share / fair",
        "uhashring, 160 pts: max/mean",
        "CV",
        "equal arcs: max/mean",
        "CV",
        f"target (V = {DEFAULT_V})",
    ] + (["baseline placed max/mean"] if baseline else [])
    lines = []
    for row in rows:
        first = row is next(r for r in rows if r["n"] == row["n"])
        lines.append(
            [
                str(row["n"]),
                str(row["v"]),
                *pair(row["spread"]),
                f"{row['top_share']:.3f}",
                *pair(row["random_spread"]),
                f"{row['random_top_share']:.3f}",
                *(pair(row["uhashring_spread"]) if first else ("", "")),
                *(pair(row["floor_spread"]) if first else ("", "")),
                balance_mark(row),
                *baseline.column(row, lambda old: f"{old['spread'][0]:.3f}"),
            ]
        )
    keys = rows[0]["keys"] if rows else 0
    print(
        f"### 1. Keys owned per process ({keys:,} keys). Placed = ids as Node places them (derived_ids "
        "for the first process, allocate_ids for each later one in join order), computed with those pure "
        "functions; random ids = derived_ids only (hashes, no placement). Largest share / fair = the "
        "largest process's exact share of the key space times N. uhashring and equal arcs (N equal arcs: "
        f"the floor that sampling {keys:,} keys sets) do not depend on V. CV = stdev / mean.\n"
    )
    table(head, lines)


def print_moved(rows: Sequence[Mapping[str, Any]], baseline: Baseline) -> None:
    """Table 2: keys moved by a join and by a leave."""
    head = [
        "N",
        "V",
        "join: keys moved",
        "ideal 1/(N+1)",
        "ratio",
        "share ratio",
        "leave: keys moved",
        "ideal 1/N",
        "ratio",
        "share ratio",
        "heirs",
        f"within {MOVED_SLACK:.0%}",
        "random ids: join / leave ratio",
        "uhashring: join / leave ratio",
    ] + (["baseline join / leave ratio"] if baseline else [])
    lines = []
    for row in rows:
        join, leave = row["moved_join"] / ideal_join(row), row["moved_leave"] / ideal_leave(row)
        first = row is next(r for r in rows if r["n"] == row["n"])
        peer = (
            f"{row['uhashring_join'] / ideal_join(row):.2f} / {row['uhashring_leave'] / ideal_leave(row):.2f}"
            if first and row["uhashring_join"] is not None
            else ""
        )
        lines.append(
            [
                str(row["n"]),
                str(row["v"]),
                f"{row['moved_join']:.2%}",
                f"{ideal_join(row):.2%}",
                f"{join:.2f}",
                f"{row['share_join'] / ideal_join(row):.3f}",
                f"{row['moved_leave']:.2%}",
                f"{ideal_leave(row):.2%}",
                f"{leave:.2f}",
                f"{row['share_leave'] / ideal_leave(row):.3f}",
                str(row["heirs"]),
                "yes" if within(join) and within(leave) else "no",
                f"{row['random_join'] / ideal_join(row):.2f} / {row['random_leave'] / ideal_leave(row):.2f}",
                peer,
                *baseline.column(
                    row,
                    lambda old: (
                        f"{old['moved_join'] / ideal_join(old):.2f} / "
                        f"{old['moved_leave'] / ideal_leave(old):.2f}"
                    ),
                ),
            ]
        )
    print(
        "### 2. Keys moved by one join (a new process placed with allocate_ids) and one leave (a seeded "
        "random process's ids removed: its keys go to the next id's owner), as a fraction of all keys, and "
        "as a ratio to the ideal. Share ratio = the same for the exact share of the key space (no "
        "sampling). Heirs = processes that took the leaver's keys. The same join and leave for random ids "
        "and uhashring.\n"
    )
    table(head, lines)


def print_traffic(
    live: Sequence[Mapping[str, Any]],
    keyed: Sequence[Mapping[str, Any]],
    baseline: Baseline,
) -> None:
    """Table 3: maintenance traffic, measured on the live ring and predicted from placement."""
    if live:
        periods = ", ".join(f"{step} {PERIODS[step]:g} s" for step in STEPS)
        head = [
            "processes",
            "V",
            "rounds",
            "stabilize",
            "check_predecessor",
            "fix_fingers",
            "RPCs / node / s",
            "KB / node / s",
            "calls before batching / node / s",
            "predicted stabilize + check_pred.",
            "largest share / fair",
            "build s",
        ] + (["baseline RPCs / node / s"] if baseline else [])
        lines = [
            [
                str(r["n"]),
                str(r["v"]),
                str(r["rounds"]),
                *(f"{r['steps'][step]:.1f}" for step in STEPS),
                f"{r['rpcs']:.1f}",
                f"{r['bytes'] / 1e3:.1f}",
                f"{r['unbatched']:.1f}",
                f"{predicted(r):.1f}",
                f"{r['top_share']:.3f}",
                f"{r['build_s']:.1f}",
                *baseline.column(r, lambda old: f"{old['rpcs']:.1f}"),
            ]
            for r in live
        ]
        print(
            f"### 3. Maintenance traffic, RPCs per node per second at the default intervals ({periods}), "
            "on a live ring of Node processes (LocalTransport) after convergence: each round runs one "
            "stabilize, one check_predecessor and one fix_fingers step on every process, by hand; the "
            "RPCs each step sent are counted (LocalNetwork.calls). Calls between vnodes of one process do "
            "not touch the network; calls to one process in the same turn travel as one chord.batch. "
            "Predicted = 2 per neighbouring successor process / stabilize period + 1 per neighbouring "
            "predecessor process / check_predecessor period (at most "
            f"{NEIGHBOURS_PER_ROUND} processes a round), from the ids alone.\n"
        )
        table(head, lines)
        methods = list(dict.fromkeys(m for r in live for m in r["methods"]))
        print("RPCs per node per second, by method:\n")
        table(
            ["processes", "V", *methods],
            [[str(r["n"]), str(r["v"]), *(f"{r['methods'].get(m, 0.0):.1f}" for m in methods)] for r in live],
        )
    if keyed:
        print(
            "Predicted stabilize + check_predecessor RPCs per node per second on the placed rings of "
            "section 1 (fix_fingers not included), with the mean number of other processes that hold the "
            "id right after / right before one of a process's ids:\n"
        )
        table(
            ["N", "V", "successor processes", "predecessor processes", "predicted RPCs / node / s"],
            [
                [
                    str(r["n"]),
                    str(r["v"]),
                    f"{r['successor_processes']:.1f}",
                    f"{r['predecessor_processes']:.1f}",
                    f"{predicted(r):.1f}",
                ]
                for r in keyed
            ],
        )


def predicted(row: Mapping[str, Any]) -> float:
    """Stabilize + check_predecessor messages per node per second a row's neighbour counts imply: one
    batch per neighbouring process, at most NEIGHBOURS_PER_ROUND processes a round (balancer.ring)."""
    successors = min(float(row["successor_processes"]), NEIGHBOURS_PER_ROUND)
    predecessors = min(float(row["predecessor_processes"]), NEIGHBOURS_PER_ROUND)
    return 2 * successors / PERIODS["stabilize"] + predecessors / PERIODS["check_predecessor"]


def print_hops(rows: Sequence[Mapping[str, Any]], baseline: Baseline) -> None:
    """Table 4: lookup hops on the live ring."""
    head = [
        "processes",
        "V",
        "lookups",
        "mean hops",
        "p99",
        "max",
        "0.5·log2 N",
        "mean / target",
        "mean hops, learned ranges kept",
    ] + (["baseline mean hops"] if baseline else [])
    lines = [
        [
            str(r["n"]),
            str(r["v"]),
            f"{r['lookups']:,}",
            f"{r['hops']:.2f}",
            f"{r['hops_p99']:.0f}",
            str(r["hops_max"]),
            f"{r['target']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['hops_warm']:.2f}",
            *baseline.column(r, lambda old: f"{old['hops']:.2f}"),
        ]
        for r in rows
    ]
    print(
        "### 4. Lookup hops (network messages) of node.lookup(key) from a random process of the same live "
        "ring, every answer checked against the true owner. Mean hops forgets the ranges learned from "
        "earlier lookups before each one (routing state alone); learned ranges kept = another burst of as "
        "many lookups, keeping what each learns (the node forgets them at every stabilize). N = processes.\n"
    )
    table(head, lines)


def ratios(row: Mapping[str, Any]) -> str:
    """``join 1.01, leave 0.98``: keys moved over the ideal."""
    return (
        f"join {row['moved_join'] / ideal_join(row):.2f}, leave {row['moved_leave'] / ideal_leave(row):.2f}"
    )


def summary(keyed: Sequence[Mapping[str, Any]]) -> tuple[list[str], bool]:
    """One line per target, and whether every target checked was met."""
    lines: list[str] = []
    ok = True
    at = {(r["n"], r["v"]): r for r in keyed}
    for n, limit in BALANCE_TARGETS.items():
        row = at.get((n, DEFAULT_V))
        if row is None:
            lines.append(f"target: keys max/mean <= {limit} at {n} processes, V = {DEFAULT_V}: not checked")
            continue
        met = row["spread"][0] <= limit
        ok &= met
        lines.append(
            f"target: keys max/mean <= {limit} at {n} processes, V = {DEFAULT_V}: "
            f"{'met' if met else 'NOT MET'} ({row['spread'][0]:.3f}; exact share {row['top_share']:.3f}; "
            f"equal arcs {row['floor_spread'][0]:.3f}, random ids {row['random_spread'][0]:.3f}, "
            f"uhashring {pair(row['uhashring_spread'])[0]})"
            + (
                " (too few keys to judge: equal arcs alone exceed the limit)"
                if row["floor_spread"][0] > limit
                else ""
            )
        )
    judged = [at[n, DEFAULT_V] for n in MOVED_SIZES if (n, DEFAULT_V) in at]
    if not judged:
        lines.append(f"target: keys moved within {MOVED_SLACK:.0%} of ideal, V = {DEFAULT_V}: not checked")
    else:
        figures = "; ".join(f"N = {r['n']}: {ratios(r)}" for r in judged)
        met = all(
            within(r["moved_join"] / ideal_join(r)) and within(r["moved_leave"] / ideal_leave(r))
            for r in judged
        )
        ok &= met
        lines.append(
            f"target: keys moved by a join and a leave within {MOVED_SLACK:.0%} of ideal, V = {DEFAULT_V}: "
            f"{'met' if met else 'NOT MET'} ({figures})"
        )
        for r in keyed:
            if r["v"] == DEFAULT_V and r["n"] not in MOVED_SIZES:
                lines.append(
                    f"  (not judged) N = {r['n']}: {ratios(r)}; exact shares "
                    f"{r['share_join'] / ideal_join(r):.3f}, {r['share_leave'] / ideal_leave(r):.3f}; about "
                    f"{r['keys'] / r['n']:,.0f} keys per process, so sampling alone varies a count by about "
                    f"{1 / math.sqrt(r['keys'] / r['n']):.0%}"
                )
    return lines, ok


# -- main -------------------------------------------------------------------------------------------


def numbers(text: str) -> list[int]:
    """``"1,8,32"`` as ``[1, 8, 32]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, help="seeded keys (default 100,000; --quick 20,000)")
    parser.add_argument("--sizes", help="ring sizes N, processes (default 3,10,100,1000; --quick 3,10,100)")
    parser.add_argument("--vnodes", help="vnodes per process V (default 1,8,16,32; --quick 1,8,32)")
    parser.add_argument("--processes", type=int, help="processes of the live ring (default 10; --quick 5)")
    parser.add_argument("--live-vnodes", help="V of the live rings (default 1,8,32; --quick 1,32)")
    parser.add_argument("--lookups", type=int, help="lookups per live ring (default 2000; --quick 200)")
    parser.add_argument("--rounds", type=int, help="maintenance rounds counted (default 32; --quick 8)")
    parser.add_argument("--quick", action="store_true", help="a small run, in seconds")
    add_common_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    keys_count = args.keys or (20_000 if quick else 100_000)
    sizes = sorted(set(numbers(args.sizes or ("3,10,100" if quick else ",".join(map(str, SIZES))))))
    vnodes = numbers(args.vnodes or ("1,8,32" if quick else ",".join(map(str, VNODES))))
    processes = args.processes or (5 if quick else 10)
    live_vnodes = numbers(args.live_vnodes or ("1,32" if quick else ",".join(map(str, LIVE_VNODES))))
    lookups = args.lookups or (200 if quick else 2000)
    rounds = args.rounds or (8 if quick else 32)
    if min(sizes, default=0) < 2 or processes < 2 or min([*vnodes, *live_vnodes], default=1) < 1:
        parser.error("ring sizes and --processes must be at least 2, vnodes at least 1")
    baseline = Baseline.load(args.baseline, row_key)

    started = time.perf_counter()
    rng = random.Random(f"{args.seed}/keys")
    keys = [f"key:{rng.getrandbits(48):012x}" for _ in range(max(keys_count, 2 * lookups))]
    key_ids = sorted(SPACE.id(k) for k in keys[:keys_count])
    order = addresses(max(sizes) + 1, random.Random(f"{args.seed}/addresses"), SPACE)
    print(
        f"{keys_count:,} keys, {SPACE.bits}-bit ids, seed {args.seed}, Python {sys.version.split()[0]}. "
        f"Sections 1-2: placement computed with balancer.vnodes' pure functions (incrementally; the first "
        f"{CHECKED_JOINS} joins of every ring checked against allocate_ids itself, every ring's shares "
        "against ownership()). Sections 3-4: live Node processes on LocalTransport.\n"
    )
    status = 0
    try:
        keyed = bench_keys(order, keys[:keys_count], key_ids, sizes, vnodes, args.seed)
        print_balance(keyed, baseline)
        print_moved(keyed, baseline)
        keys_s = time.perf_counter() - started
        live = (
            asyncio.run(bench_live(processes, live_vnodes, rounds, keys, lookups, args.seed))
            if live_vnodes
            else []
        )
        print_traffic(live, keyed, baseline)
        if live:
            print_hops(live, baseline)
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}")
        return 1
    lines, ok = summary(keyed)
    for line in lines:
        print(line)
    if args.strict and not ok:
        status = 1
    print(f"\nsections 1-2 {keys_s:.0f} s, total runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, keyed + live)
    return status


if __name__ == "__main__":
    sys.exit(main())
