"""Consistent hashing with bounded loads, overflowing by random jumps.

Each node owns a number of points on a 64-bit ring (its virtual nodes, proportional to its weight).
A key's first choice is the node owning the first point at or after the key's hash. A node may hold at
most ``ceil(c * (m + 1) * w_i / W)`` loads, where ``m`` is the current total load, ``w_i`` its weight,
``W`` the sum of weights and ``c > 1`` the load factor. When the first choice is full, the next
candidate is the successor of ``hash(key, attempt)`` for ``attempt = 1, 2, ...``: a random jump, so
the keys a full node turns away spread over the whole ring instead of piling onto its neighbour (which
is what linear probing does, and why it cascades). The jump sequence is a pure function of the key, so a
key lands on the same node while loads allow. After ``max_jumps`` jumps the search walks the ring from
the last jump, which always finds room: the capacities add up to more than the total load.

Capacities shrink when a load is released or a node joins; the balancer then moves the fewest keys
needed to keep every node within its capacity, and reports each move.

This module is pure: no I/O, no event loop, nothing from the rest of balancer but errors and keyspace.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from hashlib import blake2b
from typing import Literal

from balancer.errors import (
    CapacityError,
    ConfigError,
    NoNodesError,
    NotAcquiredError,
    UnknownNodeError,
)
from balancer.keyspace import Key, to_bytes

__all__ = ["DEFAULT_LOAD_FACTOR", "BoundedLoadBalancer", "Lease", "Move", "parse_load_factor"]

DEFAULT_LOAD_FACTOR = 1.25
"""The load factor HAProxy and Envoy ship with (``hash-balance-factor 125``)."""

Probing = Literal["random", "linear"]


@dataclass(frozen=True, slots=True)
class Lease:
    """One unit of load that ``key`` holds on ``node``; give it back with ``release(lease)``."""

    key: Key
    node: str


@dataclass(frozen=True, slots=True)
class Move:
    """One unit of ``key``'s load, moved from ``source`` to ``target`` to keep capacities."""

    key: Key
    source: str
    target: str


def parse_load_factor(value: float | str | Fraction) -> Fraction | None:
    """Read a load factor: ``1.25``, ``"1.25"``, the percentage forms ``125`` and ``"125%"``, or infinity.

    Numbers of 100 and more are percentages, as HAProxy and Envoy write them. Returns the factor as an
    exact fraction, or ``None`` for infinity (plain consistent hashing). Raises :class:`ConfigError`
    unless the factor is greater than 1.
    """
    if isinstance(value, bool):
        raise ConfigError("load factor must be a number, not a bool")
    try:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in {"inf", "infinity", "+inf"}:
                return None
            factor = Fraction(text[:-1]) / 100 if text.endswith("%") else Fraction(text)
        elif isinstance(value, float):
            if math.isinf(value) and value > 0:
                return None
            # repr gives the decimal the caller wrote: 1.1 means 11/10, not the nearest binary float
            factor = Fraction(repr(value))
        else:
            factor = Fraction(value)
    except (ValueError, ZeroDivisionError, TypeError) as exc:
        raise ConfigError(f"invalid load factor {value!r}") from exc
    if factor >= 100:
        factor /= 100
    if factor <= 1:
        raise ConfigError(f"load factor must be greater than 1 (or 100%), got {value!r}")
    return factor


