"""Versions: the hybrid logical clock that stamps every write.

A write is stamped at the coordinating node with a :class:`HybridClock` timestamp and that node's id
(a :class:`~balancer.types.Version`). Every store keeps the greatest version (last writer wins), so
replicas converge whatever order writes arrive in.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HybridClock"]

_COUNTER_BITS = 16


class HybridClock:
    """A hybrid logical clock: wall-clock milliseconds in the high bits, a counter in the low 16.

    ``now()`` never goes backwards and never repeats, even if the wall clock does; ``observe()`` moves it
    past a timestamp seen from another node, so causally later writes always get greater versions, but
    never further than ``max_skew`` seconds ahead of this node's wall clock: one record stamped far in the
    future (a peer with a wrong clock, or a forged one) cannot drag every later write along with it.
    """

    def __init__(self, wall: Callable[[], float] = time.time, max_skew: float = 60.0) -> None:
        self._wall = wall
        self.max_skew = max_skew
        self._last = 0

    def now(self) -> int:
        """A fresh timestamp, greater than every one issued or observed before."""
        self._last = max(self._last + 1, int(self._wall() * 1000) << _COUNTER_BITS)
        return self._last

    def observe(self, timestamp: int) -> None:
        """Account for a timestamp seen on a record from elsewhere (at most up to :meth:`limit`)."""
        self._last = max(self._last, min(timestamp, self.limit()))

    def rewind(self) -> None:
        """Forget every timestamp issued or observed ahead of the wall clock: for a node whose clock
        was fenced for being far ahead and is now back. Nothing it stamped beyond its replicas' bound
        was kept (see :meth:`~balancer.kv.coordinator.Coordinator.write`), and a write of a key whose
        replicas hold a greater version is stamped past it, so no key's writes fall out of order."""
        self._last = min(self._last, int(self._wall() * 1000) << _COUNTER_BITS)

    def limit(self) -> int:
        """The greatest timestamp accepted now: ``max_skew`` seconds ahead of the wall clock."""
        return int((self._wall() + self.max_skew) * 1000) << _COUNTER_BITS

    def horizon(self) -> int:
        """The greatest timestamp a read adopts: twice ``max_skew`` ahead of the wall clock. A replica
        stored the record within its own ``max_skew``, and while neither is fenced its clock may be
        ahead of this one's by up to 1.6 ``max_skew`` (each within 0.8 of the majority's, see
        :mod:`balancer.skew`): a read that ignored such a record would answer with an older value.
        Beyond that a record is forged, or this clock is broken."""
        return int((self._wall() + 2 * self.max_skew) * 1000) << _COUNTER_BITS

    def ahead(self, timestamp: int) -> float:
        """Seconds ``timestamp`` is ahead of this node's wall clock (negative if behind)."""
        return self.seconds(timestamp) - self._wall()

    @staticmethod
    def seconds(timestamp: int) -> float:
        """The wall-clock time (seconds since the epoch) a timestamp was issued at."""
        return (timestamp >> _COUNTER_BITS) / 1000
