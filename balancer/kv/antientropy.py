"""Anti-entropy: replicas compare digests of the records they share, and exchange only those of the
buckets that differ; both ends of ``kv.digests`` and ``kv.compare``.

For each peer it shares records with, a maintenance pass computes per-bucket digests of those records
(64 buckets by key id: :data:`BUCKET_BITS`) and compares them with the peer's. A pass keeps per peer only
one count and one digest per bucket, never a copy of the keys: the records of a bucket that differs are
read back from the storage (a range scan of the bucket's ids) when compared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from balancer import wire
from balancer.errors import BalancerError, RingError
from balancer.kv.placement import CachedPlacement, ReplicaSets
from balancer.kv.shared import Pacer, Shared
from balancer.kv.transfer import Transfer, b64
from balancer.types import NodeInfo, Payload, Record, Version

if TYPE_CHECKING:
    from balancer.kv.maintenance import Maintenance

__all__ = ["BUCKET_BITS", "AntiEntropy", "Digests", "fingerprint_of"]

BUCKET_BITS = 6
"""Anti-entropy compares 2**6 = 64 digests per pair of replicas, one per slice of the key-id space."""


def fingerprint_of(key: bytes, version: Version) -> int:
    data = key + version.timestamp.to_bytes(16, "big") + version.node.to_bytes(32, "big")
    return int.from_bytes(blake2b(data, digest_size=8).digest())


def _digest(count: int, fingerprints: int) -> list[Any]:
    """A bucket's digest as the wire carries it: its record count and the XOR of their fingerprints."""
    return [count, f"{fingerprints:016x}"]


@dataclass
class Digests:
    """One peer's digests: per bucket, the records shared with it and the XOR of their fingerprints."""

    counts: list[int] = field(default_factory=lambda: [0] * (1 << BUCKET_BITS))
    fingerprints: list[int] = field(default_factory=lambda: [0] * (1 << BUCKET_BITS))

    def wire(self) -> dict[str, list[Any]]:
        """The non-empty buckets' digests, as ``kv.digests`` sends them."""
        return {str(b): _digest(n, self.fingerprints[b]) for b, n in enumerate(self.counts) if n}

    def differ(self, theirs: dict[int, list[Any]]) -> list[int]:
        """The buckets whose digests differ from ``theirs`` (a bucket missing on one side is empty)."""
        buckets = {b for b, n in enumerate(self.counts) if n} | set(theirs)
        return sorted(b for b in buckets if theirs.get(b, _digest(0, 0)) != self.digest(b))

    def digest(self, bucket: int) -> list[Any]:
        """One bucket's digest."""
        return _digest(self.counts[bucket], self.fingerprints[bucket])


