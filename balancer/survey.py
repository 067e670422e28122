"""A survey of the ring: every process, found by asking each one what it holds and whom it points to.

``ring.describe`` answers with a process's vnode ids, each vnode's successor list, the other processes
it points to, its weight, record count and whether it is leaving. Starting anywhere and following those
pointers reaches every process of a connected ring in one message per process; the sorted ids then give
each process's exact share of the key space, and comparing each reported successor list with the one the
sorted ring implies tells whether the ring has settled.

Why a survey rather than gossip: it is exact when it returns, needs no protocol state of its own, and
costs messages only when someone asks (``GET /ring``) or the membership changed; gossip would keep a
second, eventually consistent view running all the time. Its cost is one message per process, so a node
repeats it only after a change and at a long interval.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from balancer import wire
from balancer.errors import BalancerError, PeerUnreachableError
from balancer.failure import FailureDetector
from balancer.keyspace import KeySpace
from balancer.types import Member, NodeInfo, Payload, format_id
from balancer.vnodes import ownership

if TYPE_CHECKING:
    from balancer.chord import Chord

__all__ = ["RingStatus", "exact", "expected_successors", "status_of", "survey"]

Describe = Callable[[str], Awaitable[wire.Described]]


@dataclass(frozen=True, slots=True)
class RingStatus:
    """The ring as one survey found it: every process known, and whether the ring has settled (every
    successor list that answered is exactly what the ring's ids imply)."""

    members: tuple[Member, ...]
    settled: bool

    def to_json(self, bits: int = 64) -> Payload:
        """The JSON form served at ``GET /ring``."""
        return {
            "settled": self.settled,
            "processes": len(self.members),
            "vnodes": sum(len(m.ids) for m in self.members),
            "members": [
                {
                    "address": m.address,
                    "state": m.state,
                    "vnodes": len(m.ids),
                    "weight": m.weight,
                    "records": m.records,
                    "share": m.share,
                    "fenced": m.fenced,
                    "ids": [format_id(i, bits) for i in m.ids],
                }
                for m in self.members
            ],
        }


async def survey(
    describe: Describe, start: Iterable[str], *, concurrency: int = 16, most: int = 4096
) -> tuple[dict[str, wire.Described], dict[str, BalancerError]]:
    """Ask every process reachable from ``start`` to describe itself (at most ``most`` processes,
    ``concurrency`` at a time). Returns the answers and the errors of those that did not answer."""
    found: dict[str, wire.Described] = {}
    failed: dict[str, BalancerError] = {}
    queued = list(dict.fromkeys(start))
    seen = set(queued)
    while queued:
        wave, queued = queued[:concurrency], queued[concurrency:]
        answers = await asyncio.gather(*(describe(a) for a in wave), return_exceptions=True)
        for address, answer in zip(wave, answers, strict=True):
            if isinstance(answer, BalancerError):
                failed[address] = answer
                continue
            if isinstance(answer, BaseException):
                raise answer
            found[address] = answer
            for neighbour in answer.neighbours:
                if neighbour not in seen and len(seen) < most:
                    seen.add(neighbour)
                    queued.append(neighbour)
    return found, failed


def expected_successors(ids: list[int], owners: Mapping[int, str], ident: int, r: int) -> list[int]:
    """The successor list the sorted ring ``ids`` implies for vnode ``ident``: the next ids of r
    distinct processes, stopping when the walk comes back to ``ident``."""
    start = bisect.bisect_right(ids, ident)
    walk: list[int] = []
    named: set[str] = set()
    for step in range(len(ids)):
        after = ids[(start + step) % len(ids)]
        if after == ident:
            break
        if owners[after] not in named:
            named.add(owners[after])
            walk.append(after)
            if len(walk) == r:
                break
    return walk or [ident]


def exact(vnodes: Iterable[Chord]) -> bool:
    """Whether every one of ``vnodes`` (all the vnodes of a ring, from every process) has exactly the
    predecessor and successor list that their sorted ids imply: the ring has settled. Tests and
    simulations that hold every node check this directly; a live ring is surveyed instead."""
    by_id = {v.info.id: v for v in vnodes}
    owners = {ident: v.info.address for ident, v in by_id.items()}
    ids = sorted(owners)
    for i, ident in enumerate(ids):
        vnode = by_id[ident]
        walk = expected_successors(ids, owners, ident, vnode.r)
        if vnode.successors != [NodeInfo(j, owners[j]) for j in walk]:
            return False
        if len(ids) > 1 and vnode.predecessor != NodeInfo(ids[i - 1], owners[ids[i - 1]]):
            return False
    return True


def status_of(
    found: Mapping[str, wire.Described],
    failed: Mapping[str, BalancerError],
    space: KeySpace,
    r: int,
    *,
    detector: FailureDetector | None = None,
    remembered: Iterable[Member] = (),
    pointed: Iterable[str] = (),
) -> RingStatus:
    """The :class:`RingStatus` of a survey. Processes that did not answer, and ``remembered`` ones (from
    earlier surveys) that nobody names any more, are listed as down; they own nothing, since their
    successors took their ranges over. One that did not answer in time but that the routing state still
    points to (``pointed``: it is not declared failed) is only suspect: slow is not dead."""
    owners = {ident: d.address for d in found.values() for ident, _ in d.vnodes}
    shares = ownership(owners, space) if owners else {}
    ids = sorted(owners)
    settled = bool(ids) and all(
        list(after) == expected_successors(ids, owners, ident, r)
        for described in found.values()
        for ident, after in described.vnodes
    )
    members: dict[str, Member] = {}
    for address, described in found.items():
        state = "leaving" if described.leaving else "up"
        if state == "up" and detector is not None and detector.suspect(address):
            state = "suspect"
        members[address] = Member(
            address,
            tuple(sorted(i for i, _ in described.vnodes)),
            described.weight,
            state,
            described.records,
            shares.get(address, 0) / space.size,
            described.fenced,
        )
    earlier = {m.address: m for m in remembered}
    still = set(pointed)
    for address in [*failed, *earlier]:
        if address in members:
            continue
        exc = failed.get(address)
        refused = isinstance(exc, PeerUnreachableError) and exc.refused
        only_suspect = address in still or (
            detector is not None and detector.suspect(address) and not detector.failed(address)
        )
        before = earlier.get(address)
        members[address] = Member(
            address,
            before.ids if before else (),
            before.weight if before else 1.0,
            "suspect" if only_suspect and not refused else "down",
            None,
            0.0,
        )
    return RingStatus(tuple(members[a] for a in sorted(members)), settled)
