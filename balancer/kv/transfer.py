"""Records to and from one node: reads and writes at a peer, and writes applied to this node's storage.

Reads of one key and writes of one record to the same peer share one ``kv.read_many`` or ``kv.store``
message per turn of the event loop (a :class:`~balancer.batching.Batcher` per peer); longer lists go in
chunks no larger than one largest value, with a timeout that grows with their length. Both ends of
those two RPCs are here: what this node answers a peer's ``kv.read_many`` and ``kv.store``, too.
"""

from __future__ import annotations

import asyncio
import base64
import functools

from balancer import wire
from balancer.batching import Batcher
from balancer.errors import ClockSkewError, RingError
from balancer.kv.shared import Shared, log
from balancer.types import NodeInfo, Payload, Record, Version

__all__ = ["Stored", "Transfer", "b64"]

Stored = tuple[bool, Version | None]
"""A store's result for one record: kept, or the greater version that beat it."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _key_batches(keys: list[bytes]) -> list[list[bytes]]:
    """Reads of one turn cut into messages a peer accepts (at most ``wire.MAX_BATCH`` keys each)."""
    return [keys[i : i + wire.MAX_BATCH] for i in range(0, len(keys), wire.MAX_BATCH)]


def _summary(results: list[Stored]) -> tuple[int, Version | None]:
    """How many records were kept, and the greatest version that beat one of the others."""
    newer = [v for _, v in results if v is not None]
    return sum(kept for kept, _ in results), max(newer, default=None)


class Transfer:
    """Reads and writes of records at one node, this one or a peer, batched per peer."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.leaving = False
        """Set when the node starts leaving: it stores no more writes, so none can miss the hand-off."""
        self._storing = 0  # kv.store requests being applied right now
        self._stored = asyncio.Event()  # set whenever _storing drops to zero
        self.readers: dict[str, Batcher[bytes, tuple[Record | None, bool]]] = {}
        """Per peer, the batcher that sends its reads of single keys."""
        self.writers: dict[str, Batcher[Record, Stored]] = {}
        """Per peer, the batcher that sends its writes of single records."""

    def forget_peer(self, address: str) -> None:
        """Drop what is kept per peer for ``address`` (it failed or left); work in flight finishes."""
        self.readers.pop(address, None)
        self.writers.pop(address, None)

    # -- reads ------------------------------------------------------------------------------------

    def adoptable(self, record: Record | None) -> Record | None:
        """``record``, or ``None`` if it is stamped beyond the read horizon (twice the allowed clock
        skew: :meth:`~balancer.kv.clock.HybridClock.horizon`): such a record (stored before the checks
        existed, or forged) is never returned nor repaired with. One within the horizon is returned but
        moves this node's clock no further than the skew allows."""
        if record is None or record.version.timestamp <= self.shared.clock.horizon():
            return record
        log.warning(
            "%s: ignoring a record of %r stamped beyond twice the clock skew",
            self.shared.ring.info,
            record.key,
        )
        return None

    async def read_at(self, node: NodeInfo, key: bytes) -> tuple[Record | None, bool]:
        """``node``'s record of ``key``, and whether ``node`` is :attr:`~Shared.settled`."""
        if node.address == self.shared.ring.address:
            return self.adoptable(await self.shared.storage.get(key)), self.shared.settled
        batcher = self.readers.get(node.address)
        if batcher is None:
            send = functools.partial(self.read_many, node.address)
            batcher = self.readers[node.address] = Batcher(send, _key_batches)
        found, settled = await batcher.submit(key)
        record = self.adoptable(found)
        if record is not None and record.version.timestamp <= self.shared.clock.limit():
            # one between the limit and the horizon is read, but never pins this clock at its limit
            self.shared.clock.observe(record.version.timestamp)
        return record, settled

    async def read_many(self, address: str, keys: list[bytes]) -> list[tuple[Record | None, bool]]:
        raw = await self.shared.call(
            address, "kv.read_many", {"keys": [b64(k) for k in keys]}, self.timeout_for(len(keys))
        )
        answer = wire.decode(wire.ReadManyAnswer, raw, self.shared.limits)
        return [(None if r is None else r.record(), answer.settled) for r in answer.records]

    async def rpc_read_many(self, message: wire.ReadMany) -> Payload:
        """A peer's ``kv.read_many``: this node's record of each key, and whether it is settled."""
        found = [await self.shared.storage.get(key) for key in message.keys]
        return {"records": [r.to_wire() if r else None for r in found], "settled": self.shared.settled}

    # -- writes -----------------------------------------------------------------------------------

    def start_write(
        self, node: NodeInfo, records: list[Record]
    ) -> asyncio.Future[Stored] | asyncio.Future[tuple[int, Version | None]]:
        """Begin storing ``records`` at ``node``: a future of one record's :data:`Stored` (a single
        record to a peer, which joins that peer's message of this turn without a task of its own), or
        of :meth:`write_at`'s summary."""
        if len(records) == 1 and node.address != self.shared.ring.address:
            return self._writer(node.address).submit(records[0])
        return asyncio.ensure_future(self.write_at(node, records))

    def _writer(self, address: str) -> Batcher[Record, Stored]:
        """The batcher that sends single-record writes to ``address``, one message per turn."""
        writer = self.writers.get(address)
        if writer is None:
            send = functools.partial(self.store_many, address)
            writer = self.writers[address] = Batcher(send, self.chunks)
        return writer

    async def write_at(self, node: NodeInfo, records: list[Record]) -> tuple[int, Version | None]:
        """Store ``records`` at ``node``: how many it kept, and the greatest version it refused one for."""
        if node.address == self.shared.ring.address:
            return _summary(await self.store_here(records))
        if len(records) == 1:  # a client write or a repair: share the message with others of this turn
            return _summary([await self._writer(node.address).submit(records[0])])
        results: list[Stored] = []
        for chunk in self.chunks(records):
            results += await self.store_many(node.address, chunk)
        return _summary(results)

    async def store_many(self, address: str, records: list[Record]) -> list[Stored]:
        raw = await self.shared.call(
            address, "kv.store", {"records": [r.to_wire() for r in records]}, self.timeout_for(len(records))
        )
        answer = wire.decode(wire.StoreAnswer, raw, self.shared.limits)
        return [(kept, None if v is None else v.value()) for kept, v in answer.each]

    async def rpc_store(self, message: wire.Store) -> Payload:
        """A peer's ``kv.store``: keep each record unless a greater version is stored; a request with a
        record stamped beyond the allowed clock skew is refused whole."""
        records = [r.record() for r in message.records]
        limit = self.shared.clock.limit()  # the same bound as everywhere records are taken in
        for record in records:  # checked before any is stored: a refused request changes nothing
            if record.version.timestamp > limit:
                ahead = self.shared.clock.ahead(record.version.timestamp)
                raise ClockSkewError(
                    f"a record is stamped {ahead:.0f} s ahead of this node's clock "
                    f"(the limit is {self.shared.config.max_clock_skew:g} s)"
                )
        results = await self.store_here(records)
        return {"each": [[kept, v.to_wire() if v else None] for kept, v in results]}

    def timeout_for(self, items: int) -> float:
        return self.shared.config.rpc_timeout * max(1, items // 64)

    def chunks(self, records: list[Record]) -> list[list[Record]]:
        """Split ``records`` so that no message carries more than one largest value's worth of bytes."""
        config = self.shared.config
        budget = config.max_value_bytes + config.max_key_bytes
        chunks: list[list[Record]] = [[]]
        used = 0
        for record in records:
            size = len(record.key) + len(record.value or b"")
            if chunks[-1] and (used + size > budget or len(chunks[-1]) >= config.handoff_batch):
                chunks.append([])
                used = 0
            chunks[-1].append(record)
            used += size
        return chunks

    # -- this node's storage ----------------------------------------------------------------------

    async def store_here(self, records: list[Record]) -> list[Stored]:
        """Apply a write here, counted while it runs; refused once the node is leaving (see
        :meth:`quiesce`). A plain try/finally, not a context manager: every write passes here."""
        if self.leaving:
            raise RingError(f"{self.shared.ring.info.address} is leaving the ring and takes no more writes")
        self._storing += 1
        self._stored.clear()
        try:
            return await self._store_each(records)
        finally:
            self._storing -= 1
            if not self._storing:
                self._stored.set()

    async def quiesce(self) -> None:
        """Stop taking writes and wait for those being applied to finish: after this, a scan of the
        storage sees every write this node ever acknowledged (leaving hands off exactly those)."""
        self.leaving = True
        while self._storing:
            await self._stored.wait()

    def within_skew(self, records: list[Record], source: str) -> list[Record]:
        """``records`` without those stamped beyond the allowed clock skew (logged, never stored)."""
        limit = self.shared.clock.limit()
        kept = [r for r in records if r.version.timestamp <= limit]
        if len(kept) < len(records):
            log.warning(
                "%s: %d records from %s are stamped beyond the allowed clock skew; not stored",
                self.shared.ring.info,
                len(records) - len(kept),
                source,
            )
        return kept

    async def store(self, records: list[Record]) -> tuple[int, Version | None]:
        """Keep ``records`` here: how many were kept, and the greatest stored version that beat one."""
        return _summary(await self._store_each(records))

    async def _store_each(self, records: list[Record]) -> list[Stored]:
        """Keep each record unless a greater version is stored: (kept, the greater version if refused)."""
        results: list[Stored] = []
        for record in records:
            self.shared.clock.observe(record.version.timestamp)
            if await self.shared.storage.put(record):
                results.append((True, None))
                continue
            current = await self.shared.storage.get(record.key)
            # the same version with other contents is a conflict, never a copy: the writer stamps past it
            beaten = current is not None and (
                current.version > record.version
                or (current.version == record.version and current.value != record.value)
            )
            results.append((False, current.version if beaten and current else None))
        return results