def _weight(value: float) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise ConfigError(f"weight must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"weight must be finite, got {value!r}")
    weight = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    if weight <= 0:
        raise ConfigError(f"weight must be positive, got {value!r}")
    return weight


class _Member:
    """A node's mutable state; the ring holds references to these, so lookups need no name mapping."""

    __slots__ = ("den", "keys", "load", "name", "num", "points", "weight")

    def __init__(self, name: str, weight: Fraction, points: list[int]) -> None:
        self.name = name
        self.weight = weight
        self.points = points
        # capacity = ceil(num * (m + 1) / den), with num/den = c * weight / total weight
        self.num = 1
        self.den = 0
        self.load = 0
        self.keys: dict[Key, int] = {}


class _Ring:
    """Sorted ring points and their owners, with a bucket table that narrows each binary search.

    ``table[b]`` is the index of the first point at or above ``b << shift``, so a lookup bisects only
    the few points of one bucket. The owner list has one extra entry, the first owner again, so the
    index one past the last point wraps around with no branch.
    """

    __slots__ = ("owners", "points", "shift", "table")

    def __init__(self, points: list[int], owners: list[_Member]) -> None:
        self.points = points
        self.owners = [*owners, owners[0]] if owners else []
        bits = max(1, len(points).bit_length())
        self.shift = 64 - bits
        self.table = [bisect_left(points, b << self.shift) for b in range((1 << bits) + 1)]

    def successor(self, h: int) -> int:
        """Index of the first point at or after ``h``, wrapping to 0 past the top."""
        b = h >> self.shift
        i = bisect_left(self.points, h, self.table[b], self.table[b + 1])
        return i if i < len(self.points) else 0


_SALTS = tuple(i.to_bytes(16, "little") for i in range(1024))


class BoundedLoadBalancer:
    """Consistent hashing with bounded loads: map keys to nodes so that no node exceeds its capacity.

    ``nodes`` is an iterable of names (weight 1 each) or a mapping of name to weight. ``load_factor``
    (``c``) must exceed 1; ``math.inf`` gives plain consistent hashing. ``vnodes`` is the number of ring
    points per unit of weight. ``probing="linear"`` replaces random jumps with the classic walk to the
    next node on the ring, kept for comparison. All methods are thread-safe; ``peek`` takes no lock.
    """

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, float] = (),
        *,
        load_factor: float | str | Fraction = DEFAULT_LOAD_FACTOR,
        vnodes: int = 100,
        probing: Probing = "random",
        max_jumps: int = 16,
    ) -> None:
        if probing not in ("random", "linear"):
            raise ConfigError(f"probing must be 'random' or 'linear', got {probing!r}")
        if not 1 <= vnodes <= 10_000:
            raise ConfigError(f"vnodes must be in [1, 10000], got {vnodes}")
        if not 0 <= max_jumps < len(_SALTS):
            raise ConfigError(f"max_jumps must be in [0, {len(_SALTS) - 1}], got {max_jumps}")
        self._factor = parse_load_factor(load_factor)
        self._vnodes = vnodes
        self._probing: Probing = probing
        self._max_jumps = max_jumps
        self._lock = threading.RLock()
        self._members: dict[str, _Member] = {}
        # The ring is replaced whole on every change, so lock-free readers see a consistent snapshot.
        self._ring = _Ring([], [])
        self._total = 0
        self._where: dict[Key, list[_Member]] = {}
        # members grouped by capacity coefficient: one capacity computation per group
        self._classes: dict[tuple[int, int], list[_Member]] = {}
        weighted = nodes.items() if isinstance(nodes, Mapping) else ((n, 1) for n in nodes)
        for name, weight in weighted:
            self._insert(name, weight)
        self._rebuild()

    # -- membership -------------------------------------------------------------------------------

    @property
    def load_factor(self) -> float:
        """The load factor ``c`` (``math.inf`` for plain consistent hashing)."""
        return math.inf if self._factor is None else float(self._factor)

    @property
    def nodes(self) -> list[str]:
        """Member names, in the order they were added."""
        return list(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, node: object) -> bool:
        return node in self._members

    def weight(self, node: str) -> float:
        """The weight of ``node``; raises :class:`UnknownNodeError`."""
        return float(self._member(node).weight)

    def add_node(self, node: str, weight: float = 1) -> list[Move]:
        """Add ``node`` with ``weight``; returns the moves made because the other capacities shrank.

        Raises :class:`ConfigError` if the node exists or the weight is not positive.
        """
        with self._lock:
            self._insert(node, weight)
            self._rebuild()
            return self._shed(self._members.values())

    def remove_node(self, node: str) -> list[Move]:
        """Remove ``node``; the load it held is placed on other nodes and reported as moves.

        If no node is left, that load is dropped and no moves are reported.
        Raises :class:`UnknownNodeError`.
        """
        with self._lock:
            member = self._member(node)
            del self._members[node]
            self._rebuild()
            held = list(member.keys.items())
            for key, count in held:
                for _ in range(count):
                    self._unassign(key, member)
            if not self._members:
                return []
            moves = []
            for key, count in held:
                for _ in range(count):
                    target = self._assign(key, ())
                    moves.append(Move(key, node, target.name))
            return moves

    # -- loads ------------------------------------------------------------------------------------

    @property
    def total_load(self) -> int:
        """The sum of all loads (``m`` in the capacity rule)."""
        return self._total

    def loads(self) -> dict[str, int]:
        """A snapshot of each node's load."""
        with self._lock:
            return {name: member.load for name, member in self._members.items()}

    def keys_on(self, node: str) -> list[Key]:
        """The keys holding load on ``node`` (each once, oldest first); raises :class:`UnknownNodeError`."""
        with self._lock:
            return list(self._member(node).keys)

    def capacity(self, node: str) -> float:
        """The most load ``node`` may hold now: ``ceil(c * (m + 1) * w / W)``; ``inf`` when unbounded.

        A node is full when its load reaches this; raises :class:`UnknownNodeError`.
        """
        member = self._member(node)
        if self._factor is None:
            return math.inf
        return -(-member.num * (self._total + 1) // member.den)

    def peek(self, key: Key) -> str:
        """The node ``acquire(key)`` would return now, without counting a load.

        Raises :class:`NoNodesError` if there are no nodes.
        """
        data = key.encode() if type(key) is str else to_bytes(key)
        ring = self._ring
        if not ring.owners:
            raise NoNodesError("the balancer has no nodes")
        h = int.from_bytes(blake2b(data, digest_size=8).digest())
        b = h >> ring.shift
        member = ring.owners[bisect_left(ring.points, h, ring.table[b], ring.table[b + 1])]
        if self._factor is None or member.load * member.den < member.num * (self._total + 1):
            return member.name
        return self._place(data, ()).name

    def acquire(self, key: Key, *, exclude: Collection[str] = ()) -> str:
        """Count one load for ``key`` on the node that takes it, and return that node's name.

        ``exclude`` names nodes the key must not go to (for example, one that just failed a request).
        Raises :class:`NoNodesError` with no nodes, and :class:`CapacityError` if every node not
        excluded is full.
        """
        with self._lock:
            return self._assign(key, exclude).name

    def release(self, key_or_lease: Key | Lease) -> list[Move]:
        """Give back one unit of load taken by ``acquire`` (a key) or ``lease`` (a :class:`Lease`).

        Returns the moves made because capacities shrank with the total load. Raises
        :class:`NotAcquiredError` if the key holds no load.
        """
        with self._lock:
            if isinstance(key_or_lease, Lease):
                key, preferred = key_or_lease.key, key_or_lease.node
            else:
                key, preferred = key_or_lease, None
            holders = self._where.get(key)
            if not holders:
                raise NotAcquiredError(key)
            member = holders[-1]
            if preferred is not None:
                member = next((m for m in reversed(holders) if m.name == preferred), member)
            self._unassign(key, member)
            if self._factor is None:
                return []
            # Capacities never grow as m falls: only classes whose capacity just dropped need a look.
            t = self._total + 1
            suspects = [
                m
                for (num, den), members in self._classes.items()
                if -(-num * t // den) < -(-num * (t + 1) // den)
                for m in members
            ]
            return self._shed(suspects)

    @contextmanager
    def lease(self, key: Key, *, exclude: Collection[str] = ()) -> Iterator[Lease]:
        """Hold one unit of load for ``key`` for the duration of a ``with`` block, released on any exit."""
        lease = Lease(key, self.acquire(key, exclude=exclude))
        try:
            yield lease
        finally:
            self.release(lease)

    def candidates(self, key: Key) -> Iterator[str]:
        """Every node in the order ``key`` tries them, whatever the loads: first choice, jumps, walk.

        Useful to retry a failed request on the next node in the key's own order.
        """
        data = to_bytes(key)
        ring = self._ring
        seen: set[str] = set()
        for i in self._probe(data, ring):
            name = ring.owners[i].name
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._members):
                    return

    # -- internals (callers hold the lock) --------------------------------------------------------

    def _member(self, node: str) -> _Member:
        try:
            return self._members[node]
        except KeyError:
            raise UnknownNodeError(node) from None

    def _insert(self, name: str, weight: float) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"node names are non-empty strings, got {name!r}")
        if name in self._members:
            raise ConfigError(f"node {name!r} is already a member")
        w = _weight(weight)
        count = max(1, round(self._vnodes * w))
        points = [
            int.from_bytes(blake2b(f"{name}#{j}".encode(), digest_size=8).digest()) for j in range(count)
        ]
        self._members[name] = _Member(name, w, points)

    def _rebuild(self) -> None:
        pairs = sorted(
            ((p, m.name, m) for m in self._members.values() for p in m.points),
            key=lambda pair: pair[:2],
        )
        self._ring = _Ring([p for p, _, _ in pairs], [m for _, _, m in pairs])
        total_weight = sum((m.weight for m in self._members.values()), Fraction(0))
        factor = self._factor if self._factor is not None else Fraction(1)
        self._classes = {}
        for member in self._members.values():
            share = factor * member.weight / total_weight
            member.num, member.den = share.numerator, share.denominator
            self._classes.setdefault((share.numerator, share.denominator), []).append(member)

    def _probe(self, data: bytes, ring: _Ring) -> Iterator[int]:
        """Ring indices in the order a key tries them; ends after one full walk of the ring."""
        n = len(ring.points)
        if not n:
            return
        i = ring.successor(int.from_bytes(blake2b(data, digest_size=8).digest()))
        yield i
        if self._probing == "random":
            for attempt in range(1, self._max_jumps + 1):
                i = ring.successor(
                    int.from_bytes(blake2b(data, digest_size=8, salt=_SALTS[attempt]).digest())
                )
                yield i
        for step in range(1, n):
            yield (i + step) % n

    def _place(self, data: bytes, exclude: Collection[str]) -> _Member:
        """The first member in the key's probe order that is not excluded and has room."""
        ring = self._ring
        t = self._total + 1
        for i in self._probe(data, ring):
            member = ring.owners[i]
            if member.name not in exclude and self._has_room(member, t):
                return member
        raise CapacityError(f"every node not excluded ({sorted(exclude)}) is at capacity")

    def _has_room(self, member: _Member, t: int) -> bool:
        """``load < ceil(x)`` is ``load < x`` for an integer load, so no division is needed."""
        return self._factor is None or member.load * member.den < member.num * t

    def _assign(self, key: Key, exclude: Collection[str]) -> _Member:
        data = key.encode() if type(key) is str else to_bytes(key)
        ring = self._ring
        if not ring.owners:
            raise NoNodesError("the balancer has no nodes")
        h = int.from_bytes(blake2b(data, digest_size=8).digest())
        b = h >> ring.shift
        member = ring.owners[bisect_left(ring.points, h, ring.table[b], ring.table[b + 1])]
        if exclude or not self._has_room(member, self._total + 1):
            member = self._place(data, exclude)
        member.load += 1
        member.keys[key] = member.keys.get(key, 0) + 1
        self._total += 1
        holders = self._where.get(key)
        if holders is None:
            self._where[key] = [member]
        else:
            holders.append(member)
        return member

    def _unassign(self, key: Key, member: _Member) -> None:
        holders = self._where[key]
        holders.reverse()
        holders.remove(member)  # the most recent unit on this member
        holders.reverse()
        if not holders:
            del self._where[key]
        count = member.keys[key] - 1
        if count:
            member.keys[key] = count
        else:
            del member.keys[key]
        member.load -= 1
        self._total -= 1

    def _shed(self, suspects: Iterable[_Member]) -> list[Move]:
        """Move load off any of ``suspects`` above capacity, newest keys first, until none is."""
        if self._factor is None:
            return []
        moves = []
        for member in suspects:
            # load > ceil(x) is (load - 1) >= x for an integer load
            while (member.load - 1) * member.den >= member.num * (self._total + 1):
                key = next(reversed(member.keys))
                self._unassign(key, member)
                target = self._assign(key, (member.name,))
                moves.append(Move(key, member.name, target.name))
        return moves
