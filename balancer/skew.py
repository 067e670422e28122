"""Clock offsets to peers, measured from round trips the ring already makes, and the verdict that fences
a node whose clock is too far from the ring's.

**Measuring.** The answers to the ring's routine RPCs (``chord.state``, ``chord.ping``, ``chord.batch``,
``ring.describe``: see :data:`CLOCKED`) carry the answering process's wall clock as ``clock``. The
caller knows its own wall clock when it sent the request and how long the answer took (monotonic), so
the peer read its clock somewhere within that round trip: the peer's offset is its reading minus the
round trip's midpoint, wrong by at most half the round trip (NTP's rule). Of a peer's last
:data:`KEEP` samples, the one with the shortest round trip is its estimate; samples older than
:data:`FRESH` seconds are dropped, so a peer that is no longer heard from stops counting.

**Fencing.** The bound is :data:`FENCE_FRACTION` of ``max_clock_skew`` (48 s of the default 60 s). A
peer is *far* when its offset is beyond the bound for certain (by more than the bound plus the
estimate's error). A node is fenced when its far peers are at least as many as the processes within the
bound, itself included: its clock disagrees with a majority of the processes it measured. A node
alone, or one that measured nobody yet, is not fenced: its clock is the ring's. Two processes whose
clocks disagree are both fenced, since neither can tell which one is wrong.

Everything here is pure: the wall clock and the monotonic clock are injected.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from balancer.errors import ClockFencedError

__all__ = [
    "CLOCKED",
    "FAR",
    "FENCE_FRACTION",
    "FRESH",
    "KEEP",
    "LIFT_FRACTION",
    "Fence",
    "Offset",
    "PeerClocks",
    "Skew",
    "fenced_error",
    "readable",
    "wall_clock",
]

log = logging.getLogger(__name__)

CLOCKED = frozenset({"chord.state", "chord.ping", "chord.batch", "ring.describe"})
"""RPC methods whose answers carry the answering process's wall clock (``clock``, seconds)."""
FENCE_FRACTION = 0.8
"""The fence's bound as a fraction of ``max_clock_skew``: the margin keeps a node fenced before the
records it would stamp are refused by replicas for being too far ahead."""
LIFT_FRACTION = 0.7
"""A fence lifts only once the clock is within this fraction of ``max_clock_skew`` of a majority, so
that a clock near the bound does not fence and unfence with every round trip's noise."""
KEEP = 4
"""Samples kept per peer; the one with the shortest round trip is the estimate. Few, so that a clock
that steps or drifts is seen within a few round trips."""
FRESH = 60.0
"""Seconds a sample counts towards its peer's estimate."""
FAR = 1e6
"""Offsets (and errors) are clamped to this many seconds: a dead clock battery's 1970 is far, and no
further, so every figure derived from it stays within what the wire's schemas accept."""

Call = Callable[[str, str, dict[str, Any], float], Any]


def wall_clock(offset: float = 0.0, drift: float = 0.0) -> Callable[[], float]:
    """A wall clock (seconds since the epoch): the system's, or for fault tests one that is ``offset``
    seconds off and gains ``drift`` seconds per second from now on (negative: falls behind)."""
    if not offset and not drift:
        return time.time
    start = time.monotonic()
    return lambda: time.time() + offset + drift * (time.monotonic() - start)


def readable(value: object) -> float | None:
    """``value`` as a clock reading (seconds since the epoch), or ``None`` if it is not one: a peer's
    answer is trusted with a number, never with a type or a range."""
    if type(value) not in (int, float):
        return None
    reading = float(value)  # type: ignore[arg-type]
    return reading if math.isfinite(reading) and 0 < reading < 1e11 else None


@dataclass(frozen=True, slots=True)
class Offset:
    """One peer's clock as this node measured it: ``seconds`` its clock is ahead of this node's
    (negative: behind), wrong by at most ``error`` seconds; measured at ``at`` (monotonic)."""

    seconds: float
    error: float
    at: float


