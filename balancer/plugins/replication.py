"""Replication strategies: ``successor`` (the owner and the nodes after it), ``multi-ring`` (N independent
places on the ring) and ``groups`` (replication groups of processes along the ring)."""

from __future__ import annotations

from collections.abc import Callable
from hashlib import blake2b

from balancer.config import Config
from balancer.errors import ConfigError
from balancer.hookspecs import Placement, ReplicationFactory, ReplicationStrategy, hookimpl
from balancer.keyspace import KeySpace
from balancer.types import Member, NodeInfo

__all__ = ["Groups", "MultiRing", "SuccessorList"]


class SuccessorList(ReplicationStrategy):
    """Replicas on the key's owner and the next distinct nodes of its successor list (Chord's own)."""


class MultiRing(ReplicationStrategy):
    """Replica i at the successor of ``hash(key, salt=i)``: N independent places on the ring.

    Adjacent nodes often fail together (a rack, a bad deploy); independent positions do not share them.
    """

    def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
        return [space.id(key, salt=i) for i in range(replicas)]


class Groups(ReplicationStrategy):
    """Replication groups (after Rollerchain): the ring's processes form groups of at least ``size``
    consecutive processes, and a key's replicas are its owner's group.

    Processes are ordered along the ring by their first vnode id. A process whose address hashes to a
    multiple of ``size`` starts a run, which lasts up to the next such process. A run of at least
    ``size`` processes anchors a group, together with the shorter runs just before it. So one process
    joining or leaving changes its own group, and at most the next (merging or splitting the two), never
    a group elsewhere on the ring. The replicas are the owner and the
    processes after it in its group (wrapping inside the group); the rest of the group, then the next
    group, stand in when they fail. Every member of a group of exactly N processes holds the same keys:
    the group repairs itself, and the ring only ever moves whole groups' worth of data between them.

    The groups come from the node's view of the members (:meth:`Placement.members`), kept current by a
    survey after every change; a key whose owner that view does not know yet is placed as ``successor``
    places it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._members: tuple[Member, ...] | None = None  # the members view the groups were made from
        self._view: tuple[tuple[int, str], ...] = ()
        self._groups: list[list[str]] = []
        self._group_of: dict[str, int] = {}

    def settings(self) -> dict[str, int | str]:
        return {"size": self.size}

    def leads(self, address: str) -> bool:
        """Whether the process at ``address`` starts a group."""
        digest = blake2b(address.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.size == 0

    def groups(self, members: tuple[Member, ...]) -> list[list[str]]:
        """The live members' groups (addresses in ring order), computed once per view."""
        if members is self._members:  # a node keeps one tuple until its view changes: every placement
            return self._groups  # of a maintenance pass costs one comparison, not a sort
        self._members = members
        view = tuple(
            sorted((min(m.ids), m.address) for m in members if m.ids and m.state in ("up", "suspect"))
        )
        if view != self._view:
            self._view, self._groups = view, self._form([address for _, address in view])
            self._group_of = {a: i for i, group in enumerate(self._groups) for a in group}
        return self._groups

    def _form(self, ring: list[str]) -> list[list[str]]:
        starts = [i for i, address in enumerate(ring) if self.leads(address)]
        if len(ring) <= self.size or not starts:
            return [ring] if ring else []
        ring = ring[starts[0] :] + ring[: starts[0]]  # the first leader first; the ones before it trail
        runs: list[list[str]] = []  # from each leader up to the next
        for address in ring:
            if self.leads(address) or not runs:
                runs.append([address])
            else:
                runs[-1].append(address)
        anchors = [i for i, run in enumerate(runs) if len(run) >= self.size]
        if not anchors:
            return [ring]
        # A run of at least `size` processes anchors a group; the shorter runs just before it (back to
        # the previous anchor, around the ring) join it. Whether a run anchors depends on that run alone,
        # so a change of one process changes its own group, and at most the next one (when its run
        # stops or starts anchoring), never a group further away.
        last = anchors[-1]
        runs = runs[last + 1 :] + runs[: last + 1]  # start just after an anchor: the list ends with one
        groups: list[list[str]] = []
        pending: list[str] = []
        for run in runs:
            pending.extend(run)
            if len(run) >= self.size:
                groups.append(pending)
                pending = []
        return groups

    async def place(self, key: bytes, replicas: int, ring: Placement) -> list[NodeInfo]:
        after = await ring.successors(ring.space.id(key))
        groups = self.groups(ring.members())
        index = self._group_of.get(after[0].address) if after else None
        if index is None:
            return await super().place(key, replicas, ring)
        group = groups[index]
        start = group.index(after[0].address)
        order = group[start:] + group[:start]
        if len(groups) > 1:
            order += groups[(index + 1) % len(groups)]
        return [after[0], *(NodeInfo(0, address) for address in order[1:])]


@hookimpl(trylast=True)
def balancer_register_replications(register: Callable[[str, ReplicationFactory], None]) -> None:
    """Register ``successor``, ``multi-ring`` and ``groups`` (setting: ``groups.size``, at least N)."""

    def successor(config: Config) -> ReplicationStrategy:
        return SuccessorList()

    def multi_ring(config: Config) -> ReplicationStrategy:
        return MultiRing()

    def groups(config: Config) -> ReplicationStrategy:
        raw = config.extra.get("groups", {}).get("size", config.replicas)
        try:
            size = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"groups.size must be a whole number, got {raw!r}") from None
        if not config.replicas <= size <= 64:
            raise ConfigError(f"groups.size must be in [replicas={config.replicas}, 64], got {size}")
        return Groups(size)

    register("successor", successor)
    register("multi-ring", multi_ring)
    register("groups", groups)
