"""Benchmark: node faults and membership changes on a replicated ring: durability, repair, bytes moved.

Rings of real :class:`balancer.node.Node` objects (key-value service, memory storage, m = 64-bit ids
drawn from the seed, successor lists of r = 8) run in one process on a ``LocalNetwork(wire=True)``, which
counts the RPCs and the JSON bytes of every method. Every maintenance interval (surveys included) is an
hour, so nothing runs by itself: the script drives the protocol in rounds, deterministically. One round is

    every live node forgets the ranges it learned from lookups (``Ring.forget_routes``), then
    check_predecessor + stabilize on every live node (a seeded order), repeated until every successor
    list and predecessor is right (at most ``--max-sweeps`` times), then a survey of the ring from every
    live node (``Node.ring_status()``: one ``ring.describe`` to each other process), then fix_fingers on
    every live node, then kv.drain() + kv.maintain() on every live node (hand-off, repair, digest
    anti-entropy).

A round stands for one maintenance pass (``anti_entropy_interval``, 5 s by default). A node trusts a range
it learned from a lookup for ``max(2 s, 4 x stabilize_interval)`` only (2 s by default), so by the next
pass it has dropped them; here the intervals are an hour, which would keep them for four hours, so each
round drops them explicitly. (Without that, a node that saw no change kept routing by ranges that named
dead or displaced nodes for the whole run: with one id per node, reads raised QuorumError after the
kills and maintenance never settled after a join, for every strategy.)

The survey refreshes each node's members view (``Node.members()``), which the ``groups`` strategy places
keys by; a node's own surveyor does the same soon after every change it sees, and every
``survey_interval`` (30 s by default, against a maintenance pass every 5 s), whatever its strategy. Its
``ring.describe`` RPCs are counted in the traffic like every other method, for every strategy, and shown
apart (survey kB): one survey per node per round is about what a node does after a change, and more than
it does on a quiet ring. Only ``groups`` needs the view to be current to place keys right; ``successor``
and ``multi-ring`` read it only to choose whom to sync with when a node is unsettled.

For each replication strategy (``successor``: the key's owner and the next nodes; ``multi-ring``: the
owners of N independent hashes of the key; ``groups``: the owner's replication group, groups of at least
``groups.size`` = N consecutive processes) with N = 3, W = 2, R = 2, on a ring of ``--nodes`` (16) nodes
of ``--vnodes`` (32) vnodes each, holding ``--keys`` (2,000) keys of ``--value-bytes`` (100) random bytes,
it measures:

1. Durability. The keys are written one by one through random nodes; a write that returned without error
   is acknowledged. Then, *sequential*: one random node is killed (``network.kill``, as kill -9), and rounds
   run until every key is at exactly N copies among the live nodes (the rounds and wall-clock seconds are
   the time to full replication after one loss), and on until every copy is on one of the key's true
   replicas; then a second node is killed and the same is measured (after two losses). *Adjacent pair*:
   on a fresh ring with the same keys, a random node and the process of the vnode after its first vnode
   are killed at once (N - 1 = 2 simultaneous losses, the most N = 3 survives), then the same; the same
   two processes for every strategy. Finally every acknowledged key is read through a random live node
   (quorum read, R = 2): a wrong value, a missing key or a read that raises counts as lost. Right after
   each kill the table shows how many keys were left below N copies, at one copy, and at none (lost in
   storage). Rounds are bounded (``--max-rounds``); a ring that never gets every key back to N copies is
   reported as NOT REACHED.
2. Bytes per membership change. On a settled ring holding the keys (every copy on a true replica, none
   elsewhere; on a ``groups`` ring, every members view right too) one idle round is measured (the steady
   cost of a round on a correct ring, where no stabilize sweep is needed: the surveys, fix_fingers
   lookups, the replica lookups and digests of maintain), then, one after another: one node joins, one
   leaves gracefully (``await node.leave()``), one crashes (``network.kill``). After each, rounds run
   until the ring is settled again; the table gives the RPCs, the bytes (all methods, and the ``kv.*``
   methods' and the surveys' shares), the records carried by ``kv.store`` requests and ``kv.compare``
   answers, and the copies that a perfect hand-off had to create (pairs of key and replica that are new
   in the true placement). The acknowledged keys are read back at the end too.

"True replicas" come from an oracle (:class:`Oracle`) computed from the sorted vnode ids of the live
nodes, independent of any node's routing state or members view: for ``successor`` and ``multi-ring`` the
replica-set rule of ``KVService.replica_set``; for ``groups`` the groups that ``Groups.groups`` forms from
the live processes (so the oracle trusts that grouping code), checked independently on every use. For
``groups`` rings the tables also show how many live nodes' members views still formed other groups at the
end (views off), and a note under each table gives the groups' sizes before and after each change.

Exit status: 1 if any acknowledged write was lost (in any scenario) or an oracle check failed, else 0. A
default run takes 2 to 4 minutes on a 2-core machine (32 vnodes a node), ``--vnodes 1`` under one, and
the small run of the tests (``--nodes 6 --keys 120``) about 35 s.

Run: python benchmarks/faults.py [--nodes 16] [--vnodes 32] [--keys 2000] [--value-bytes 100] [--seed S]
     [--max-rounds 50] [--max-sweeps 60] [--strategies successor,multi-ring,groups]
     [--json out.json] [--baseline old.json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
from _harness import Baseline, add_common_arguments, errors, table, write_json

from balancer.config import Config
from balancer.errors import BalancerError, KeyNotFoundError
from balancer.hookspecs import Payload, ReplicationStrategy
from balancer.keyspace import KeySpace
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.plugins.replication import Groups
from balancer.survey import exact
from balancer.types import Member

STRATEGIES = ("successor", "multi-ring", "groups")
N, W, R = 3, 2, 2
HOUR = 3600.0
# No maintenance loop fires by itself: the script drives every step (as tests/helpers.py's QUIET does).
QUIET: dict[str, Any] = {
    "stabilize_interval": HOUR,
    "fix_fingers_interval": HOUR,
    "check_predecessor_interval": HOUR,
    "anti_entropy_interval": HOUR,
    "survey_interval": HOUR,  # the rounds survey instead (see survey_all), never a timer mid-run
}
SURVEY = "ring.describe"
"""The RPC of a survey (one per other live process); ``ring.place`` asks for one at a vnode join too."""


# -- the network and what it carried ----------------------------------------------------------------


class MeteredNetwork(LocalNetwork):
    """A ``LocalNetwork(wire=True)`` that also counts the records the ``kv`` RPCs carry."""

    def __init__(self) -> None:
        super().__init__(wire=True)
        self.records = 0
        """Records in delivered ``kv.store`` requests and ``kv.compare`` answers."""

    async def deliver(self, source: str, address: str, method: str, payload: Payload) -> Payload:
        """Deliver as :class:`LocalNetwork` does, counting the records the call carried."""
        answer = await super().deliver(source, address, method, payload)
        if method == "kv.store":
            self.records += len(payload.get("records", []))
        elif method == "kv.compare":
            self.records += len(answer.get("records", []))
        return answer


@dataclass(frozen=True, slots=True)
class Traffic:
    """Counters of a :class:`MeteredNetwork` at one moment, or the difference of two moments."""

    calls: int
    kv_calls: int
    survey_calls: int
    bytes: int
    kv_bytes: int
    survey_bytes: int
    records: int

    @classmethod
    def of(cls, network: MeteredNetwork) -> Traffic:
        """The network's counters now."""
        return cls(
            sum(network.calls.values()),
            sum(v for k, v in network.calls.items() if k.startswith("kv.")),
            network.calls[SURVEY],
            sum(network.bytes.values()),
            sum(v for k, v in network.bytes.items() if k.startswith("kv.")),
            network.bytes[SURVEY],
            network.records,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.calls - other.calls,
            self.kv_calls - other.kv_calls,
            self.survey_calls - other.survey_calls,
            self.bytes - other.bytes,
            self.kv_bytes - other.kv_bytes,
            self.survey_bytes - other.survey_bytes,
            self.records - other.records,
        )


