"""Maintenance: the periodic pass over every local record, and the hand-off of all of them on leaving.

**Maintenance.** Periodically, and soon after any membership change, each node computes the replica set
of every record it holds. Records it no longer replicates are pushed to their replicas and dropped only
after every one of them confirmed. For each peer it shares records with, it compares per-bucket digests
of those records (64 buckets by key id) and exchanges only the records of buckets that differ (see
:mod:`balancer.kv.antientropy`). Tombstones are collected after ``tombstone_grace`` once every replica
of their key confirmed them. A pass that reached every peer, with no change of the ring during it,
settles the node (see :mod:`balancer.kv.shared`).

Every loop of a pass yields to the event loop after :data:`~balancer.kv.shared.SLICE_SECONDS` of work,
so a pass over millions of records never holds up requests for longer than that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from balancer.errors import BalancerError, RingError
from balancer.kv.antientropy import BUCKET_BITS, AntiEntropy, Digests, fingerprint_of
from balancer.kv.clock import HybridClock
from balancer.kv.coordinator import Coordinator
from balancer.kv.placement import CachedPlacement, ReplicaSets
from balancer.kv.shared import Pacer, Shared
from balancer.kv.transfer import Transfer
from balancer.types import NodeInfo, Record

__all__ = ["Maintainer", "Maintenance"]


@dataclass
class Maintenance:
    """What one maintenance pass did."""

    records: int = 0
    """Records examined."""
    pushed: int = 0
    """Records sent to replicas that lacked them or had older versions."""
    pulled: int = 0
    """Records received from replicas that had newer versions or ones this node lacked."""
    handed_off: int = 0
    """Records dropped here after their replicas confirmed them."""
    collected: int = 0
    """Tombstones collected after their grace period."""
    unreachable: set[str] = field(default_factory=set)
    """Peers that did not answer."""


class Maintainer:
    """Maintenance passes (one at a time), and the hand-off of every record when the node leaves."""

    def __init__(
        self,
        shared: Shared,
        replica_sets: ReplicaSets,
        transfer: Transfer,
        coordinator: Coordinator,
        anti_entropy: AntiEntropy,
    ) -> None:
        self.shared = shared
        self.replica_sets = replica_sets
        self.transfer = transfer
        self.coordinator = coordinator
        self.anti_entropy = anti_entropy
        self._maintaining = asyncio.Lock()

    async def maintain(self) -> Maintenance:
        """One pass of hand-off, repair and anti-entropy over every local record (see the module doc)."""
        async with self._maintaining:
            report = Maintenance()
            epoch, settled, unsettled = self.shared.ring.epoch, self.shared.settled, self.shared.unsettled
            placement = self.replica_sets.placement()
            pacer = Pacer(self.shared.slice)
            me = self.shared.ring.address
            grace = self.shared.config.tombstone_grace
            shift = self.shared.ring.space.bits - BUCKET_BITS
            now = self.shared.wall()
            peers: dict[str, NodeInfo] = {}  # one id to call each process at
            digests: dict[str, Digests] = {}
            misplaced: list[tuple[Record, list[NodeInfo]]] = []
            expired: list[Record] = []
            async for batch in self.shared.storage.scan(batch=self.shared.config.handoff_batch):
                for record in batch:
                    await pacer.pause()
                    report.records += 1
                    if record.value is None and now - HybridClock.seconds(record.version.timestamp) > grace:
                        expired.append(record)
                        continue
                    try:
                        replicas, _ = await self.replica_sets.replica_set(record.key, placement)
                    except RingError:
                        continue
                    bucket = self.shared.ring.space.id(record.key) >> shift
                    fingerprint = 0
                    for node in replicas:
                        if node.address != me:
                            peers.setdefault(node.address, node)
                            digest = digests.get(node.address)
                            if digest is None:
                                digest = digests[node.address] = Digests()
                            fingerprint = fingerprint or fingerprint_of(record.key, record.version)
                            digest.counts[bucket] += 1
                            digest.fingerprints[bucket] ^= fingerprint
                    if all(node.address != me for node in replicas):
                        misplaced.append((record, replicas))
            report.collected = await self._collect(expired, placement, pacer)
            self.anti_entropy.remember(digests, placement, epoch)
            if not settled:  # pull from every member, not only those this node's records name
                for address in (m.address for m in self.shared.members() if m.state == "up"):
                    if address != me and address not in digests:
                        peers[address], digests[address] = NodeInfo(0, address), Digests()
            complete = True
            for address, digest in digests.items():
                complete &= await self.anti_entropy.sync_with(
                    peers[address], digest, placement, report, pacer
                )
            await self._hand_off(misplaced, report, pacer)
            if complete and self.shared.ring.epoch == epoch and self.shared.unsettled == unsettled:
                self.shared.synced_epoch = epoch
            return report

    async def _collect(self, tombstones: list[Record], placement: CachedPlacement, pacer: Pacer) -> int:
        """Drop the ``tombstones`` past their grace period that every replica of their key confirms: it
        holds the tombstone (or a newer record), or nothing at all. A replica that is unreachable, or
        that still holds an older live value, keeps the tombstone here (the latter is repaired), so no
        replica of the key can bring the value back. Returns how many were dropped."""
        me = self.shared.ring.address
        by_replicas: dict[tuple[NodeInfo, ...], list[Record]] = {}
        for record in tombstones:
            await pacer.pause()
            try:
                replicas, _ = await self.replica_sets.replica_set(record.key, placement)
            except RingError:
                continue
            by_replicas.setdefault(tuple(n for n in replicas if n.address != me), []).append(record)
        confirmed: list[Record] = []
        for others, records in by_replicas.items():
            for i in range(0, len(records), self.shared.config.handoff_batch):
                chunk = records[i : i + self.shared.config.handoff_batch]
                keep: set[bytes] = set()
                for node in others:
                    try:
                        held = await self.transfer.read_many(node.address, [r.key for r in chunk])
                    except BalancerError:
                        keep.update(r.key for r in chunk)
                        break
                    behind = [r for r, (theirs, _) in zip(chunk, held, strict=True)
                              if theirs is not None and theirs.version < r.version]  # fmt: skip
                    if behind:
                        keep.update(r.key for r in behind)
                        await self.transfer.write_at(node, behind)
                confirmed += [r for r in chunk if r.key not in keep]
        return await self._remove(confirmed, pacer)

    async def _remove(self, records: list[Record], pacer: Pacer) -> int:
        """Drop ``records`` from the storage (unless overwritten since) a batch at a time; how many."""
        removed = 0
        for i in range(0, len(records), self.shared.config.handoff_batch):
            removed += await self.shared.storage.remove(records[i : i + self.shared.config.handoff_batch])
            await pacer.pause()
        return removed

    async def _hand_off(
        self, misplaced: list[tuple[Record, list[NodeInfo]]], report: Maintenance, pacer: Pacer
    ) -> None:
        """Push records this node does not replicate to their replicas; drop each once all confirmed."""
        confirmed: list[Record] = []
        by_target: dict[tuple[NodeInfo, ...], list[Record]] = {}
        for record, replicas in misplaced:
            by_target.setdefault(tuple(replicas), []).append(record)
            await pacer.pause()
        for targets, records in by_target.items():
            if not targets:
                continue
            acked, _ = await self.coordinator.replicate(records, list(targets), [], len(targets))
            if acked == len(targets):
                confirmed.extend(records)
                for node in targets:
                    self.shared.emit(
                        "range_moved", node=self.shared.ring.info, target=node, records=len(records)
                    )
        if confirmed:
            report.handed_off += await self._remove(confirmed, pacer)

    async def hand_off_all(self, successors: Iterable[NodeInfo]) -> int:
        """Leaving: give every local record to the nodes that replicate it once this node is gone, and
        drop it when they all confirmed. Returns how many records were dropped.

        A record's heirs are its replica set without this node, completed by the next fallback. Records
        whose replica set cannot be looked up go to ``successors`` instead (dropped once one confirmed).
        """
        me = self.shared.ring.address
        placement = self.replica_sets.placement()
        pacer = Pacer(self.shared.slice)
        by_heirs: dict[tuple[NodeInfo, ...], list[Record]] = {}
        async for batch in self.shared.storage.scan(batch=self.shared.config.handoff_batch):
            for record in batch:
                await pacer.pause()
                try:
                    replicas, fallbacks = await self.replica_sets.replica_set(record.key, placement)
                    heirs = [n for n in replicas if n.address != me]
                    heirs += [n for n in fallbacks if n.address != me][:1]
                    heirs = heirs[: self.shared.config.replicas]
                except RingError:
                    heirs = []
                by_heirs.setdefault(tuple(heirs), []).append(record)
        moved = 0
        fallback = [s for s in successors if s.address != me]
        for chosen, records in by_heirs.items():
            targets = list(chosen) or fallback
            if not targets:
                continue
            for i in range(0, len(records), self.shared.config.handoff_batch):
                chunk = records[i : i + self.shared.config.handoff_batch]
                acked, _ = await self.coordinator.replicate(chunk, targets, [], len(targets))
                if acked == len(targets) or (not chosen and acked):
                    moved += await self.shared.storage.remove(chunk)
                    for target in targets:
                        self.shared.emit(
                            "range_moved", node=self.shared.ring.info, target=target, records=len(chunk)
                        )
        return moved
