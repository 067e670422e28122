"""The key-value service: quorum reads and writes on a key's replicas, repair, hand-off, anti-entropy.

**Replicas.** A key's replica set is N distinct nodes: the owners of the ring positions the replication
strategy names (the successor of the key's id for ``successor``; of ``hash(key, i)`` for ``multi-ring``),
completed from the successor list. Nodes after those are fallbacks: a write sends a copy to one for each
replica that does not answer (it never counts towards W), and a read asks them while the ring changes.

**Versions.** A write is stamped here, at the coordinating node, with a hybrid logical clock timestamp and
this node's id. Every store keeps the greatest version (last writer wins), so replicas converge whatever
order writes arrive in; a delete writes a tombstone, collected after ``tombstone_grace`` once every
replica of its key confirmed it.

**Quorums.** A write returns once W of the key's replicas stored it, and fails with :class:`QuorumError`
(saying how many answered) otherwise; the replicas still in flight finish in the background. A read asks
R replicas and returns the newest version; replicas that answered with an older one are repaired at once.
A node is *settled* once a maintenance pass synced it with its peers since the ring last changed around
it; a read that meets an unsettled node (it joined, restarted, or its neighbours changed) also asks the
key's other replicas and fallbacks, where the key was before the change, and takes the newest answer.

**Maintenance.** Periodically, and soon after any membership change, each node computes the replica set
of every record it holds. Records it no longer replicates are pushed to their replicas and dropped only
after every one of them confirmed. For each peer it shares records with, it compares per-bucket digests
of those records (64 buckets by key id) and exchanges only the records of buckets that differ.

A pass keeps per peer only one count and one digest per bucket, never a copy of the keys: the records of
a bucket that differs are read back from the storage (a range scan of the bucket's ids) when compared.
Every loop of a pass yields to the event loop after :data:`SLICE_SECONDS` of work, so a pass over
millions of records never holds up requests for longer than that.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

from balancer import wire
from balancer.batching import Batcher
from balancer.chord import Call, distinct
from balancer.config import Config
from balancer.errors import (
    BadRequestError,
    BalancerError,
    ClockSkewError,
    KeyNotFoundError,
    PeerUnreachableError,
    QuorumError,
    RingError,
    TooLargeError,
)
from balancer.hookspecs import Placement, ReplicationStrategy, Storage
from balancer.keyspace import in_interval
from balancer.kv.clock import HybridClock
from balancer.ring import Ring
from balancer.types import Handler, Member, NodeInfo, Payload, Record, Version

__all__ = ["BUCKET_BITS", "SLICE_SECONDS", "HybridClock", "KVService", "Maintenance"]

log = logging.getLogger("balancer.kv")  # the name it had as one module

BUCKET_BITS = 6
"""Anti-entropy compares 2**6 = 64 digests per pair of replicas, one per slice of the key-id space."""

SLICE_SECONDS = 0.005
"""Longest a maintenance loop works before it lets the event loop run other tasks (seconds)."""

Stored = tuple[bool, Version | None]
"""A store's result for one record: kept, or the greater version that beat it."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _abandon(future: asyncio.Future[Any]) -> None:
    """Cancel ``future``, which nobody will await, and retrieve its outcome so none goes unreported."""
    future.cancel()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


def _key_batches(keys: list[bytes]) -> list[list[bytes]]:
    """Reads of one turn cut into messages a peer accepts (at most ``wire.MAX_BATCH`` keys each)."""
    return [keys[i : i + wire.MAX_BATCH] for i in range(0, len(keys), wire.MAX_BATCH)]


def _summary(results: list[Stored]) -> tuple[int, Version | None]:
    """How many records were kept, and the greatest version that beat one of the others."""
    newer = [v for _, v in results if v is not None]
    return sum(kept for kept, _ in results), max(newer, default=None)


def _fingerprint(key: bytes, version: Version) -> int:
    data = key + version.timestamp.to_bytes(16, "big") + version.node.to_bytes(32, "big")
    return int.from_bytes(blake2b(data, digest_size=8).digest())


def _digest(count: int, fingerprints: int) -> list[Any]:
    """A bucket's digest as the wire carries it: its record count and the XOR of their fingerprints."""
    return [count, f"{fingerprints:016x}"]