# -- rings ------------------------------------------------------------------------------------------


@dataclass
class Ring:
    """Nodes on one metered network: the live ones, and every one ever started (closed at the end)."""

    network: MeteredNetwork
    config: Config
    pm: pluggy.PluginManager
    ids: random.Random
    live: list[Node] = field(default_factory=list)
    made: list[Node] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    """Errors raised by the protocol steps the script drove, by ``step: ErrorName``."""
    violations: Counter[str] = field(default_factory=Counter)
    """Breaches of the oracle's own checks over the whole run (see :class:`Oracle`)."""

    @property
    def strategy(self) -> ReplicationStrategy:
        """The replication strategy every member uses."""
        return self.made[0].strategy

    @property
    def space(self) -> KeySpace:
        """The identifier space every member uses."""
        return self.made[0].space

    async def start(self, join: str | None) -> Node:
        """Start a node joining through ``join`` (or creating the ring). With one id per node the id is
        a fresh seeded one; with virtual nodes the ids are placed as every node places them (from the
        node's address, which the in-process network hands out in order: reproducible too)."""
        taken = {v.info.id for node in self.made for v in node.ring.vnodes}
        ident = self.ids.getrandbits(self.config.bits)
        while ident in taken:  # 64-bit collisions: never in practice, but the id must be unique
            ident = self.ids.getrandbits(self.config.bits)
        fixed = ident if self.config.vnodes == 1 else None
        config = self.config.evolve(node_id=fixed, seed=ident)
        node = Node(config, join=join, pm=self.pm, transport=LocalTransport(self.network))
        await node.start()
        self.made.append(node)
        self.live.append(node)
        return node

    async def crash(self, node: Node) -> None:
        """Kill ``node`` as kill -9 would: unreachable at once, its pending background work gone."""
        self.network.kill(node.address)
        self.live.remove(node)
        await node.close()

    async def close(self) -> None:
        """Close every node ever started."""
        for node in self.made:
            await node.close()


def base_config(strategy: str, vnodes: int = 0) -> Config:
    """The configuration every node of a ring shares (before its own id and seed)."""
    return Config(
        vnodes=vnodes or Config().vnodes,
        transport="local",
        load_entrypoints=False,
        replication=strategy,
        replicas=N,
        write_quorum=W,
        read_quorum=R,
        **QUIET,
    )


