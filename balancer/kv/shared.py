"""What the parts of one process's key-value service share: the ring, storage, strategy and clock, the
transport to call peers with, whether the node is settled, and the pacing of long loops.

**Settled.** A node is *settled* once a maintenance pass synced it with its peers since the ring last
changed around it; a read that meets an unsettled node (it joined, restarted, or its neighbours changed)
also asks the key's other replicas and fallbacks, where the key was before the change, and takes the
newest answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from balancer import wire
from balancer.chord import Call
from balancer.config import Config
from balancer.errors import GoneError, PeerUnreachableError, RingError
from balancer.hookspecs import ReplicationStrategy, Storage
from balancer.kv.clock import HybridClock
from balancer.ring import Ring
from balancer.types import Member

__all__ = ["SLICE_SECONDS", "Pacer", "PeerWarnings", "Shared", "log", "pointed"]

log = logging.getLogger("balancer.kv")
"""The service's one logger, whichever part of it writes."""


class PeerWarnings:
    """Failures that matter (a replica that did not store a write, a peer that anti-entropy could not
    reach), logged as warnings once per peer and kind until that peer answers again: a peer that is down
    until the failure detector gives up on it must not fill the log with one line per request.

    A routine departure is not a warning: failures with a peer that said it is leaving (or has left),
    or that answered that it is leaving, are logged at INFO. So is the first refused connection of a
    peer that has not answered since: a peer that stopped gracefully refuses connections before every
    node has heard it left. A second one, with no leave heard meanwhile, is a warning.
    """

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()
        self._refused: set[tuple[str, str]] = set()
        self._departed: set[str] = set()

    def departed(self, peer: str) -> None:
        """``peer`` left the ring (or said it is leaving): its failures are routine until it answers."""
        self._departed.add(peer)

    def back(self, peer: str) -> None:
        """``peer`` joined the ring again: forget that it left."""
        if peer in self._departed:
            self._departed.discard(peer)
            self._refused = {(kind, p) for kind, p in self._refused if p != peer}

    def failed(self, kind: str, peer: str, reason: object, me: object) -> None:
        """``peer`` failed at ``kind``: warn, unless already warned since it last answered, or the
        failure is a routine departure (see the class)."""
        if type(reason) in (RingError, GoneError):  # it answered that it is leaving, or has left
            self._departed.add(peer)
        if peer in self._departed:
            log.info("%s: %s with %s failed: %s (it is leaving the ring)", me, kind, peer, reason)
            return
        if isinstance(reason, PeerUnreachableError) and reason.refused and (kind, peer) not in self._refused:
            self._refused.add((kind, peer))
            log.info("%s: %s with %s failed: %s (stopped, or leaving the ring)", me, kind, peer, reason)
            return
        if (kind, peer) in self._warned:
            log.debug("%s: %s with %s failed again: %s", me, kind, peer, reason)
            return
        self._warned.add((kind, peer))
        log.warning("%s: %s with %s failed: %s (not logged again until it answers)", me, kind, peer, reason)

    def answered(self, kind: str, peer: str) -> None:
        """``peer`` answered at ``kind``: its next failure is worth a warning again."""
        if self._warned or self._refused or self._departed:  # called for every replica that stores a write
            self._warned.discard((kind, peer))
            self._refused.discard((kind, peer))
            self._departed.discard(peer)


SLICE_SECONDS = 0.005
"""Longest a maintenance loop works before it lets the event loop run other tasks (seconds)."""


class Pacer:
    """Lets a long loop give the event loop a turn once it has worked ``budget`` seconds without one."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._since = time.perf_counter()

    async def pause(self) -> None:
        """Yield to the event loop if this slice of work is over its budget; else return at once."""
        if time.perf_counter() - self._since >= self.budget:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


def pointed(ring: Ring) -> tuple[Member, ...]:
    """The members a ring without a node knows: itself and the processes its vnodes point to."""
    me = Member(ring.address, tuple(sorted(v.info.id for v in ring.vnodes)))
    return tuple(sorted([me, *(Member(a) for a in ring.pointed())], key=lambda m: m.address))


@dataclass(eq=False)
class Shared:
    """The state every part of a :class:`~balancer.kv.KVService` works with. The parts hold this object,
    never copies of its attributes, so that one replaced here (the strategy, the clock) is replaced for
    all of them.
    """

    ring: Ring
    storage: Storage
    strategy: ReplicationStrategy
    call: Call
    config: Config
    emit: Callable[..., None]
    """``emit(event, **kwargs)`` reports ring events (``range_moved``) to the plugins."""
    members: Callable[[], tuple[Member, ...]]
    """The ring's processes, for strategies and syncing."""
    trusted: Callable[[], bool]
    """The node's trust in its view of the ring: not while cut off, or merging rings."""
    wall: Callable[[], float] = time.time
    """This node's wall clock (seconds since the epoch)."""
    clock: HybridClock = field(init=False)
    limits: wire.Limits = field(init=False)
    slice: float = field(default=SLICE_SECONDS, init=False)
    """Longest a maintenance loop works before it yields to the event loop (seconds)."""
    synced_epoch: int | None = field(default=None, init=False)
    """The ring epoch of the last complete maintenance pass."""
    unsettled: int = field(default=0, init=False)
    """Calls of :meth:`unsettle`: a pass under way during one does not settle the node."""
    warnings: PeerWarnings = field(default_factory=PeerWarnings, init=False)
    """Failures worth a warning, once per peer until it answers again."""

    def __post_init__(self) -> None:
        self.clock = HybridClock(self.wall, max_skew=self.config.max_clock_skew)
        self.limits = wire.Limits(
            self.ring.space.bits, self.config.max_key_bytes, self.config.max_value_bytes
        )

    @property
    def synced(self) -> bool:
        """Whether this node has synced with every replica it shares records with since it last saw the
        ring change (a maintenance pass that reached every peer, with no change during it)."""
        return self.synced_epoch == self.ring.epoch

    @property
    def settled(self) -> bool:
        """:attr:`synced`, and trusted by the node (not cut off from the ring's majority, nor merging
        rings). An unsettled node may lack writes acknowledged elsewhere: a node that just
        joined, restarted or came back from a partition, or one whose neighbours changed. Readers that
        meet one widen their quorum."""
        return self.synced and self.trusted()

    def unsettle(self) -> None:
        """Declare this node unsettled until a maintenance pass that starts after this completes (it
        rejoined the ring after a partition, and what it holds may lack what the rest acknowledged
        meanwhile); a pass already under way no longer counts."""
        self.synced_epoch = None
        self.unsettled += 1

    def mark_settled(self) -> None:
        """Declare this node settled at the ring's current epoch: for a node that creates a ring, which
        no other node can hold writes for."""
        self.synced_epoch = self.ring.epoch