class AntiEntropy:
    """Syncs this node's records with one peer's at a time, and answers peers that sync with it, using
    the digests of the last maintenance pass (see :meth:`remember`)."""

    def __init__(self, shared: Shared, replica_sets: ReplicaSets, transfer: Transfer) -> None:
        self.shared = shared
        self.replica_sets = replica_sets
        self.transfer = transfer
        self._digests: dict[str, Digests] = {}  # per peer, from the last maintenance pass
        self._placement: CachedPlacement | None = None  # the last pass's, which those digests were made with
        self._placed_epoch: int | None = None  # the ring epoch the last pass's digests were made at

    def remember(self, digests: dict[str, Digests], placement: CachedPlacement, epoch: int) -> None:
        """Keep a pass's ``digests`` (per peer), made with ``placement`` at ring ``epoch``, to answer
        peers' ``kv.digests`` and ``kv.compare`` with until the next pass."""
        self._digests, self._placement, self._placed_epoch = digests, placement, epoch

    async def _shared_in(
        self, address: str, bucket: int, placement: CachedPlacement, pacer: Pacer
    ) -> AsyncIterator[Record]:
        """The records of ``bucket`` that ``address`` replicates too, as ``placement`` places them: read
        from the storage (the ids of one bucket are one range), never kept between passes."""
        space = self.shared.ring.space
        shift = space.bits - BUCKET_BITS
        start, end = ((bucket << shift) - 1) % space.size, ((bucket + 1) << shift) - 1
        async for batch in self.shared.storage.scan(start, end, batch=self.shared.config.handoff_batch):
            for record in batch:
                await pacer.pause()
                try:
                    replicas, _ = await self.replica_sets.replica_set(record.key, placement)
                except RingError:
                    continue
                if any(node.address == address for node in replicas):
                    yield record

    async def sync_with(
        self, node: NodeInfo, digest: Digests, placement: CachedPlacement, report: Maintenance, pacer: Pacer
    ) -> bool:
        """Compare digests with ``node`` and exchange the records of the buckets that differ; whether
        that completed with a peer whose digests were made at its current view of the ring."""
        try:
            raw = await self.shared.call(
                node.address,
                "kv.digests",
                {"node": self.shared.ring.info.to_wire(), "digests": digest.wire()},
                self.shared.config.rpc_timeout,
            )
            answer_digests = wire.decode(wire.DigestsAnswer, raw, self.shared.limits)
            for bucket in answer_digests.differ:
                entries = [
                    [b64(r.key), *r.version.to_wire()]
                    async for r in self._shared_in(node.address, bucket, placement, pacer)
                ]
                # the peer reads the bucket back from its storage: give it time for what it holds too
                work = max(len(entries), digest.counts[bucket])
                raw = await self.shared.call(
                    node.address,
                    "kv.compare",
                    {"node": self.shared.ring.info.to_wire(), "bucket": bucket, "entries": entries},
                    self.transfer.timeout_for(work),
                )
                answer = wire.decode(wire.CompareAnswer, raw, self.shared.limits)
                theirs = self.transfer.within_skew([r.record() for r in answer.records], node.address)
                step = self.shared.config.handoff_batch
                for i in range(0, len(theirs), step):
                    report.pulled += (await self.transfer.store(theirs[i : i + step]))[0]
                    await pacer.pause()
                mine: list[Record] = []
                for key in answer.want:
                    record = await self.shared.storage.get(key)
                    if record is not None:
                        mine.append(record)
                    await pacer.pause()
                if mine:
                    await self.transfer.write_at(node, mine)
                    report.pushed += len(mine)
            self.shared.warnings.answered("anti-entropy", node.address)
            return answer_digests.current
        except BalancerError as exc:
            report.unreachable.add(node.address)
            self.shared.warnings.failed("anti-entropy", node.address, exc, self.shared.ring.info)
            return False

    async def rpc_digests(self, message: wire.Digests) -> Payload:
        """A peer's ``kv.digests``: the buckets whose digests differ from this node's last pass's for
        it, and whether that pass saw the ring as this node sees it now."""
        if self._placement is None:  # no pass yet: nothing to compare with, every bucket would differ
            return {"differ": [], "current": False}
        theirs = {int(b): list(digest) for b, digest in message.digests.items()}
        mine = self._digests.get(message.node.address) or Digests()
        return {"differ": mine.differ(theirs), "current": self._placed_epoch == self.shared.ring.epoch}

    async def rpc_compare(self, message: wire.Compare) -> Payload:
        """A peer's ``kv.compare`` of one bucket: the keys it listed that this node lacks or holds older
        versions of, and the records it lacks or holds older versions of."""
        peer, bucket = message.node.value(), message.bucket
        pacer = Pacer(self.shared.slice)
        want: list[str] = []
        newer: list[Payload] = []
        listed: set[bytes] = set()
        for key, timestamp, writer in message.entries:
            await pacer.pause()
            version = Version(timestamp, writer)
            listed.add(key)
            record = await self.shared.storage.get(key)
            if record is None or record.version < version:
                want.append(b64(key))
            elif record.version > version:
                newer.append(record.to_wire())
        # records this node thinks the peer should hold in this bucket (as its last pass placed them)
        # but the peer did not list
        if self._placement is not None:
            async for record in self._shared_in(peer.address, bucket, self._placement, pacer):
                if record.key not in listed:
                    newer.append(record.to_wire())
        return {"want": want, "records": newer}
