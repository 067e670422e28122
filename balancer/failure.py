"""Failure detection that adapts to each peer: a slow peer is suspected, only a silent one is declared dead.

A fixed timeout cannot tell a dead peer from one that is merely slow (a busy machine, a long pause of the
garbage collector, a burst of requests), and declaring a live peer dead costs the ring a repair for
nothing and the client a failed quorum. :class:`FailureDetector` keeps, per peer:

- the round-trip times of its answers (a smoothed mean and deviation, as TCP does), from which each
  call's timeout is drawn: ``srtt + 4 * rttvar``, never below the configured ``rpc_timeout`` and at most
  eight times it, doubled after each timeout until the peer answers again, so calls to a peer that
  answers slowly wait for it instead of failing;
- the times between its answers, from which the suspicion of a silent peer grows, in the manner of the
  phi-accrual detector (Hayashibara et al., 2004; used by Cassandra and Akka): with answers arriving at
  mean interval ``m``, after ``t`` seconds of silence (counted from the first call it left unanswered)
  ``phi = t / m * log10(e)``, the exponential
  distribution's ``-log10 P(silence >= t)``. A peer is *failed* once ``phi`` reaches the threshold
  (8 by default: about 18 mean intervals of silence), or at once when it refuses connections, which only
  a peer whose process is gone does.

Until then a peer that missed a call is *suspect*: routing prefers other peers, but nothing is forgotten.
The interval mean is kept within ``[rpc_timeout / 2, 4 * rpc_timeout]``, so a peer called rarely is not
condemned by one missed call, nor a peer called constantly by a short pause.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from balancer.errors import BalancerError, PeerUnreachableError

__all__ = ["STALL", "FailureDetector", "PeerHealth"]

_LOG10_E = math.log10(math.e)
_REFUSING_KEPT = 4096  # addresses remembered in FailureDetector.refusing at most

Call = Callable[[str, str, dict[str, Any], float], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class PeerHealth:
    """What the detector knows of one peer."""

    last_heard: float
    """When the peer last answered (or was first called, if it never has)."""
    interval: float
    """Smoothed mean time between its answers, in seconds."""
    srtt: float | None = None
    """Smoothed round-trip time, in seconds (``None`` until the first answer)."""
    rttvar: float = 0.0
    """Smoothed round-trip deviation, in seconds."""
    backoff: float = 1.0
    """Factor on the next call's timeout: doubled by each timeout, reset by an answer (as TCP does), so
    a peer consistently slower than the timeout is soon given the time it needs."""
    suspect: bool = False
    """Whether the last call to it failed."""
    waiting_since: float | None = None
    """When the first call that went unanswered since its last answer was made: silence counts from
    there, not from the last answer (a peer nobody called for a minute has not been silent a minute)."""
    refused: bool = False
    """Whether the last call found no process listening: failed without doubt."""


STALL = 0.5
"""Seconds past twice its timeout that a failed call must end for this process to count as stalled."""


class FailureDetector:
    """Per-peer round-trip statistics and suspicion, fed by every call a node makes.

    :param base_timeout: the shortest timeout of a call (``Config.rpc_timeout``).
    :param threshold: the ``phi`` at which a silent peer is declared failed.
    :param clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        base_timeout: float,
        threshold: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_timeout = base_timeout
        self.threshold = threshold
        self._clock = clock
        self._peers: dict[str, PeerHealth] = {}
        self.silent: set[str] = set()
        """Peers whose last call failed (suspected), until they answer or are forgotten."""
        self.refusing: set[str] = set()
        """Peers whose last call found no process listening (kept after :meth:`forget`): dead, not cut
        off, so they do not count as members this node cannot see (see ``Config.partition_memory``)."""
        self.resumed_at = float("-inf")
        """When this process last came back from a stall (it was paused, or its event loop blocked): no
        peer's silence counts from before then, since nobody was listening."""

    def _health(self, address: str) -> PeerHealth:
        health = self._peers.get(address)
        if health is None:
            # no history: assume answers every base timeout, heard just now
            health = self._peers[address] = PeerHealth(self._clock(), self.base_timeout)
        return health

    def timeout(self, address: str, at_least: float) -> float:
        """The timeout of a call to ``address``: ``at_least``, longer for a peer that answers slowly."""
        health = self._peers.get(address)
        if health is None:
            return at_least
        adaptive = self.base_timeout if health.srtt is None else health.srtt + 4 * health.rttvar
        return max(at_least, min(max(adaptive, self.base_timeout) * health.backoff, 8 * self.base_timeout))

    def answered(self, address: str, rtt: float) -> None:
        """Record an answer from ``address`` that took ``rtt`` seconds."""
        now = self._clock()
        health = self._health(address)
        gap = now - health.last_heard
        low, high = self.base_timeout / 2, 4 * self.base_timeout
        health.interval = min(high, max(low, 0.9 * health.interval + 0.1 * gap))
        health.last_heard = now
        if health.srtt is None:
            health.srtt, health.rttvar = rtt, rtt / 2
        else:
            health.rttvar = 0.75 * health.rttvar + 0.25 * abs(health.srtt - rtt)
            health.srtt = 0.875 * health.srtt + 0.125 * rtt
        health.suspect = health.refused = False
        self.refusing.discard(address)
        self.silent.discard(address)
        health.waiting_since = None
        health.backoff = 1.0

    def missed(self, address: str, exc: PeerUnreachableError, since: float | None = None) -> None:
        """Record a call to ``address``, made at ``since`` (now by default), that failed with ``exc``."""
        health = self._health(address)
        if health.waiting_since is None:
            health.waiting_since = max(self._clock() if since is None else since, self.resumed_at)
        health.suspect = True
        health.refused = exc.refused
        self.silent.add(address)
        if exc.refused:
            if len(self.refusing) >= _REFUSING_KEPT:
                self.refusing.clear()
            self.refusing.add(address)
        else:
            self.refusing.discard(address)
        health.backoff = min(2 * health.backoff, 8.0)

    def phi(self, address: str) -> float:
        """The suspicion of ``address`` now: 0 for a peer that answered its last call, then growing with
        the time since the first call it left unanswered."""
        health = self._peers.get(address)
        if health is None or health.waiting_since is None:
            return 0.0
        silence = self._clock() - max(health.waiting_since, self.resumed_at)
        return max(0.0, silence) / health.interval * _LOG10_E

    def silent_for(self, address: str) -> float:
        """Seconds since the first call to ``address`` that is still unanswered (0 if none is)."""
        health = self._peers.get(address)
        if health is None or health.waiting_since is None or not health.suspect:
            return 0.0
        return max(0.0, self._clock() - max(health.waiting_since, self.resumed_at))

    def suspect(self, address: str) -> bool:
        """Whether the last call to ``address`` failed (routing should prefer other peers)."""
        health = self._peers.get(address)
        return health is not None and health.suspect

    def failed(self, address: str) -> bool:
        """Whether ``address`` is to be declared failed: it refused a connection, or was silent too long."""
        health = self._peers.get(address)
        if health is None or not health.suspect:
            return False
        return health.refused or self.phi(address) >= self.threshold

    def forget(self, address: str) -> None:
        """Drop what is known of ``address`` (it left, or was declared failed)."""
        self._peers.pop(address, None)
        self.silent.discard(address)

    def monitor(self, call: Call) -> Call:
        """``call`` with adaptive timeouts, every answer and failure recorded here."""

        async def monitored(address: str, method: str, payload: dict[str, Any], timeout: float) -> Any:
            started = self._clock()
            limit = self.timeout(address, timeout)
            try:
                answer = await call(address, method, payload, limit)
            except PeerUnreachableError as exc:
                now = self._clock()
                if now - started > 2 * limit + STALL:
                    # the timeout fired far too late: this process was not running (SIGSTOP, a long GC,
                    # a blocked loop), so the silence is its own, not the peer's
                    self.resumed_at = now
                self.missed(address, exc, since=started)
                raise
            except BalancerError:  # an error answer is still an answer: the peer is alive
                self.answered(address, self._clock() - started)
                raise
            self.answered(address, self._clock() - started)
            return answer

        return monitored