class _Pacer:
    """Lets a long loop give the event loop a turn once it has worked ``budget`` seconds without one."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._since = time.perf_counter()

    async def pause(self) -> None:
        """Yield to the event loop if this slice of work is over its budget; else return at once."""
        if time.perf_counter() - self._since >= self.budget:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


@dataclass
class _Digests:
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


SET_TTL = 1.0
"""Seconds a client key's replica set is reused while the ring shows no change (see ``replica_set``)."""
SET_CACHE = 1 << 14
"""Client keys whose replica sets are remembered at most; the memory is dropped whole when full."""
MAX_CANDIDATES = 64
"""Most processes a strategy's placement may name (replicas and stand-ins together)."""


class _Placement(Placement):
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


class KVService:
    """Key-value operations for one process, on top of its :class:`~balancer.ring.Ring` (the vnodes'
    routing) and its storage. Replica sets are N distinct processes: a process counts once however many
    of its vnodes a key's walk passes.

    ``emit(event, **kwargs)`` reports ring events (``range_moved``) to the plugins.
    """

    def __init__(
        self,
        ring: Ring,
        storage: Storage,
        strategy: ReplicationStrategy,
        call: Call,
        config: Config,
        emit: Callable[..., None] | None = None,
        *,
        members: Callable[[], tuple[Member, ...]] | None = None,
        trusted: Callable[[], bool] | None = None,
    ) -> None:
        self.ring = ring
        self.storage = storage
        self.strategy = strategy
        self.config = config
        offset = config.clock_offset
        self.wall: Callable[[], float] = (lambda: time.time() + offset) if offset else time.time
        """This node's wall clock (seconds since the epoch)."""
        self.clock = HybridClock(self.wall, max_skew=config.max_clock_skew)
        self.leaving = False
        """Set when the node starts leaving: it stores no more writes, so none can miss the hand-off."""
        self._storing = 0  # kv.store requests being applied right now
        self._stored = asyncio.Event()  # set whenever _storing drops to zero
        self._limits = wire.Limits(ring.space.bits, config.max_key_bytes, config.max_value_bytes)
        self._call = call
        self._emit = emit or (lambda event, **kwargs: None)
        self._background: set[asyncio.Future[Any]] = set()
        self._digests: dict[str, _Digests] = {}  # per peer, from the last maintenance pass
        self._placement: _Placement | None = None  # the last pass's, which those digests were made with
        self.slice = SLICE_SECONDS
        """Longest a maintenance loop works before it yields to the event loop (seconds)."""
        self._readers: dict[str, Batcher[bytes, tuple[Record | None, bool]]] = {}
        self._synced_epoch: int | None = None  # the ring epoch of the last complete maintenance pass
        self._placed_epoch: int | None = None  # the ring epoch the last pass's digests were made at
        self._unsettled = 0  # calls of unsettle(): a pass under way during one does not settle the node
        self._trusted = trusted or (lambda: True)  # the node's: not while cut off, or merging rings
        self._members = members or self._pointed  # the ring's processes, for strategies and syncing
        # replica sets of recent client keys: (ring epoch, good until, replicas, fallbacks)
        self._sets: dict[bytes, tuple[float, list[NodeInfo], list[NodeInfo]]] = {}
        self._sets_epoch = 0
        self._writers: dict[str, Batcher[Record, Stored]] = {}
        self._maintaining = asyncio.Lock()

    def _pointed(self) -> tuple[Member, ...]:
        """The members a ring without a node knows: itself and the processes its vnodes point to."""
        me = Member(self.ring.address, tuple(sorted(v.info.id for v in self.ring.vnodes)))
        return tuple(sorted([me, *(Member(a) for a in self.ring.pointed())], key=lambda m: m.address))

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
        """Store ``value`` under ``key`` on W replicas at least; returns the version written."""
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

    @property
    def synced(self) -> bool:
        """Whether this node has synced with every replica it shares records with since it last saw the
        ring change (a maintenance pass that reached every peer, with no change during it)."""
        return self._synced_epoch == self.ring.epoch

    @property
    def settled(self) -> bool:
        """:attr:`synced`, and trusted by the node (not cut off from the ring's majority, nor merging
        rings). An unsettled node may lack writes acknowledged elsewhere: a node that just
        joined, restarted or came back from a partition, or one whose neighbours changed. Readers that
        meet one widen their quorum."""
        return self.synced and self._trusted()

    def unsettle(self) -> None:
        """Declare this node unsettled until a maintenance pass that starts after this completes (it
        rejoined the ring after a partition, and what it holds may lack what the rest acknowledged
        meanwhile); a pass already under way no longer counts."""
        self._synced_epoch = None
        self._unsettled += 1

    def mark_settled(self) -> None:
        """Declare this node settled at the ring's current epoch: for a node that creates a ring, which
        no other node can hold writes for."""
        self._synced_epoch = self.ring.epoch

    async def replica_set(
        self, key: bytes, placement: _Placement | None = None
    ) -> tuple[list[NodeInfo], list[NodeInfo]]:
        """The key's replicas (N distinct nodes, fewer only on a smaller ring) and its fallbacks.

        Without ``placement`` (a client's read or write), the answer is remembered while the ring stays
        as this process saw it (:attr:`Ring.epoch`) and for at most :data:`SET_TTL` seconds, the time
        within which a change no event announces (a successor list shortened by stabilization) shows.
        """
        if placement is None:
            now, epoch = time.monotonic(), self.ring.epoch
            if self._sets_epoch != epoch:  # the ring changed: nothing remembered holds
                self._sets.clear()
                self._sets_epoch = epoch
            cached = self._sets.get(key)
            if cached is not None and cached[0] > now:
                return cached[1], cached[2]
            replicas, fallbacks = await self._replica_set(key, _Placement(self.ring, self._members))
            if self.ring.epoch == epoch:  # a change during the lookup: its answer is not kept
                if len(self._sets) >= SET_CACHE:
                    self._sets.clear()
                self._sets[key] = (now + SET_TTL, replicas, fallbacks)
            return replicas, fallbacks
        return await self._replica_set(key, placement)

    async def _replica_set(self, key: bytes, placement: _Placement) -> tuple[list[NodeInfo], list[NodeInfo]]:
        candidates = distinct(await self.strategy.place(key, self.config.replicas, placement), MAX_CANDIDATES)
        return candidates[: self.config.replicas], candidates[self.config.replicas :]

    async def read(self, key: bytes) -> Record | None:
        """The newest record R replicas hold for ``key`` (tombstones included), or ``None``.

        If this node or a replica that answered is not :attr:`settled` (the ring changed around it
        lately), or every answer is a miss, the read also asks the key's other replicas and fallbacks
        (the next nodes on the ring, which held the key before the change) and takes the newest of all
        answers. Replicas that answered with an older version, or none, are repaired in the background.
        Raises :class:`QuorumError` if fewer than R replicas answer.
        """
        replicas, fallbacks = await self.replica_set(key)
        need = self.config.read_quorum  # never fewer: a node that lost sight of its peers must not answer
        me = self.ring.address
        answers: dict[NodeInfo, Record | None] = {}
        widen = not self.settled
        for node in replicas:
            if node.address == me:  # the local copy costs no message: read it first, without a task
                answers[node] = self._adoptable(await self.storage.get(key))
        # suspected replicas are asked last: a slow peer is waited for only when no other will do
        # Only replicas count towards R (as only they count towards W): a fallback on this side of a
        # partition could otherwise make a quorum that never overlapped the write's.
        queue = self.ring.prefer_healthy([n for n in replicas if n.address != me])
        retried: set[NodeInfo] = set()
        if len(answers) + 1 == need and queue:
            # the common case, one remote answer short of the quorum: await it without a task of its own
            node = queue.pop(0)
            try:
                answers[node], settled = await self._read_at(node, key)
                widen = widen or not settled
            except Exception as exc:  # as the loop below treats a failed read: the next node is asked
                if self._failed(node, exc):
                    retried.add(node)
                    queue.append(node)  # only slow: asked again, after the others, for longer
        running: dict[asyncio.Future[tuple[Record | None, bool]], NodeInfo] = {}
        try:
            while len(answers) < need and (queue or running):
                while queue and len(running) + len(answers) < need:
                    node = queue.pop(0)
                    running[asyncio.ensure_future(self._read_at(node, key))] = node
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    node = running.pop(future)
                    if future.exception() is None:
                        answers[node], settled = future.result()
                        widen = widen or not settled
                    elif self._failed(node, future.exception()) and node not in retried:
                        retried.add(node)
                        queue.append(node)  # only slow: asked again, after the others, for longer
        finally:  # on every way out, a caller's cancellation included: nothing is left unattended
            for future in running:
                _abandon(future)
        if len(answers) < need:
            raise QuorumError("read", len(answers), need)
        best = max((r for r in answers.values() if r is not None), key=lambda r: r.version, default=None)
        rest = [n for n in dict.fromkeys([*queue, *fallbacks]) if n not in answers]
        if rest and (widen or best is None):
            # While the ring changes, nodes can disagree on a key's replicas, and a replica new to the key
            # may not hold it yet: the union of the replicas and the fallbacks covers where writes went.
            found = await asyncio.gather(*(self._read_at(n, key) for n in rest), return_exceptions=True)
            for node, result in zip(rest, found, strict=True):
                if isinstance(result, BaseException):
                    self._failed(node, result)
                    continue
                answers[node] = result[0]
            best = max((r for r in answers.values() if r is not None), key=lambda r: r.version, default=None)
        if best is not None:
            stale = [
                n for n, r in answers.items() if n in replicas and (r is None or r.version < best.version)
            ]
            for node in stale:
                self._in_background(self._write_at(node, [best]))
        return best

    async def write(self, key: bytes, value: bytes | None) -> Version:
        """Write ``value`` (``None`` for a tombstone) under a fresh version to the key's replicas.

        Returns once W replicas stored it; raises :class:`QuorumError` with how many did otherwise.
        """
        replicas, fallbacks = await self.replica_set(key)
        need = self.config.write_quorum
        for _ in range(3):
            record = Record(key, value, Version(self.clock.now(), self.ring.info.id))
            acked, newer = await self._replicate([record], replicas, fallbacks, need)
            if newer is None:
                break
            # A replica holds a greater version: a write another coordinator stamped in the same instant,
            # or with a clock ahead of ours. Stamp past it and write again, so that a write issued after
            # another one was acknowledged is never ordered before it.
            self.clock.observe(newer.timestamp)
        if acked < need:
            raise QuorumError("write", acked, need)
        return record.version

    async def _replicate(
        self, records: list[Record], targets: list[NodeInfo], spare: list[NodeInfo], need: int
    ) -> tuple[int, Version | None]:
        """Send ``records`` to ``targets``, and to the next ``spare`` for each that fails; returns as
        soon as ``need`` targets acknowledged (the rest finish in the background) or every attempt is over.

        Returns how many targets acknowledged, and the greatest version a replica refused a record for.
        A spare keeps a copy (handed to the replica by maintenance later) but never counts towards
        ``need``: a quorum is of the key's replicas, so every read quorum overlaps every write quorum.
        Every attempt is counted by a callback as it ends, so a write waits on one future.
        """
        spare = list(spare)
        counted = set(targets)
        acked, pending = 0, 0
        newest_version: Version | None = None
        retried: set[NodeInfo] = set()
        quorum: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ended(node: NodeInfo, future: asyncio.Future[Any]) -> None:
            nonlocal acked, newest_version, pending
            pending -= 1
            exc = asyncio.CancelledError() if future.cancelled() else future.exception()
            if exc is None:
                # one record's (kept, newer) or a summary's (count kept, newer): newer is what counts
                _, newer = future.result()
                if node in counted:  # a spare holds a copy, but a quorum counts replicas only
                    if newer is not None and newer.timestamp > self.clock.limit():
                        # it holds a version stamped beyond the skew, which would beat every write: not
                        # an acknowledgement, and never a reason to stamp past it
                        log.warning("%s: %s holds a record stamped beyond the skew", self.ring.info, node)
                    else:
                        acked += 1
                        if newer is not None and (newest_version is None or newer > newest_version):
                            newest_version = newer
            else:  # accounted even after the quorum: a peer found down is forgotten at once
                slow = self._failed(node, exc)
                if slow and node not in retried and not quorum.done():
                    # only slow: asked again, for longer (its timeout backed off), beside a spare
                    retried.add(node)
                    start(node)
                if spare:  # even after the quorum: N copies, the spare's handed back by maintenance
                    start(spare.pop(0))
            if not quorum.done() and (acked >= need or pending == 0):
                quorum.set_result(None)

        started: list[asyncio.Future[Any]] = []
        returned = False

        def start(node: NodeInfo) -> None:
            nonlocal pending
            pending += 1
            future = self._start_write(node, records)
            future.add_done_callback(functools.partial(ended, node))
            if returned:  # a spare for a failure after the caller gave up: kept and waited for by drain
                self._in_background(future)
            else:
                started.append(future)

        for node in targets:
            start(node)
        try:
            if pending:
                await asyncio.shield(quorum)
        finally:  # what still runs once the quorum is in (or the caller gave up) goes on in the background
            returned = True
            for future in started:
                if not future.done():
                    self._in_background(future)
        return acked, newest_version

    def _in_background(self, work: Any) -> None:
        future = asyncio.ensure_future(work)
        self._background.add(future)

        def finished(done: asyncio.Future[Any]) -> None:
            self._background.discard(done)
            if not done.cancelled() and done.exception() is not None:
                log.debug("%s: background replication failed: %s", self.ring.info, done.exception())

        future.add_done_callback(finished)

    async def drain(self) -> None:
        """Wait for the replication still running in the background (used before leaving)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _failed(self, node: NodeInfo, exc: BaseException | None) -> bool:
        """Account for a replica call to ``node`` that failed with ``exc``; returns whether the node is
        only suspected (it timed out but is not declared failed), so that asking it again may help."""
        log.debug("%s: %s did not answer: %s", self.ring.info, node, exc)
        if isinstance(exc, PeerUnreachableError):  # down, or only slow: the failure detector decides
            if self.ring.unreachable(node, exc):
                self.forget_peer(node.address)
                return False
            return not exc.refused
        if isinstance(exc, RingError):  # it has left the ring, or is leaving it
            self.ring.forget(node, "left")
        return False

    def forget_peer(self, address: str) -> None:
        """Drop what is kept per peer for ``address`` (it failed or left); work in flight finishes."""
        self._readers.pop(address, None)
        self._writers.pop(address, None)

    def cancel_background(self) -> None:
        """Stop the replication still running in the background (used when closing abruptly)."""
        for future in list(self._background):
            future.cancel()

    def _adoptable(self, record: Record | None) -> Record | None:
        """``record``, or ``None`` if it is stamped beyond the allowed clock skew: such a record (stored
        before this check existed, or by a node with a wrong clock) is never returned, repaired with, nor
        allowed to move this node's clock."""
        if record is None or record.version.timestamp <= self.clock.limit():
            return record
        log.warning("%s: ignoring a record of %r stamped beyond the clock skew", self.ring.info, record.key)
        return None

    async def _read_at(self, node: NodeInfo, key: bytes) -> tuple[Record | None, bool]:
        """``node``'s record of ``key``, and whether ``node`` is :attr:`settled`."""
        if node.address == self.ring.address:
            return self._adoptable(await self.storage.get(key)), self.settled
        batcher = self._readers.get(node.address)
        if batcher is None:
            send = functools.partial(self._read_many, node.address)
            batcher = self._readers[node.address] = Batcher(send, _key_batches)
        found, settled = await batcher.submit(key)
        record = self._adoptable(found)
        if record is not None:
            self.clock.observe(record.version.timestamp)
        return record, settled

    def _start_write(
        self, node: NodeInfo, records: list[Record]
    ) -> asyncio.Future[Stored] | asyncio.Future[tuple[int, Version | None]]:
        """Begin storing ``records`` at ``node``: a future of one record's :data:`Stored` (a single
        record to a peer, which joins that peer's message of this turn without a task of its own), or
        of :meth:`_write_at`'s summary."""
        if len(records) == 1 and node.address != self.ring.address:
            return self._writer(node.address).submit(records[0])
        return asyncio.ensure_future(self._write_at(node, records))

    def _writer(self, address: str) -> Batcher[Record, Stored]:
        """The batcher that sends single-record writes to ``address``, one message per turn."""
        writer = self._writers.get(address)
        if writer is None:
            send = functools.partial(self._store_many, address)
            writer = self._writers[address] = Batcher(send, self._chunks)
        return writer

    async def _write_at(self, node: NodeInfo, records: list[Record]) -> tuple[int, Version | None]:
        """Store ``records`` at ``node``: how many it kept, and the greatest version it refused one for."""
        if node.address == self.ring.address:
            return _summary(await self._store_here(records))
        if len(records) == 1:  # a client write or a repair: share the message with others of this turn
            return _summary([await self._writer(node.address).submit(records[0])])
        results: list[Stored] = []
        for chunk in self._chunks(records):
            results += await self._store_many(node.address, chunk)
        return _summary(results)

    async def _read_many(self, address: str, keys: list[bytes]) -> list[tuple[Record | None, bool]]:
        raw = await self._call(
            address, "kv.read_many", {"keys": [_b64(k) for k in keys]}, self._timeout_for(len(keys))
        )
        answer = wire.decode(wire.ReadManyAnswer, raw, self._limits)
        return [(None if r is None else r.record(), answer.settled) for r in answer.records]

    async def _store_many(self, address: str, records: list[Record]) -> list[Stored]:
        raw = await self._call(
            address, "kv.store", {"records": [r.to_wire() for r in records]}, self._timeout_for(len(records))
        )
        answer = wire.decode(wire.StoreAnswer, raw, self._limits)
        return [(kept, None if v is None else v.value()) for kept, v in answer.each]

    async def _store_here(self, records: list[Record]) -> list[Stored]:
        """Apply a write here, counted while it runs; refused once the node is leaving (see
        :meth:`quiesce`). A plain try/finally, not a context manager: every write passes here."""
        if self.leaving:
            raise RingError(f"{self.ring.info.address} is leaving the ring and takes no more writes")
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

    def _timeout_for(self, items: int) -> float:
        return self.config.rpc_timeout * max(1, items // 64)

    def _chunks(self, records: list[Record]) -> list[list[Record]]:
        """Split ``records`` so that no message carries more than one largest value's worth of bytes."""
        budget = self.config.max_value_bytes + self.config.max_key_bytes
        chunks: list[list[Record]] = [[]]
        used = 0
        for record in records:
            size = len(record.key) + len(record.value or b"")
            if chunks[-1] and (used + size > budget or len(chunks[-1]) >= self.config.handoff_batch):
                chunks.append([])
                used = 0
            chunks[-1].append(record)
            used += size
        return chunks

    def _within_skew(self, records: list[Record], source: str) -> list[Record]:
        """``records`` without those stamped beyond the allowed clock skew (logged, never stored)."""
        limit = self.clock.limit()
        kept = [r for r in records if r.version.timestamp <= limit]
        if len(kept) < len(records):
            log.warning(
                "%s: %d records from %s are stamped beyond the allowed clock skew; not stored",
                self.ring.info,
                len(records) - len(kept),
                source,
            )
        return kept

    async def _store(self, records: list[Record]) -> tuple[int, Version | None]:
        """Keep ``records`` here: how many were kept, and the greatest stored version that beat one."""
        return _summary(await self._store_each(records))

    async def _store_each(self, records: list[Record]) -> list[Stored]:
        """Keep each record unless a greater version is stored: (kept, the greater version if refused)."""
        results: list[Stored] = []
        for record in records:
            self.clock.observe(record.version.timestamp)
            if await self.storage.put(record):
                results.append((True, None))
                continue
            current = await self.storage.get(record.key)
            greater = current is not None and current.version > record.version
            results.append((False, current.version if greater and current else None))
        return results

    # -- maintenance ------------------------------------------------------------------------------

    async def maintain(self) -> Maintenance:
        """One pass of hand-off, repair and anti-entropy over every local record (see the module doc)."""
        async with self._maintaining:
            report = Maintenance()
            epoch, settled, unsettled = self.ring.epoch, self.settled, self._unsettled
            placement = _Placement(self.ring, self._members)
            pacer = _Pacer(self.slice)
            me = self.ring.address
            grace = self.config.tombstone_grace
            shift = self.ring.space.bits - BUCKET_BITS
            now = self.wall()
            peers: dict[str, NodeInfo] = {}  # one id to call each process at
            digests: dict[str, _Digests] = {}
            misplaced: list[tuple[Record, list[NodeInfo]]] = []
            expired: list[Record] = []
            async for batch in self.storage.scan(batch=self.config.handoff_batch):
                for record in batch:
                    await pacer.pause()
                    report.records += 1
                    if record.value is None and now - HybridClock.seconds(record.version.timestamp) > grace:
                        expired.append(record)
                        continue
                    try:
                        replicas, _ = await self.replica_set(record.key, placement)
                    except RingError:
                        continue
                    bucket = self.ring.space.id(record.key) >> shift
                    fingerprint = 0
                    for node in replicas:
                        if node.address != me:
                            peers.setdefault(node.address, node)
                            digest = digests.get(node.address)
                            if digest is None:
                                digest = digests[node.address] = _Digests()
                            fingerprint = fingerprint or _fingerprint(record.key, record.version)
                            digest.counts[bucket] += 1
                            digest.fingerprints[bucket] ^= fingerprint
                    if all(node.address != me for node in replicas):
                        misplaced.append((record, replicas))
            report.collected = await self._collect(expired, placement, pacer)
            self._digests, self._placement, self._placed_epoch = digests, placement, epoch
            if not settled:  # pull from every member, not only those this node's records name
                for address in (m.address for m in self._members() if m.state == "up"):
                    if address != me and address not in digests:
                        peers[address], digests[address] = NodeInfo(0, address), _Digests()
            complete = True
            for address, digest in digests.items():
                complete &= await self._sync_with(peers[address], digest, placement, report, pacer)
            await self._hand_off(misplaced, report, pacer)
            if complete and self.ring.epoch == epoch and self._unsettled == unsettled:
                self._synced_epoch = epoch
            return report

    async def _collect(self, tombstones: list[Record], placement: _Placement, pacer: _Pacer) -> int:
        """Drop the ``tombstones`` past their grace period that every replica of their key confirms: it
        holds the tombstone (or a newer record), or nothing at all. A replica that is unreachable, or
        that still holds an older live value, keeps the tombstone here (the latter is repaired), so no
        replica of the key can bring the value back. Returns how many were dropped."""
        me = self.ring.address
        by_replicas: dict[tuple[NodeInfo, ...], list[Record]] = {}
        for record in tombstones:
            await pacer.pause()
            try:
                replicas, _ = await self.replica_set(record.key, placement)
            except RingError:
                continue
            by_replicas.setdefault(tuple(n for n in replicas if n.address != me), []).append(record)
        confirmed: list[Record] = []
        for others, records in by_replicas.items():
            for i in range(0, len(records), self.config.handoff_batch):
                chunk = records[i : i + self.config.handoff_batch]
                keep: set[bytes] = set()
                for node in others:
                    try:
                        held = await self._read_many(node.address, [r.key for r in chunk])
                    except BalancerError:
                        keep.update(r.key for r in chunk)
                        break
                    behind = [r for r, (theirs, _) in zip(chunk, held, strict=True)
                              if theirs is not None and theirs.version < r.version]  # fmt: skip
                    if behind:
                        keep.update(r.key for r in behind)
                        await self._write_at(node, behind)
                confirmed += [r for r in chunk if r.key not in keep]
        return await self._remove(confirmed, pacer)

    async def _remove(self, records: list[Record], pacer: _Pacer) -> int:
        """Drop ``records`` from the storage (unless overwritten since) a batch at a time; how many."""
        removed = 0
        for i in range(0, len(records), self.config.handoff_batch):
            removed += await self.storage.remove(records[i : i + self.config.handoff_batch])
            await pacer.pause()
        return removed

    async def _shared_in(
        self, address: str, bucket: int, placement: _Placement, pacer: _Pacer
    ) -> AsyncIterator[Record]:
        """The records of ``bucket`` that ``address`` replicates too, as ``placement`` places them: read
        from the storage (the ids of one bucket are one range), never kept between passes."""
        space = self.ring.space
        shift = space.bits - BUCKET_BITS
        start, end = ((bucket << shift) - 1) % space.size, ((bucket + 1) << shift) - 1
        async for batch in self.storage.scan(start, end, batch=self.config.handoff_batch):
            for record in batch:
                await pacer.pause()
                try:
                    replicas, _ = await self.replica_set(record.key, placement)
                except RingError:
                    continue
                if any(node.address == address for node in replicas):
                    yield record

    async def _sync_with(
        self, node: NodeInfo, digest: _Digests, placement: _Placement, report: Maintenance, pacer: _Pacer
    ) -> bool:
        """Compare digests with ``node`` and exchange the records of the buckets that differ; whether
        that completed with a peer whose digests were made at its current view of the ring."""
        try:
            raw = await self._call(
                node.address,
                "kv.digests",
                {"node": self.ring.info.to_wire(), "digests": digest.wire()},
                self.config.rpc_timeout,
            )
            answer_digests = wire.decode(wire.DigestsAnswer, raw, self._limits)
            for bucket in answer_digests.differ:
                entries = [
                    [_b64(r.key), *r.version.to_wire()]
                    async for r in self._shared_in(node.address, bucket, placement, pacer)
                ]
                # the peer reads the bucket back from its storage: give it time for what it holds too
                work = max(len(entries), digest.counts[bucket])
                raw = await self._call(
                    node.address,
                    "kv.compare",
                    {"node": self.ring.info.to_wire(), "bucket": bucket, "entries": entries},
                    self._timeout_for(work),
                )
                answer = wire.decode(wire.CompareAnswer, raw, self._limits)
                theirs = self._within_skew([r.record() for r in answer.records], node.address)
                for i in range(0, len(theirs), self.config.handoff_batch):
                    report.pulled += (await self._store(theirs[i : i + self.config.handoff_batch]))[0]
                    await pacer.pause()
                mine: list[Record] = []
                for key in answer.want:
                    record = await self.storage.get(key)
                    if record is not None:
                        mine.append(record)
                    await pacer.pause()
                if mine:
                    await self._write_at(node, mine)
                    report.pushed += len(mine)
            return answer_digests.current
        except BalancerError as exc:
            report.unreachable.add(node.address)
            log.debug("%s: anti-entropy with %s failed: %s", self.ring.info, node, exc)
            return False

    async def _hand_off(
        self, misplaced: list[tuple[Record, list[NodeInfo]]], report: Maintenance, pacer: _Pacer
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
            acked, _ = await self._replicate(records, list(targets), [], len(targets))
            if acked == len(targets):
                confirmed.extend(records)
                for node in targets:
                    self._emit("range_moved", node=self.ring.info, target=node, records=len(records))
        if confirmed:
            report.handed_off += await self._remove(confirmed, pacer)

    async def hand_off_all(self, successors: Iterable[NodeInfo]) -> int:
        """Leaving: give every local record to the nodes that replicate it once this node is gone, and
        drop it when they all confirmed. Returns how many records were dropped.

        A record's heirs are its replica set without this node, completed by the next fallback. Records
        whose replica set cannot be looked up go to ``successors`` instead (dropped once one confirmed).
        """
        me = self.ring.address
        placement = _Placement(self.ring, self._members)
        pacer = _Pacer(self.slice)
        by_heirs: dict[tuple[NodeInfo, ...], list[Record]] = {}
        async for batch in self.storage.scan(batch=self.config.handoff_batch):
            for record in batch:
                await pacer.pause()
                try:
                    replicas, fallbacks = await self.replica_set(record.key, placement)
                    heirs = [n for n in replicas if n.address != me]
                    heirs += [n for n in fallbacks if n.address != me][:1]
                    heirs = heirs[: self.config.replicas]
                except RingError:
                    heirs = []
                by_heirs.setdefault(tuple(heirs), []).append(record)
        moved = 0
        fallback = [s for s in successors if s.address != me]
        for chosen, records in by_heirs.items():
            targets = list(chosen) or fallback
            if not targets:
                continue
            for i in range(0, len(records), self.config.handoff_batch):
                chunk = records[i : i + self.config.handoff_batch]
                acked, _ = await self._replicate(chunk, targets, [], len(targets))
                if acked == len(targets) or (not chosen and acked):
                    moved += await self.storage.remove(chunk)
                    for target in targets:
                        self._emit("range_moved", node=self.ring.info, target=target, records=len(chunk))
        return moved

    # -- RPC handlers -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this service adds to the node, by name."""
        limits = self._limits
        return {
            "kv.read_many": wire.serve(wire.ReadMany, self._rpc_read_many, limits),
            "kv.store": wire.serve(wire.Store, self._rpc_store, limits),
            "kv.digests": wire.serve(wire.Digests, self._rpc_digests, limits),
            "kv.compare": wire.serve(wire.Compare, self._rpc_compare, limits),
        }

    async def _rpc_read_many(self, message: wire.ReadMany) -> Payload:
        found = [await self.storage.get(key) for key in message.keys]
        return {"records": [r.to_wire() if r else None for r in found], "settled": self.settled}

    async def _rpc_store(self, message: wire.Store) -> Payload:
        records = [r.record() for r in message.records]
        limit = self.clock.limit()  # the same bound as everywhere records are taken in
        for record in records:  # checked before any is stored: a refused request changes nothing
            if record.version.timestamp > limit:
                ahead = self.clock.ahead(record.version.timestamp)
                raise ClockSkewError(
                    f"a record is stamped {ahead:.0f} s ahead of this node's clock "
                    f"(the limit is {self.config.max_clock_skew:g} s)"
                )
        results = await self._store_here(records)
        return {"each": [[kept, v.to_wire() if v else None] for kept, v in results]}

    async def _rpc_digests(self, message: wire.Digests) -> Payload:
        if self._placement is None:  # no pass yet: nothing to compare with, every bucket would differ
            return {"differ": [], "current": False}
        theirs = {int(b): list(digest) for b, digest in message.digests.items()}
        mine = self._digests.get(message.node.address) or _Digests()
        return {"differ": mine.differ(theirs), "current": self._placed_epoch == self.ring.epoch}

    async def _rpc_compare(self, message: wire.Compare) -> Payload:
        peer, bucket = message.node.value(), message.bucket
        pacer = _Pacer(self.slice)
        want: list[str] = []
        newer: list[Payload] = []
        listed: set[bytes] = set()
        for key, timestamp, writer in message.entries:
            await pacer.pause()
            version = Version(timestamp, writer)
            listed.add(key)
            record = await self.storage.get(key)
            if record is None or record.version < version:
                want.append(_b64(key))
            elif record.version > version:
                newer.append(record.to_wire())
        # records this node thinks the peer should hold in this bucket (as its last pass placed them)
        # but the peer did not list
        if self._placement is not None:
            async for record in self._shared_in(peer.address, bucket, self._placement, pacer):
                if record.key not in listed:
                    newer.append(record.to_wire())
        return {"want": want, "records": newer}
