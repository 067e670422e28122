"""The key-value service: get, put and delete routed to the key's replicas, and hand-off of key ranges.

A key's replicas are the owners of the ring positions the replication strategy names (the successor of
the key's id, for the default strategy), completed from the successor list up to N distinct nodes. A
write is stamped here, at the coordinating node, with a hybrid logical clock version, and every replica
keeps the greater version (last writer wins), so replicas converge whatever order writes arrive in.

When membership changes, records move to the node now responsible for them: a node that gains a
predecessor pushes it the records it no longer owns, a node that leaves pushes everything to its
successor, and a periodic pass sends any misplaced record to its owner. A record is dropped locally only
after its new holder confirmed it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Any

from balancer.chord import Call, Chord
from balancer.config import Config
from balancer.errors import (
    BadRequestError,
    BalancerError,
    KeyNotFoundError,
    PeerUnreachableError,
    RingError,
    TooLargeError,
)
from balancer.hookspecs import Handler, Payload, ReplicationStrategy, Storage
from balancer.types import NodeInfo, Record, Version

__all__ = ["HybridClock", "KVService"]

log = logging.getLogger(__name__)


class HybridClock:
    """A hybrid logical clock: wall-clock milliseconds in the high bits, a counter in the low 16.

    ``now()`` never goes backwards and never repeats, even if the wall clock does; ``observe()`` moves it
    past a timestamp seen from another node, so causally later writes always get greater versions.
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._last = 0

    def now(self) -> int:
        """A fresh timestamp, greater than every one issued or observed before."""
        self._last = max(self._last + 1, int(self._wall() * 1000) << 16)
        return self._last

    def observe(self, timestamp: int) -> None:
        """Account for a timestamp seen on a record from elsewhere."""
        self._last = max(self._last, timestamp)


def _record(value: Any) -> Record:
    try:
        return Record.from_wire(value)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