@dataclass(frozen=True, slots=True)
class Skew:
    """This node's clock against the processes it measured.

    ``ahead`` is how far this node's clock is ahead of the ring's (the median of the processes'
    clocks, its own included; negative: behind), wrong by at most ``error``; ``peers`` is how many peers
    have a fresh estimate and ``far`` how many of them are off by more than ``bound`` for certain.
    """

    ahead: float
    error: float
    peers: int
    far: int
    bound: float

    @property
    def fenced(self) -> bool:
        """Whether the far peers are at least as many as the processes within the bound (this one
        included): its clock disagrees with a majority of the processes it measured."""
        return self.far >= self.peers - self.far + 1

    def describe(self) -> str:
        """One line for people: how far off, measured against whom, and the bound."""
        side = "ahead of" if self.ahead >= 0 else "behind"
        return (
            f"this node's clock is {abs(self.ahead):.1f} s {side} the ring's (+-{self.error:.1f} s; "
            f"{self.far} of {self.peers} peers measured are off by more than the bound of "
            f"{self.bound:g} s)"
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form in ``GET /status`` (``clock``)."""
        return {
            "ahead": round(self.ahead, 3),
            "error": round(self.error, 3),
            "peers": self.peers,
            "far": self.far,
            "bound": self.bound,
            "fenced": self.fenced,
        }


class PeerClocks:
    """Clock offset estimates of this node's peers, and its :class:`Skew` against them.

    :param bound: seconds a clock may be off before it counts as far (see :data:`FENCE_FRACTION`).
    :param wall: this node's wall clock; :param monotonic: the clock round trips are timed with.
    """

    def __init__(
        self,
        bound: float,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        keep: int = KEEP,
        fresh: float = FRESH,
    ) -> None:
        self.bound = bound
        self.wall = wall
        self._monotonic = monotonic
        self._keep = keep
        self._fresh = fresh
        self._samples: dict[str, deque[Offset]] = {}

    def sample(self, peer: str, sent: float, rtt: float, reading: float) -> None:
        """Record that ``peer`` read ``reading`` on its clock during a round trip that left at ``sent``
        (this node's wall clock) and took ``rtt`` seconds."""
        rtt = min(max(0.0, rtt), 2 * FAR)
        seconds = min(max(reading - (sent + rtt / 2), -FAR), FAR)
        offset = Offset(seconds, rtt / 2, self._monotonic())
        samples = self._samples.get(peer)
        if samples is None:
            samples = self._samples[peer] = deque(maxlen=self._keep)
        samples.append(offset)

    def offset(self, peer: str) -> Offset | None:
        """The best fresh estimate of ``peer``'s clock (the shortest round trip), or ``None``."""
        samples = self._samples.get(peer)
        if not samples:
            return None
        oldest = self._monotonic() - self._fresh
        fresh = [s for s in samples if s.at >= oldest]
        return min(fresh, key=lambda s: s.error) if fresh else None

    def offsets(self) -> dict[str, Offset]:
        """The best fresh estimate of every peer that has one."""
        found = {peer: self.offset(peer) for peer in list(self._samples)}
        for peer in [p for p, o in found.items() if o is None]:
            del self._samples[peer]  # nothing fresh: forgotten until it is measured again
        return {p: o for p, o in found.items() if o is not None}

    def forget(self, peer: str) -> None:
        """Drop ``peer``'s samples (it left the ring)."""
        self._samples.pop(peer, None)

    def skew(self, among: Iterable[str] | None = None, *, bound: float | None = None) -> Skew:
        """This node's :class:`Skew` against its measured peers (only those in ``among``, if given),
        judged by ``bound`` (the fence's by default)."""
        bound = self.bound if bound is None else bound
        offsets = self.offsets()
        if among is not None:
            wanted = set(among)
            offsets = {p: o for p, o in offsets.items() if p in wanted}
        far = sum(1 for o in offsets.values() if abs(o.seconds) - o.error > bound)
        if not offsets:
            return Skew(0.0, 0.0, 0, 0, bound)
        # the ring's clock: the median of every process measured, this one at offset 0
        ring = statistics.median([0.0, *(o.seconds for o in offsets.values())])
        error = max(o.error for o in offsets.values())
        return Skew(-ring, error, len(offsets), far, bound)

    def monitor(self, call: Call) -> Call:
        """``call`` that samples the answers of :data:`CLOCKED` methods, which carry a ``clock``; any
        other call is ``call``'s own awaitable, not wrapped (the hot path of every read and write)."""

        async def sampled(address: str, method: str, payload: dict[str, Any], timeout: float) -> Any:
            sent, started = self.wall(), self._monotonic()
            answer = await call(address, method, payload, timeout)
            if type(answer) is dict:
                reading = readable(answer.get("clock"))
                if reading is not None:
                    self.sample(address, sent, self._monotonic() - started, reading)
            return answer

        def clocked(address: str, method: str, payload: dict[str, Any], timeout: float) -> Awaitable[Any]:
            if method in CLOCKED:
                return sampled(address, method, payload, timeout)
            return call(address, method, payload, timeout)  # type: ignore[no-any-return]

        return clocked


class Fence:
    """Whether this node is fenced for its clock: :meth:`update` takes a fresh :class:`Skew` (a node
    runs it every few tenths of a second), logs each change once, and calls ``on_lifted`` when the
    fence lifts (the hybrid clock forgets stamps ahead of the wall clock). A fenced node is judged
    by the lower bound of :data:`LIFT_FRACTION` until the fence lifts.

    ``name`` is what the log lines call this node; ``lift`` is the lower bound (seconds; 7/8 of the
    fence's bound, :data:`LIFT_FRACTION` of ``max_clock_skew``, by default).
    """

    def __init__(
        self,
        clocks: PeerClocks,
        *,
        name: object = "node",
        on_lifted: Callable[[], None] = lambda: None,
        lift: float | None = None,
    ) -> None:
        self.clocks = clocks
        self.name = name
        self.on_lifted = on_lifted
        self.lift = round(clocks.bound * LIFT_FRACTION / FENCE_FRACTION, 6) if lift is None else lift
        self.skew = Skew(0.0, 0.0, 0, 0, clocks.bound)
        """The last :class:`Skew` measured."""
        self.fenced: ClockFencedError | None = None
        """The error client operations get while fenced; ``None`` when not fenced."""

    def update(self, among: Iterable[str] | None = None) -> Skew:
        """Measure again against the peers in ``among`` (all measured peers if ``None``)."""
        among = None if among is None else list(among)
        skew = self.skew = self.clocks.skew(among)
        if self.fenced is not None:  # judged by the lower bound until it lifts; shown by the fence's
            skew = replace(skew, far=self.clocks.skew(among, bound=self.lift).far)
        if skew.fenced and self.fenced is None:
            log.warning(
                "%s: fenced: %s; it stamps no versions and serves no reads or writes until its clock is "
                "back within the bound",
                self.name,
                skew.describe(),
            )
        elif not skew.fenced and self.fenced is not None:
            log.warning("%s: the fence lifted: %s; it serves again", self.name, skew.describe())
            self.on_lifted()
        self.fenced = fenced_error(skew) if skew.fenced else None
        return skew

    def error(self) -> ClockFencedError:
        """A fresh error for a client operation refused while fenced (one per operation: an exception
        raised again carries every earlier raise's traceback)."""
        return fenced_error(self.skew)


def fenced_error(skew: Skew, joining: str | None = None) -> ClockFencedError:
    """The error of a node fenced with ``skew``, or of a joiner through seed ``joining`` refused so."""
    if joining is None:
        message = f"{skew.describe()}: it serves no reads or writes until its clock is back within the bound"
    else:
        side = "ahead of" if skew.ahead >= 0 else "behind"
        message = (
            f"this node's clock is {abs(skew.ahead):.1f} s {side} the ring's (+-{skew.error:.1f} s, "
            f"measured through {joining}), beyond the bound of {skew.bound:g} s "
            f"({FENCE_FRACTION:g} of --max-clock-skew): set its clock right (NTP) and start it again"
        )
    return ClockFencedError(message, ahead=skew.ahead, error=skew.error, bound=skew.bound)