async def build_ring(strategy: str, count: int, seed: int, vnodes: int = 0) -> Ring:
    """``count`` nodes joined one by one through random members, stabilized after each join, converged.

    The ids and join order depend on ``seed`` only, so both strategies get the same ring.
    """
    rng = random.Random(f"{seed}/ring")
    config = base_config(strategy, vnodes)
    ring = Ring(MeteredNetwork(), config, plugin_manager(load_entrypoints=False), rng)
    for _ in range(count):
        await ring.start(rng.choice(ring.live).address if ring.live else None)
        for _sweep in range(2):
            for member in ring.live:
                await step(ring, "stabilize", member.ring.stabilize())
    await stabilize_until_correct(ring, rng, 10 * count)
    for node in ring.live:
        await step(ring, "fix_fingers", node.ring.fix_all())
    await survey_all(ring)
    return ring


async def step(ring: Ring, name: str, work: Awaitable[Any]) -> None:
    """Await one protocol step; a :class:`BalancerError` is counted (the node's own loop would log it)."""
    try:
        await work
    except BalancerError as exc:
        ring.errors[f"{name}: {type(exc).__name__}"] += 1


def ring_is_correct(nodes: Sequence[Node]) -> bool:
    """Every vnode's successor list and predecessor are what the sorted ids imply."""
    return exact(v for node in nodes for v in node.ring.vnodes)


async def stabilize_until_correct(ring: Ring, rng: random.Random, limit: int) -> int:
    """Sweeps of check_predecessor + stabilize on every live node until the ring is correct.

    Each sweep visits the nodes in a fresh seeded order. Returns the sweeps run (at most ``limit``).
    """
    order = list(ring.live)
    for sweeps in range(limit):
        if ring_is_correct(ring.live):
            return sweeps
        rng.shuffle(order)
        for node in order:
            await step(ring, "check_predecessor", node.ring.check_predecessor())
            await step(ring, "stabilize", node.ring.stabilize())
    return limit


async def survey_all(ring: Ring) -> None:
    """Every live node surveys the ring (``Node.ring_status``: one ``ring.describe`` to each other
    process it knows or finds), which refreshes its members view as its own surveyor would after a
    change it saw."""
    for node in ring.live:
        await step(ring, "survey", node.ring_status())


async def repair_round(ring: Ring, rng: random.Random, max_sweeps: int) -> int:
    """One round (see the module doc); returns the stabilize sweeps it took."""
    for node in ring.live:  # a round stands for a maintenance interval: learned routes expired by then
        node.ring.forget_routes()
    sweeps = await stabilize_until_correct(ring, rng, max_sweeps)
    await survey_all(ring)
    for node in ring.live:
        await step(ring, "fix_fingers", node.ring.fix_all())
    for node in ring.live:
        await step(ring, "drain", node.kv.drain())
    for node in ring.live:
        await step(ring, "maintain", node.kv.maintain())
    for node in ring.live:  # so that the census after the round sees finished work only
        await step(ring, "drain", node.kv.drain())
    return sweeps


# -- where the keys are, and where they should be ---------------------------------------------------