class KVService:
    """Key-value operations for one node, on top of its :class:`Chord` state and its storage.

    ``emit(event, **kwargs)`` reports ring events (``range_moved``) to the plugins.
    """

    def __init__(
        self,
        chord: Chord,
        storage: Storage,
        strategy: ReplicationStrategy,
        call: Call,
        config: Config,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self.chord = chord
        self.storage = storage
        self.strategy = strategy
        self.config = config
        self.clock = HybridClock()
        self._call = call
        self._emit = emit or (lambda event, **kwargs: None)
        self._moving = asyncio.Lock()

    # -- keys and values --------------------------------------------------------------------------

    def encode_key(self, key: str | bytes) -> bytes:
        """The key's bytes: :class:`TooLargeError` over the limit, :class:`BadRequestError` if empty."""
        data = key.encode() if isinstance(key, str) else bytes(key)
        if not data:
            raise BadRequestError("the key is empty")
        if len(data) > self.config.max_key_bytes:
            raise TooLargeError(f"key is {len(data)} bytes; the limit is {self.config.max_key_bytes}")
        return data

    def check_value(self, value: bytes) -> None:
        """Raise :class:`TooLargeError` if ``value`` is over the size limit."""
        if len(value) > self.config.max_value_bytes:
            raise TooLargeError(f"value is {len(value)} bytes; the limit is {self.config.max_value_bytes}")

    async def get(self, key: str | bytes) -> bytes:
        """The live value of ``key``; raises :class:`KeyNotFoundError` for a missing or deleted key."""
        data = self.encode_key(key)
        record = await self.read(data)
        if record is None or record.value is None:
            raise KeyNotFoundError(data.decode(errors="replace"))
        return record.value

    async def put(self, key: str | bytes, value: bytes) -> Version:
        """Store ``value`` under ``key``; returns the version written."""
        data = self.encode_key(key)
        self.check_value(value)
        return await self.write(data, value)

    async def delete(self, key: str | bytes) -> Version:
        """Delete ``key`` (a tombstone); raises :class:`KeyNotFoundError` if it has no live value."""
        data = self.encode_key(key)
        current = await self.read(data)
        if current is None or current.value is None:
            raise KeyNotFoundError(data.decode(errors="replace"))
        return await self.write(data, None)

    # -- replica sets -----------------------------------------------------------------------------

    async def replicas(self, key: bytes) -> list[NodeInfo]:
        """The nodes that should hold ``key``, most preferred first, followed by fallbacks.

        The first ``config.replicas`` entries are the replica set; the rest are the next successors,
        to be used when a replica does not answer.
        """
        nodes: list[NodeInfo] = []
        successors: list[NodeInfo] = []
        for position in self.strategy.positions(key, self.config.replicas, self.chord.space):
            found = await self.chord.find_successor(position)
            successors = list(found.successors) or [found.owner]
            owner = next((n for n in successors if n not in nodes), None)
            if owner is not None:
                nodes.append(owner)
        return list(dict.fromkeys(nodes + successors))

    async def read(self, key: bytes) -> Record | None:
        """The newest record any reachable replica has for ``key`` (tombstones included), or ``None``."""
        answered = 0
        best: Record | None = None
        for node in await self.replicas(key):
            if answered >= self.config.replicas:
                break
            try:
                record = await self._read_at(node, key)
            except PeerUnreachableError:
                self.chord.forget(node)
                continue
            answered += 1
            if record is not None and (best is None or record.version > best.version):
                best = record
        if not answered:
            raise RingError("no replica of the key answered")
        return best

    async def write(self, key: bytes, value: bytes | None) -> Version:
        """Write ``value`` (``None`` for a tombstone) under a fresh version to the key's replicas."""
        record = Record(key, value, Version(self.clock.now(), self.chord.info.id))
        acked = 0
        for node in await self.replicas(key):
            if acked >= self.config.replicas:
                break
            try:
                await self._write_at(node, [record])
            except PeerUnreachableError:
                self.chord.forget(node)
                continue
            acked += 1
        if not acked:
            raise RingError("no replica of the key accepted the write")
        return record.version

    async def _read_at(self, node: NodeInfo, key: bytes) -> Record | None:
        if node == self.chord.info:
            return await self.storage.get(key)
        answer = await self._call(
            node.address, "kv.read", {"key": base64.b64encode(key).decode()}, self.config.rpc_timeout
        )
        raw = answer.get("record")
        if raw is None:
            return None
        record = _record(raw)
        self.clock.observe(record.version.timestamp)
        return record

    async def _write_at(self, node: NodeInfo, records: list[Record]) -> int:
        if node == self.chord.info:
            return await self._store(records)
        stored = 0
        for chunk in self._chunks(records):
            answer = await self._call(
                node.address,
                "kv.store",
                {"records": [r.to_wire() for r in chunk]},
                self.config.rpc_timeout * max(1, len(chunk) // 64),
            )
            stored += int(answer.get("stored", 0))
        return stored

    def _chunks(self, records: list[Record]) -> list[list[Record]]:
        """Split ``records`` so that no message carries more than one largest value's worth of bytes."""
        budget = self.config.max_value_bytes + self.config.max_key_bytes
        chunks: list[list[Record]] = [[]]
        used = 0
        for record in records:
            size = len(record.key) + len(record.value or b"")
            if chunks[-1] and used + size > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(record)
            used += size
        return chunks

    async def _store(self, records: list[Record]) -> int:
        stored = 0
        for record in records:
            self.clock.observe(record.version.timestamp)
            stored += await self.storage.put(record)
        return stored

    # -- moving ranges ----------------------------------------------------------------------------

    async def hand_off(self, target: NodeInfo, start: int | None, end: int | None) -> int:
        """Push the records with ids in ``(start, end]`` (all if ``None``) to ``target``; drop them here
        once ``target`` confirmed. Returns how many moved.
        """
        if target == self.chord.info:
            return 0
        moved = 0
        async with self._moving:
            async for batch in self.storage.scan(start, end, self.config.handoff_batch):
                await self._write_at(target, batch)  # raises before anything is dropped
                moved += await self.storage.remove(batch)
        if moved:
            log.info("%s: handed %d records to %s", self.chord.info, moved, target)
            self._emit("range_moved", node=self.chord.info, target=target, records=moved)
        return moved

    async def rebalance(self) -> int:
        """Send every record this node does not own to the node that does; returns how many moved."""
        pred = self.chord.predecessor
        if pred is None or self.chord.left:
            return 0
        moved = 0
        misplaced: list[Record] = []
        async for batch in self.storage.scan(self.chord.info.id, pred.id, self.config.handoff_batch):
            misplaced.extend(batch)
        by_owner: dict[NodeInfo, list[Record]] = {}
        for record in misplaced:
            try:
                owner = (await self.chord.find_successor(self.chord.space.id(record.key))).owner
            except RingError:
                continue
            if owner == self.chord.info:
                # Routes elsewhere still lead here (the ring is stabilizing): the record lies before our
                # predecessor, so give it to the predecessor, which passes it on if it is not its own.
                owner = pred
            by_owner.setdefault(owner, []).append(record)
        async with self._moving:
            for owner, records in by_owner.items():
                if owner == self.chord.info:
                    continue
                sent = 0
                for i in range(0, len(records), self.config.handoff_batch):
                    batch = records[i : i + self.config.handoff_batch]
                    try:
                        await self._write_at(owner, batch)
                    except BalancerError as exc:
                        log.info("%s: hand-off to %s failed: %s", self.chord.info, owner, exc)
                        break
                    sent += await self.storage.remove(batch)
                if sent:
                    self._emit("range_moved", node=self.chord.info, target=owner, records=sent)
                moved += sent
        return moved

    # -- RPC handlers -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this service adds to the node, by name."""
        return {"kv.read": self._rpc_read, "kv.store": self._rpc_store}

    async def _rpc_read(self, payload: Payload) -> Payload:
        try:
            key = base64.b64decode(payload["key"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequestError("'key' must be base64 text") from exc
        record = await self.storage.get(key)
        return {"record": record.to_wire() if record else None}

    async def _rpc_store(self, payload: Payload) -> Payload:
        raw = payload.get("records")
        if not isinstance(raw, list):
            raise BadRequestError("'records' must be a list")
        records = [_record(r) for r in raw]
        for record in records:
            if len(record.key) > self.config.max_key_bytes or (
                record.value is not None and len(record.value) > self.config.max_value_bytes
            ):
                raise TooLargeError("a record is over the size limits")
        return {"stored": await self._store(records)}
