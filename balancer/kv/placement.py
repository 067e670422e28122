"""Replica sets: which processes hold a key.

**Replicas.** A key's replica set is N distinct nodes: the owners of the ring positions the replication
strategy names (the successor of the key's id for ``successor``; of ``hash(key, i)`` for ``multi-ring``),
completed from the successor list. Nodes after those are fallbacks: a write sends a copy to one for each
replica that does not answer (it never counts towards W), and a read asks them while the ring changes.
A process counts once however many of its vnodes a key's walk passes.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from balancer.chord import distinct
from balancer.hookspecs import Placement
from balancer.keyspace import in_interval
from balancer.kv.shared import Shared
from balancer.ring import Ring
from balancer.types import Member, NodeInfo

__all__ = ["MAX_CANDIDATES", "SET_CACHE", "SET_TTL", "CachedPlacement", "ReplicaSets"]

SET_TTL = 1.0
"""Seconds a client key's replica set is reused while the ring shows no change (see ``replica_set``)."""
SET_CACHE = 1 << 14
"""Client keys whose replica sets are remembered at most; the memory is dropped whole when full."""
MAX_CANDIDATES = 64
"""Most processes a strategy's placement may name (replicas and stand-ins together)."""


class CachedPlacement(Placement):
    """Lookup answers cached for one pass: after ``find_successor(p)`` returns owner ``o``, every id in
    ``[p, o]`` has owner ``o``, so a pass costs about one lookup per node instead of one per record.
    """

    def __init__(self, ring: Ring, members: Callable[[], tuple[Member, ...]]) -> None:
        self.ring = ring
        self.space = ring.space
        self._members = members
        self.ends: list[int] = []  # owners' ids, sorted; each with the widest range seen ending there
        self.known: dict[int, tuple[int, tuple[NodeInfo, ...]]] = {}

    async def successors(self, ident: int) -> tuple[NodeInfo, ...]:
        size = self.ring.space.size
        if self.ends:  # the only range that can hold ident ends at the first owner at or after it
            end = self.ends[bisect.bisect_left(self.ends, ident) % len(self.ends)]
            start, nodes = self.known[end]
            if in_interval(ident, start, end, size, left_closed=True, right_closed=True):
                return nodes
        found = await self.ring.find_successor(ident)
        nodes = found.successors or (found.owner,)
        end = found.owner.id
        if end not in self.known:
            bisect.insort(self.ends, end)
            self.known[end] = (ident, nodes)
        elif in_interval(self.known[end][0], ident, end, size, left_closed=True, right_closed=True):
            self.known[end] = (ident, nodes)  # reaches further back than the range known so far
        return nodes

    def members(self) -> tuple[Member, ...]:
        return self._members()


class ReplicaSets:
    """Keys' replica sets as the strategy places them, those of recent client keys remembered."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # replica sets of recent client keys: (ring epoch, good until, replicas, fallbacks)
        self._sets: dict[bytes, tuple[float, list[NodeInfo], list[NodeInfo]]] = {}
        self._sets_epoch = 0

    def placement(self) -> CachedPlacement:
        """A placement with an empty cache of lookups, for one pass (or one key)."""
        return CachedPlacement(self.shared.ring, self.shared.members)

    async def replica_set(
        self, key: bytes, placement: CachedPlacement | None = None
    ) -> tuple[list[NodeInfo], list[NodeInfo]]:
        """The key's replicas (N distinct nodes, fewer only on a smaller ring) and its fallbacks.

        Without ``placement`` (a client's read or write), the answer is remembered while the ring stays
        as this process saw it (:attr:`Ring.epoch`) and for at most :data:`SET_TTL` seconds, the time
        within which a change no event announces (a successor list shortened by stabilization) shows.
        """
        if placement is None:
            now, epoch = time.monotonic(), self.shared.ring.epoch
            if self._sets_epoch != epoch:  # the ring changed: nothing remembered holds
                self._sets.clear()
                self._sets_epoch = epoch
            cached = self._sets.get(key)
            if cached is not None and cached[0] > now:
                return cached[1], cached[2]
            replicas, fallbacks = await self._replica_set(key, self.placement())
            if self.shared.ring.epoch == epoch:  # a change during the lookup: its answer is not kept
                if len(self._sets) >= SET_CACHE:
                    self._sets.clear()
                self._sets[key] = (now + SET_TTL, replicas, fallbacks)
            return replicas, fallbacks
        return await self._replica_set(key, placement)

    async def _replica_set(
        self, key: bytes, placement: CachedPlacement
    ) -> tuple[list[NodeInfo], list[NodeInfo]]:
        n = self.shared.config.replicas
        candidates = distinct(await self.shared.strategy.place(key, n, placement), MAX_CANDIDATES)
        return candidates[:n], candidates[n:]