class Oracle:
    """The true replicas of every key on a correct ring of the live nodes, from their sorted vnode ids,
    independent of any node's routing state or members view.

    ``successor`` and ``multi-ring``: the rule of ``KVService.replica_set`` over the default ``place``:
    for each position the strategy names, the first process of the walk from that position's owner
    (vnode ids in order, each process once) not chosen yet; then the rest from the last walk.

    ``groups``: the live processes form groups as :meth:`Groups.groups` forms them (a fresh ``Groups``
    of the ring's ``groups.size``, given one :class:`Member` per live node with its vnode ids). The oracle
    reuses that grouping code rather than re-implementing it, so it trusts it: a bug in how groups are
    formed would show in both the nodes and the oracle. What it does not trust is checked here, on every
    oracle: the groups partition the live processes, each is a run of consecutive processes in ring
    order (by first vnode id) of at least ``size`` of them (or the whole ring, if it is no larger), and
    each key's replicas are N distinct processes of its owner's group, the owner first. A key's replicas
    are its owner (the process of the first vnode at or after the key's id) and the processes after it
    in its group, wrapping inside the group. Breaches are counted in :attr:`violations` (the ring's
    :attr:`Ring.violations`).
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.ordered = sorted(v.info for node in ring.live for v in node.ring.vnodes)
        self.ids = [info.id for info in self.ordered]
        self.violations = ring.violations
        """Breaches of the checks above, by what was breached (the ring's counter, kept for the run)."""
        self.size = 0
        """``groups.size`` of a ``groups`` ring (0 for the other strategies)."""
        self.groups: list[list[str]] = []
        """The live processes' groups, in ring order, as ``Groups.groups`` forms them (``groups`` only)."""
        self._group_of: dict[str, int] = {}
        self._cache: dict[bytes, frozenset[str]] = {}
        strategy = ring.strategy
        if isinstance(strategy, Groups):
            self.size = strategy.size
            self.groups = [list(g) for g in Groups(strategy.size).groups(live_members(ring))]
            self._group_of = {a: i for i, group in enumerate(self.groups) for a in group}
            self._check_groups()

    def replicas(self, key: bytes) -> frozenset[str]:
        """The addresses of ``key``'s N replicas (fewer only on a smaller ring)."""
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = frozenset(
                self._in_group(key) if self.groups else self._by_positions(key)
            )
        return found

    def group(self, address: str) -> int | None:
        """The index of the group ``address`` belongs to (``None``: no such live process, or no groups)."""
        return self._group_of.get(address)

    def owner(self, ident: int) -> str:
        """The process of the first live vnode at or after ``ident``."""
        return self.ordered[bisect.bisect_left(self.ids, ident) % len(self.ordered)].address

    def _by_positions(self, key: bytes) -> list[str]:
        count = len(self.ordered)
        chosen: list[str] = []
        after: list[str] = []
        for position in self.ring.strategy.positions(key, N, self.ring.space):
            first = bisect.bisect_left(self.ids, position) % count
            walk = (self.ordered[(first + k) % count].address for k in range(count))
            after = list(dict.fromkeys(walk))[: self.ring.config.successors]
            pick = next((address for address in after if address not in chosen), None)
            if pick is not None:
                chosen.append(pick)
        for address in after:
            if len(chosen) >= N:
                break
            if address not in chosen:
                chosen.append(address)
        return chosen[:N]

    def _in_group(self, key: bytes) -> list[str]:
        owner = self.owner(self.ring.space.id(key))
        group = self.groups[self._group_of[owner]]
        start = group.index(owner)
        chosen = (group[start:] + group[:start])[:N]
        # the independent check of this key's replicas: N distinct live processes of one group
        if len(set(chosen)) != min(N, len(self.ring.live)):
            self.violations["replicas not N distinct processes"] += 1
        if len({self._group_of.get(a) for a in chosen}) != 1:
            self.violations["replicas in more than one group"] += 1
        return chosen

    def _check_groups(self) -> None:
        """Check the groups the trusted grouping code formed against the rule it promises."""
        firsts = sorted((min(member.ids), member.address) for member in live_members(self.ring))
        ring_order = [address for _, address in firsts]
        placed = [address for group in self.groups for address in group]
        if sorted(placed) != sorted(ring_order):
            self.violations["groups do not partition the live processes"] += 1
            return
        position = {address: i for i, address in enumerate(ring_order)}
        count = len(ring_order)
        for group in self.groups:
            if len(group) < min(self.size, count):
                self.violations["group smaller than groups.size"] += 1
            first = position[group[0]]
            if [position[a] for a in group] != [(first + k) % count for k in range(len(group))]:
                self.violations["group not consecutive along the ring"] += 1


def live_members(ring: Ring) -> tuple[Member, ...]:
    """One :class:`Member` per live node (address and vnode ids, up), as a correct survey would find."""
    return tuple(
        Member(node.address, tuple(sorted(v.info.id for v in node.ring.vnodes)))
        for node in sorted(ring.live, key=lambda n: n.address)
    )


def stale_views(ring: Ring, oracle: Oracle) -> int:
    """Live nodes whose members view forms other groups than the live processes do (``groups`` only;
    0 for the others, whose placement does not read the view)."""
    strategy = ring.strategy
    if not isinstance(strategy, Groups):
        return 0
    return sum(
        [list(g) for g in Groups(strategy.size).groups(node.members())] != oracle.groups for node in ring.live
    )


@dataclass(frozen=True, slots=True)
class Census:
    """Where the copies of the keys are among the live nodes (stored records, no RPCs)."""

    keys: int
    """Distinct keys stored anywhere, plus acknowledged keys stored nowhere."""
    below: int
    """Keys with fewer than N copies."""
    one: int
    """Keys with exactly one copy."""
    none: int
    """Acknowledged keys with no live copy of their acknowledged value (lost in storage)."""
    above: int
    """Keys with more than N copies."""
    misplaced: int
    """Keys whose holders are not exactly their true replicas."""
    stale: int
    """Live nodes whose members view forms other groups than the live processes (``groups`` only)."""
    groups: list[int]
    """The sizes of the live processes' groups, in ring order (``groups`` only, else empty)."""
    holders: dict[bytes, frozenset[str]]

    @property
    def at_n(self) -> bool:
        """Every key has exactly N copies."""
        return self.below == 0 and self.above == 0

    @property
    def settled(self) -> bool:
        """Every key is on exactly its true replicas, and (``groups``) every live node's members view
        forms the groups the live processes form: the next client operation places keys right too."""
        return self.at_n and self.misplaced == 0 and self.stale == 0


async def census(ring: Ring, acked: dict[bytes, bytes]) -> Census:
    """Count the copies of every key among the live nodes and compare them with the true replicas."""
    holders: dict[bytes, set[str]] = {}
    good: set[bytes] = set()
    for node in ring.live:
        for record in await node.local_records():
            holders.setdefault(record.key, set()).add(node.address)
            if record.key in acked and record.value == acked[record.key]:
                good.add(record.key)
    keys = set(holders) | set(acked)
    counts = {key: len(holders.get(key, ())) for key in keys}
    oracle = Oracle(ring)
    return Census(
        keys=len(keys),
        below=sum(c < N for c in counts.values()),
        one=sum(c == 1 for c in counts.values()),
        none=sum(key not in good for key in acked),
        above=sum(c > N for c in counts.values()),
        misplaced=sum(frozenset(holders.get(key, ())) != oracle.replicas(key) for key in keys),
        stale=stale_views(ring, oracle),
        groups=[len(group) for group in oracle.groups],
        holders={key: frozenset(nodes) for key, nodes in holders.items()},
    )


# -- writes, repairs, reads -------------------------------------------------------------------------


async def write_keys(
    ring: Ring, count: int, value_bytes: int, rng: random.Random
) -> tuple[dict[bytes, bytes], Counter[str]]:
    """Write ``count`` keys one by one through random live nodes; returns the acknowledged ones (key to
    value) and the errors of the others.
    """
    acked: dict[bytes, bytes] = {}
    failed: Counter[str] = Counter()
    for i in range(count):
        key = f"fault-{i:06d}".encode()
        value = rng.randbytes(value_bytes)
        try:
            await rng.choice(ring.live).kv.put(key, value)
        except BalancerError as exc:
            failed[type(exc).__name__] += 1
            continue
        acked[key] = value
    return acked, failed


@dataclass(frozen=True, slots=True)
class Repair:
    """Rounds until every key was at N copies and until every copy was on a true replica (None: not
    within the bound), the round seconds each took, the stabilize sweeps and the traffic of all rounds.
    """

    at_n: int | None
    at_n_s: float
    settled: int | None
    settled_s: float
    sweeps: int
    traffic: Traffic
    last: Census


async def repair(
    ring: Ring,
    acked: dict[bytes, bytes],
    rng: random.Random,
    max_rounds: int,
    max_sweeps: int,
    min_rounds: int = 0,
) -> Repair:
    """Run rounds until every key is on exactly its true replicas and every members view is right
    (:attr:`Census.settled`; and ``min_rounds`` ran), at most
    ``max_rounds``.

    The seconds count the rounds only, not the census taken after each.
    """
    before = Traffic.of(ring.network)
    state = await census(ring, acked)
    at_n: int | None = 0 if state.at_n else None
    settled: int | None = 0 if state.settled else None
    elapsed = at_n_s = settled_s = 0.0
    sweeps = 0
    done = 0
    while (settled is None or done < min_rounds) and done < max_rounds:
        started = time.perf_counter()
        sweeps += await repair_round(ring, rng, max_sweeps)
        elapsed += time.perf_counter() - started
        done += 1
        state = await census(ring, acked)
        if at_n is None and state.at_n:
            at_n, at_n_s = done, elapsed
        if state.settled:
            settled, settled_s = done, elapsed
    return Repair(at_n, at_n_s, settled, settled_s, sweeps, Traffic.of(ring.network) - before, state)


@dataclass(frozen=True, slots=True)
class Reads:
    """Acknowledged keys read back through random live nodes."""

    ok: int
    wrong: int
    missing: int
    failed: Counter[str]

    @property
    def lost(self) -> int:
        """Keys whose acknowledged value could not be read back."""
        return self.wrong + self.missing + sum(self.failed.values())


async def read_back(ring: Ring, acked: dict[bytes, bytes], rng: random.Random) -> Reads:
    """Read every acknowledged key through a random live node and compare with what was written."""
    ok = wrong = missing = 0
    failed: Counter[str] = Counter()
    for key, value in acked.items():
        try:
            got = await rng.choice(ring.live).kv.get(key)
        except KeyNotFoundError:
            missing += 1
            continue
        except BalancerError as exc:
            failed[type(exc).__name__] += 1
            continue
        if got == value:
            ok += 1
        else:
            wrong += 1
    for node in ring.live:
        await step(ring, "drain", node.kv.drain())  # read repair, if any
    return Reads(ok, wrong, missing, failed)


def successor_of(ring: Ring, node: Node) -> Node:
    """The live node whose vnode follows ``node``'s first vnode on the ring, skipping ``node``'s own
    (by id, whatever the routing state says)."""
    ordered = sorted((v.info for n in ring.live for v in n.ring.vnodes), key=lambda info: info.id)
    start = ordered.index(node.info)
    following = (ordered[(start + k) % len(ordered)] for k in range(1, len(ordered)))
    address = next(info.address for info in following if info.address != node.address)
    return next(n for n in ring.live if n.address == address)


# -- section 1: durability --------------------------------------------------------------------------


def repair_fields(result: Repair) -> dict[str, Any]:
    """A repair's figures as row fields."""
    return {
        "rounds": result.at_n,
        "seconds": result.at_n_s,
        "rounds_settled": result.settled,
        "seconds_settled": result.settled_s,
        "sweeps": result.sweeps,
        "repair_bytes": result.traffic.bytes,
        "repair_kv_bytes": result.traffic.kv_bytes,
        "repair_survey_bytes": result.traffic.survey_bytes,
        "end_stale_views": result.last.stale,
        "groups_after": result.last.groups,
        "end_below": result.last.below,
        "end_above": result.last.above,
        "end_misplaced": result.last.misplaced,
    }


def kill_fields(state: Census) -> dict[str, Any]:
    """How the keys stood right after a kill, as row fields."""
    return {"below_n": state.below, "one_copy": state.one, "no_copy": state.none}


def read_fields(reads: Reads) -> dict[str, Any]:
    """A read-back's figures as row fields."""
    return {
        "read_ok": reads.ok,
        "read_wrong": reads.wrong,
        "read_missing": reads.missing,
        "read_failed": dict(reads.failed),
        "lost": reads.lost,
    }


async def bench_durability(strategy: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The durability rows of one strategy and one variant (``sequential`` or ``adjacent``)."""
    ring = await build_ring(strategy, args.nodes, args.seed, args.vnodes)
    # the same writes and victims for both strategies: the seed does not name the strategy
    rng = random.Random(f"{args.seed}/durability/{variant}")
    rows: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        acked, failed = await write_keys(ring, args.keys, args.value_bytes, rng)
        oracle = Oracle(ring)
        common = {
            "section": "durability",
            "strategy": strategy,
            "keys": args.keys,
            "acked": len(acked),
            "write_failed": dict(failed),
            "write_s": time.perf_counter() - started,
            "max_rounds": args.max_rounds,
        }
        if variant == "sequential":
            for loss in (1, 2):
                victims = [rng.choice(ring.live)]
                common["groups"] = [len(group) for group in Oracle(ring).groups]
                await ring.crash(victims[0])
                state = await census(ring, acked)
                result = await repair(ring, acked, rng, args.max_rounds, args.max_sweeps)
                rows.append(
                    {
                        **common,
                        "variant": f"sequential, loss {loss}",
                        "killed": [v.address for v in victims],
                        "live": len(ring.live),
                        **kill_fields(state),
                        **repair_fields(result),
                    }
                )
        else:
            first = rng.choice(ring.live)
            victims = [first, successor_of(ring, first)]
            common["groups"] = [len(group) for group in oracle.groups]
            common["pair_groups"] = len({oracle.group(v.address) for v in victims}) if oracle.groups else None
            for victim in victims:  # no step of the protocol runs between the two kills
                await ring.crash(victim)
            state = await census(ring, acked)
            result = await repair(ring, acked, rng, args.max_rounds, args.max_sweeps)
            rows.append(
                {
                    **common,
                    "variant": "adjacent pair at once",
                    "killed": [v.address for v in victims],
                    "live": len(ring.live),
                    **kill_fields(state),
                    **repair_fields(result),
                }
            )
        rows[-1].update(read_fields(await read_back(ring, acked, rng)))
        rows[-1]["step_errors"] = dict(ring.errors)
        rows[-1]["oracle_violations"] = dict(ring.violations)
    finally:
        await ring.close()
    return rows


# -- section 2: bytes per membership change ---------------------------------------------------------


def copies_moved(before: dict[bytes, frozenset[str]], ring: Ring) -> tuple[int, int]:
    """Copies a perfect hand-off creates, and drops on live nodes, to go from holders ``before`` to the true
    placement of the live nodes.
    """
    live = {node.address for node in ring.live}
    oracle = Oracle(ring)
    created = dropped = 0
    for key, held in before.items():
        wanted = oracle.replicas(key)
        created += len(wanted - held)
        dropped += len((held & live) - wanted)  # a dead or departed node's copies vanish by themselves
    return created, dropped


async def bench_membership(strategy: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The membership rows of one strategy: an idle round, then a join, a leave and a crash."""
    ring = await build_ring(strategy, args.nodes, args.seed, args.vnodes)
    rng = random.Random(f"{args.seed}/membership")
    rows: list[dict[str, Any]] = []
    try:
        acked, failed = await write_keys(ring, args.keys, args.value_bytes, rng)
        # at least one round: a node's first maintenance pass compares every bucket with every peer (the
        # peer has no digests from an earlier pass yet), a one-off cost the idle round must not include
        initial = await repair(ring, acked, rng, args.max_rounds, args.max_sweeps, min_rounds=1)
        common = {
            "section": "membership",
            "strategy": strategy,
            "acked": len(acked),
            "max_rounds": args.max_rounds,
        }
        rows.append(
            {
                **common,
                "variant": "after the writes: rounds until settled, at least one",
                "nodes": f"{len(ring.live)}",
                "copies_created": None,
                "copies_dropped": None,
                **repair_fields(initial),
                **traffic_fields(initial.traffic),
            }
        )
        if initial.settled is None:
            return rows  # reported as NOT REACHED; the changes below would start from an unsettled ring
        before = Traffic.of(ring.network)
        started = time.perf_counter()
        await repair_round(ring, rng, args.max_sweeps)
        idle_s = time.perf_counter() - started
        state = await census(ring, acked)
        rows.append(
            {
                **common,
                "variant": "none (one idle round)",
                "nodes": f"{len(ring.live)}",
                "copies_created": 0,
                "copies_dropped": 0,
                "rounds": 1,
                "seconds": idle_s,
                "rounds_settled": 1 if state.settled else None,
                "seconds_settled": idle_s,
                "sweeps": 0,
                "end_below": state.below,
                "end_above": state.above,
                "end_misplaced": state.misplaced,
                "end_stale_views": state.stale,
                "groups_after": state.groups,
                **traffic_fields(Traffic.of(ring.network) - before),
            }
        )
        for event in ("join", "leave", "crash"):
            size = len(ring.live)
            start = await census(ring, acked)
            holders = start.holders
            before = Traffic.of(ring.network)
            started = time.perf_counter()
            if event == "join":
                await ring.start(rng.choice(ring.live).address)
            elif event == "leave":
                leaving = rng.choice(ring.live)
                ring.live.remove(leaving)
                await leaving.leave()
            else:
                await ring.crash(rng.choice(ring.live))
            change_s = time.perf_counter() - started
            created, dropped = copies_moved(holders, ring)
            result = await repair(ring, acked, rng, args.max_rounds, args.max_sweeps)
            rows.append(
                {
                    **common,
                    "variant": event,
                    "nodes": f"{size} → {len(ring.live)}",
                    "groups": start.groups,
                    "copies_created": created,
                    "copies_dropped": dropped,
                    **repair_fields(result),
                    "seconds": result.at_n_s + change_s,
                    "seconds_settled": result.settled_s + change_s,
                    **traffic_fields(Traffic.of(ring.network) - before),
                }
            )
        rows[-1].update(read_fields(await read_back(ring, acked, rng)))
        rows[-1]["write_failed"] = dict(failed)
        rows[-1]["step_errors"] = dict(ring.errors)
        rows[-1]["oracle_violations"] = dict(ring.violations)
    finally:
        await ring.close()
    return rows


def traffic_fields(traffic: Traffic) -> dict[str, Any]:
    """A traffic difference as row fields."""
    return {
        "calls": traffic.calls,
        "kv_calls": traffic.kv_calls,
        "survey_calls": traffic.survey_calls,
        "bytes": traffic.bytes,
        "kv_bytes": traffic.kv_bytes,
        "survey_bytes": traffic.survey_bytes,
        "records": traffic.records,
    }


# -- output -----------------------------------------------------------------------------------------


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['section']}/{row['strategy']}/{row['variant']}"


def reached(rounds: int | None, seconds: float, limit: int) -> str:
    """``3 (0.41 s)``, or that the goal was not reached within ``limit`` rounds."""
    return f"NOT REACHED in {limit}" if rounds is None else f"{rounds} ({seconds:.2f} s)"


def kb(count: int) -> str:
    """Bytes as kB with one decimal."""
    return f"{count / 1000:,.1f}"


def reads_cell(row: dict[str, Any]) -> str:
    """``ok / wrong / missing / failed`` of the read-back a row carries, or ``-``."""
    if "read_ok" not in row:
        return "-"
    return f"{row['read_ok']:,} / {row['read_wrong']} / {row['read_missing']} / {errors(row['read_failed'])}"


def repair_cell(row: Mapping[str, Any]) -> str:
    """``total (kv / survey)`` kB of a repair."""
    return (
        f"{kb(row['repair_bytes'])} ({kb(row['repair_kv_bytes'])} / {kb(row.get('repair_survey_bytes', 0))})"
    )


def views_cell(row: Mapping[str, Any]) -> str:
    """Live nodes whose members view was off at the end (``groups`` rings), or ``-``."""
    return str(row["end_stale_views"]) if row.get("groups_after") else "-"


def group_notes(rows: list[dict[str, Any]]) -> list[str]:
    """A line per change on a ``groups`` ring: the sizes of its groups before and after, and where an
    adjacent pair fell."""
    notes = []
    for r in rows:
        if not r.get("groups"):
            continue
        sizes = f"{', '.join(map(str, r['groups']))} → {', '.join(map(str, r['groups_after']))}"
        line = f"- {r['strategy']}, {r['variant']}: processes per group {sizes}"
        if r.get("pair_groups") is not None:
            where = "one group" if r["pair_groups"] == 1 else f"{r['pair_groups']} groups"
            line += f"; the pair killed ({' + '.join(r['killed'])}) was in {where}"
        notes.append(line)
    return [*notes, ""] if notes else []


def print_durability(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """The durability table."""
    head = [
        "strategy",
        "scenario",
        "acked / written",
        "live after",
        "keys < N right after",
        "at 1 copy",
        "at 0 copies",
        "rounds (s) to N copies",
        "rounds (s) to exact placement",
        "stabilize sweeps",
        "repair kB (kv / survey kB)",
        "views off at the end",
        "read back: ok / wrong / missing / failed",
        "lost",
    ] + (["baseline rounds"] if baseline else [])
    lines = []
    for r in rows:
        lines.append(
            [
                r["strategy"],
                r["variant"],
                f"{r['acked']:,} / {r['keys']:,}",
                str(r["live"]),
                str(r["below_n"]),
                str(r["one_copy"]),
                str(r["no_copy"]),
                reached(r["rounds"], r["seconds"], r["max_rounds"]),
                reached(r["rounds_settled"], r["seconds_settled"], r["max_rounds"]),
                str(r["sweeps"]),
                repair_cell(r),
                views_cell(r),
                reads_cell(r),
                str(r["lost"]) if "lost" in r else "-",
                *baseline.figure(r, "rounds", "d"),
            ]
        )
    print(
        f"### Durability (N = {N}, W = {W}, R = {R}). Keys written through random nodes, then nodes killed "
        f"(kill -9); one round = every node drops its learned routes, stabilize until the ring is correct, "
        f"a survey from every live node, fix_fingers, drain + maintain on every live node. Seconds are the "
        f"rounds' wall-clock time. Survey kB = ring.describe. Views off = live nodes whose members view "
        f"forms other groups than the live processes (groups only). Lost = acknowledged keys read back "
        f"wrong, missing, or not at all.\n"
    )
    table(head, lines)
    for line in group_notes(rows):
        print(line)


def print_membership(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """The bytes-per-membership-change table."""
    head = [
        "strategy",
        "change",
        "nodes",
        "rounds (s) to settled",
        "RPCs (kv / survey)",
        "kB moved",
        "kv kB (share)",
        "survey kB (share)",
        "records carried",
        "copies to create / drop",
        "kv bytes / copy created",
        "views off at the end",
        "read back at the end: ok / wrong / missing / failed",
    ] + (["baseline kB"] if baseline else [])
    lines = []
    for r in rows:
        created = r["copies_created"]
        survey = r.get("survey_bytes", 0)
        lines.append(
            [
                r["strategy"],
                r["variant"],
                r["nodes"],
                reached(r["rounds_settled"], r["seconds_settled"], r["max_rounds"]),
                f"{r['calls']:,} ({r['kv_calls']:,} / {r.get('survey_calls', 0):,})",
                kb(r["bytes"]),
                f"{kb(r['kv_bytes'])} ({r['kv_bytes'] / max(r['bytes'], 1):.0%})",
                f"{kb(survey)} ({survey / max(r['bytes'], 1):.0%})",
                f"{r['records']:,}",
                "-" if created is None else f"{created:,} / {r['copies_dropped']:,}",
                f"{r['kv_bytes'] / created:,.0f}" if created else "-",
                views_cell(r),
                reads_cell(r),
                *baseline.figure(r, "bytes", ",.1f", scale=1e-3),
            ]
        )
    print(
        "### Bytes per membership change, on a settled ring (every copy on a true replica, none elsewhere), "
        "one change after another, each followed by rounds until settled again (a round as above, with its "
        "survey from every live node). kB = JSON bytes of requests and answers, all methods (kv.* and "
        "the surveys' ring.describe shares apart); records carried = records in kv.store requests and "
        "kv.compare answers; copies to create / drop = what a perfect hand-off does.\n"
    )
    table(head, lines)
    for line in group_notes(rows):
        print(line)


def summary(strategy: str, rows: list[dict[str, Any]]) -> str:
    """One line per strategy: writes lost, time to full replication, bytes per change."""
    mine = [r for r in rows if r["strategy"] == strategy]
    acked = sum(r["acked"] for r in mine if "lost" in r)
    lost = sum(r["lost"] for r in mine if "lost" in r)
    parts = [f"{strategy}: {lost} of {acked:,} acknowledged writes lost"]
    for r in mine:
        if r["section"] == "durability":
            parts.append(
                f"N copies again {r['variant']}: {reached(r['rounds'], r['seconds'], r['max_rounds'])}"
            )
    moved = [
        f"{r['variant']} {kb(r['bytes'])} kB (kv {kb(r['kv_bytes'])})"
        for r in mine
        if r["section"] == "membership" and r["variant"] in ("join", "leave", "crash")
    ]
    if moved:
        parts.append("moved per change: " + ", ".join(moved))
    return "; ".join(parts)


# -- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, baseline: Baseline) -> list[dict[str, Any]]:
    """Run both sections for every strategy, printing each table when it is done; returns the rows."""
    strategies = args.strategies.split(",")
    durability: list[dict[str, Any]] = []
    for strategy in strategies:
        for variant in ("sequential", "adjacent"):
            durability += await bench_durability(strategy, variant, args)
    print_durability(durability, baseline)
    membership: list[dict[str, Any]] = []
    for strategy in strategies:
        membership += await bench_membership(strategy, args)
    print_membership(membership, baseline)
    return durability + membership


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16, help="ring size")
    parser.add_argument("--vnodes", type=int, default=Config().vnodes, help="virtual nodes per node")
    parser.add_argument("--keys", type=int, default=2000, help="keys written")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"replication strategies, comma-separated (default: all of {', '.join(STRATEGIES)})",
    )
    parser.add_argument("--max-rounds", type=int, default=50, help="bound on repair rounds per phase")
    parser.add_argument("--max-sweeps", type=int, default=60, help="bound on stabilize sweeps per round")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.nodes < N + 2:
        parser.error(f"--nodes must be at least {N + 2} (two nodes die and N must remain)")
    for name in args.strategies.split(","):
        if name not in STRATEGIES:
            parser.error(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    started = time.perf_counter()
    print(
        f"Faults on LocalNetwork(wire=True): {args.nodes} nodes, {args.keys:,} keys of {args.value_bytes} "
        f"bytes, {args.vnodes} vnodes each, N = {N}, W = {W}, R = {R}, "
        f"r = {base_config(STRATEGIES[0]).successors}, seed {args.seed}, "
        f"Python {sys.version.split()[0]}\n"
    )
    rows = asyncio.run(run(args, Baseline.load(args.baseline, row_key)))
    for strategy in args.strategies.split(","):
        print(summary(strategy, rows))
    lost = sum(r.get("lost", 0) for r in rows)
    unreached = [f"{r['strategy']} / {r['variant']}" for r in rows if r["rounds_settled"] is None]
    if unreached:
        print(f"NOT settled within {args.max_rounds} rounds: {'; '.join(unreached)}")
    step_errors = Counter[str]()
    for r in rows:
        step_errors.update(r.get("step_errors", {}))
    print(f"protocol steps that raised: {errors(dict(step_errors))}")
    violations = Counter[str]()
    for r in rows:
        violations.update(r.get("oracle_violations", {}))
    if violations:
        print(f"ORACLE CHECKS FAILED (its replicas cannot be trusted): {errors(dict(violations))}")
    print(f"acknowledged writes lost: {lost}")
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    return 1 if lost or violations else 0


if __name__ == "__main__":
    sys.exit(main())
