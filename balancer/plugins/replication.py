"""Replication strategies: ``successor`` (the owner and the nodes after it) and ``multi-ring``."""

from __future__ import annotations

from collections.abc import Callable

from balancer.config import Config
from balancer.hookspecs import ReplicationFactory, ReplicationStrategy, hookimpl
from balancer.keyspace import KeySpace

__all__ = ["MultiRing", "SuccessorList"]


class SuccessorList(ReplicationStrategy):
    """Replicas on the key's owner and the next distinct nodes of its successor list (Chord's own)."""

    def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
        return [space.id(key)]


class MultiRing(ReplicationStrategy):
    """Replica i at the successor of ``hash(key, salt=i)``: N independent places on the ring.

    Adjacent nodes often fail together (a rack, a bad deploy); independent positions do not share them.
    """

    def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
        return [space.id(key, salt=i) for i in range(replicas)]


@hookimpl(trylast=True)
def balancer_register_replications(register: Callable[[str, ReplicationFactory], None]) -> None:
    """Register ``successor`` and ``multi-ring``."""

    def successor(config: Config) -> ReplicationStrategy:
        return SuccessorList()

    def multi_ring(config: Config) -> ReplicationStrategy:
        return MultiRing()

    register("successor", successor)
    register("multi-ring", multi_ring)
