"""Quorum reads and writes of one key, coordinated by this node.

**Versions.** A write is stamped here, at the coordinating node, with a hybrid logical clock timestamp and
this node's id. Every store keeps the greatest version (last writer wins), so replicas converge whatever
order writes arrive in; a delete writes a tombstone, collected after ``tombstone_grace`` once every
replica of its key confirmed it.

**Quorums.** A write returns once W of the key's replicas stored it, and fails with :class:`QuorumError`
(saying how many answered) otherwise; the replicas still in flight finish in the background. A read asks
R replicas and returns the newest version; replicas that answered with an older one are repaired at once.
A read that meets an unsettled node (see :mod:`balancer.kv.shared`) also asks the key's other replicas
and fallbacks, where the key was before the change, and takes the newest answer.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from balancer.errors import BalancerError, ClockSkewError, PeerUnreachableError, QuorumError, RingError
from balancer.kv.placement import ReplicaSets
from balancer.kv.shared import Shared, log
from balancer.kv.transfer import Transfer
from balancer.types import NodeInfo, Record, Version

__all__ = ["Coordinator"]


def _abandon(future: asyncio.Future[Any]) -> None:
    """Cancel ``future``, which nobody will await, and retrieve its outcome so none goes unreported."""
    future.cancel()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


class Coordinator:
    """Reads and writes this node coordinates: quorums of the key's replicas, repair of stale ones, and
    the replication that goes on in the background once a quorum answered."""

    def __init__(self, shared: Shared, replica_sets: ReplicaSets, transfer: Transfer) -> None:
        self.shared = shared
        self.replica_sets = replica_sets
        self.transfer = transfer
        self._background: set[asyncio.Future[Any]] = set()

    async def read(self, key: bytes) -> Record | None:
        """The newest record R replicas hold for ``key`` (tombstones included), or ``None``.

        If this node or a replica that answered is not :attr:`~balancer.kv.shared.Shared.settled` (the
        ring changed around it lately), or every answer is a miss, the read also asks the key's other
        replicas and fallbacks (the next nodes on the ring, which held the key before the change) and
        takes the newest of all answers. Replicas that answered with an older version, or none, are
        repaired in the background. Raises :class:`QuorumError` if fewer than R replicas answer.
        """
        replicas, fallbacks = await self.replica_sets.replica_set(key)
        # never fewer: a node that lost sight of its peers must not answer
        need = self.shared.config.read_quorum
        me = self.shared.ring.address
        answers: dict[NodeInfo, Record | None] = {}
        widen = not self.shared.settled
        for node in replicas:
            if node.address == me:  # the local copy costs no message: read it first, without a task
                answers[node] = self.transfer.adoptable(await self.shared.storage.get(key))
        # suspected replicas are asked last: a slow peer is waited for only when no other will do
        # Only replicas count towards R (as only they count towards W): a fallback on this side of a
        # partition could otherwise make a quorum that never overlapped the write's.
        queue = self.shared.ring.prefer_healthy([n for n in replicas if n.address != me])
        retried: set[NodeInfo] = set()
        if len(answers) + 1 == need and queue:
            # the common case, one remote answer short of the quorum: await it without a task of its own
            node = queue.pop(0)
            try:
                answers[node], settled = await self.transfer.read_at(node, key)
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
                    running[asyncio.ensure_future(self.transfer.read_at(node, key))] = node
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
            found = await asyncio.gather(
                *(self.transfer.read_at(n, key) for n in rest), return_exceptions=True
            )
            for node, result in zip(rest, found, strict=True):
                if isinstance(result, BaseException):
                    self._failed(node, result)
                    continue
                answers[node] = result[0]
            best = max((r for r in answers.values() if r is not None), key=lambda r: r.version, default=None)
        if best is not None and best.version.timestamp <= self.shared.clock.limit():
            # (a record past this clock's skew is read, not repaired with: replicas behind would refuse
            # it, and with it every other record of the message it shares)
            stale = [
                n for n, r in answers.items() if n in replicas and (r is None or r.version < best.version)
            ]
            for node in stale:
                self._in_background(self.transfer.write_at(node, [best]), repairing=node.address)
        return best

    async def write(self, key: bytes, value: bytes | None) -> Version:
        """Write ``value`` (``None`` for a tombstone) under a fresh version to the key's replicas.

        Returns once W replicas stored it; raises :class:`QuorumError` with how many did otherwise.
        This node keeps its own copy only once a peer accepted the version (see :meth:`replicate`), so
        a write stamped by a clock its replicas refuse is kept nowhere, and can never win later.
        """
        replicas, fallbacks = await self.replica_sets.replica_set(key)
        need = self.shared.config.write_quorum
        for _ in range(3):
            record = Record(key, value, Version(self.shared.clock.now(), self.shared.ring.info.id))
            acked, newer = await self.replicate([record], replicas, fallbacks, need, vouched=True)
            if newer is None:
                break
            # A replica holds a greater version: a write another coordinator stamped in the same instant,
            # or with a clock ahead of ours. Stamp past it and write again, so that a write issued after
            # another one was acknowledged is never ordered before it.
            self.shared.clock.observe(newer.timestamp)
        if acked < need:
            raise QuorumError("write", acked, need)
        return record.version

    async def replicate(
        self,
        records: list[Record],
        targets: list[NodeInfo],
        spare: list[NodeInfo],
        need: int,
        *,
        vouched: bool = False,
    ) -> tuple[int, Version | None]:
        """Send ``records`` to ``targets``, and to the next ``spare`` for each that fails; returns as
        soon as ``need`` targets acknowledged (the rest finish in the background) or every attempt is over.

        With ``vouched`` (records this node has just stamped), this node stores its own copy (as a
        target or as a spare) only once another of the key's replicas has stored them, or, as a target,
        once every other attempt has ended with none refusing them for being stamped beyond its clock
        skew (:class:`ClockSkewError`) and its own copy completes the quorum (W = 1, or a ring of one).
        A replica that refuses them for their stamp gets no spare: a spare stands in for an unreachable
        replica, not for one that refused. So records that replicas refuse as coming from a clock too
        far ahead are kept nowhere: neither anti-entropy nor repair can spread them once their time
        comes, and they can never beat a later write.

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
        me = self.shared.ring.address
        held: list[NodeInfo] = []  # this node's own copy, until another replica vouched for the stamps
        vouch = vouched  # whether this node's own copy waits for a vouch
        refused = False  # a replica refused the records as stamped too far ahead of its clock

        def begin(node: NodeInfo) -> None:
            """Start ``node``'s attempt, or hold it if it is this node's copy awaiting a vouch."""
            if vouch and node.address == me:
                held.append(node)
            else:
                start(node)

        def release(vouched_for: bool) -> None:
            """Another replica stored the records (``vouched_for``): start every held copy. Else, the
            last attempt ended: start this node's copy as a target only if no replica refused the
            stamps and it completes the quorum by itself (a copy that cannot make a write succeed is a
            copy no peer checked)."""
            nonlocal vouch
            if vouched_for:
                vouch = False
                while held:
                    start(held.pop(0))
            elif pending == 0 and not refused and need - acked <= 1:
                for node in [n for n in held if n in counted]:
                    held.remove(node)
                    start(node)

        def ended(node: NodeInfo, future: asyncio.Future[Any]) -> None:
            nonlocal acked, newest_version, pending, refused
            pending -= 1
            exc = asyncio.CancelledError() if future.cancelled() else future.exception()
            if exc is None:
                if vouch and node in counted and node.address != me:
                    release(True)
                # one record's (kept, newer) or a summary's (count kept, newer): newer is what counts
                _, newer = future.result()
                self.shared.warnings.answered("a replica write", node.address)
                if node in counted:  # a spare holds a copy, but a quorum counts replicas only
                    if newer is not None and newer.timestamp > self.shared.clock.limit():
                        # it holds a version stamped beyond the skew, which would beat every write: not
                        # an acknowledgement, and never a reason to stamp past it
                        log.warning(
                            "%s: %s holds a record stamped beyond the skew", self.shared.ring.info, node
                        )
                    else:
                        acked += 1
                        if newer is not None and (newest_version is None or newer > newest_version):
                            newest_version = newer
            else:  # accounted even after the quorum: a peer found down is forgotten at once
                skewed = isinstance(exc, ClockSkewError)
                refused = refused or skewed
                if not isinstance(exc, asyncio.CancelledError):  # cancelled is not failed
                    self.shared.warnings.failed("a replica write", node.address, exc, self.shared.ring.info)
                slow = self._failed(node, exc)
                if slow and node not in retried and not quorum.done():
                    # only slow: asked again, for longer (its timeout backed off), beside a spare
                    retried.add(node)
                    start(node)
                if spare and not skewed:  # even after the quorum: N copies, handed back by maintenance
                    begin(spare.pop(0))
                if held:
                    release(False)
            if not quorum.done() and (acked >= need or pending == 0):
                quorum.set_result(None)

        started: list[asyncio.Future[Any]] = []
        returned = False

        def start(node: NodeInfo) -> None:
            nonlocal pending
            pending += 1
            future = self.transfer.start_write(node, records)
            future.add_done_callback(functools.partial(ended, node))
            if returned:  # a spare for a failure after the caller gave up: kept and waited for by drain
                self._in_background(future, accounted=True)
            else:
                started.append(future)

        for node in targets:
            begin(node)
        if held and pending == 0:  # no other replica to vouch: a ring of one
            release(False)
        try:
            if pending:
                await asyncio.shield(quorum)
        finally:  # what still runs once the quorum is in (or the caller gave up) goes on in the background
            returned = True
            for future in started:
                if not future.done():
                    self._in_background(future, accounted=True)
        return acked, newest_version

    def _in_background(self, work: Any, *, accounted: bool = False, repairing: str | None = None) -> None:
        """Run ``work`` in the background until it ends (or :meth:`drain`); its failure is logged,
        unless ``accounted`` (a replica write, whose end :meth:`replicate` accounts for), as a failed
        repair of peer ``repairing`` if given."""
        future = asyncio.ensure_future(work)
        self._background.add(future)

        def finished(done: asyncio.Future[Any]) -> None:
            self._background.discard(done)
            if accounted or done.cancelled() or done.exception() is None:
                return
            exc, me = done.exception(), self.shared.ring.info
            if repairing is not None and isinstance(exc, BalancerError):
                self.shared.warnings.failed("a repair", repairing, exc, me)
            else:
                log.warning("%s: background replication failed: %s", me, exc)

        future.add_done_callback(finished)

    async def drain(self) -> None:
        """Wait for the replication still running in the background (used before leaving)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _failed(self, node: NodeInfo, exc: BaseException | None) -> bool:
        """Account for a replica call to ``node`` that failed with ``exc``; returns whether the node is
        only suspected (it timed out but is not declared failed), so that asking it again may help."""
        log.debug("%s: %s did not answer: %s", self.shared.ring.info, node, exc)
        if isinstance(exc, PeerUnreachableError):  # down, or only slow: the failure detector decides
            if self.shared.ring.unreachable(node, exc):
                self.transfer.forget_peer(node.address)
                return False
            return not exc.refused
        if isinstance(exc, RingError):  # it has left the ring, or is leaving it
            self.shared.ring.forget(node, "left")
        return False

    def cancel_background(self) -> None:
        """Stop the replication still running in the background (used when closing abruptly)."""
        for future in list(self._background):
            future.cancel()
