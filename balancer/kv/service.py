"""The key-value service of one process: :class:`KVService` wires its parts and serves their RPCs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from balancer import wire
from balancer.chord import Call
from balancer.config import Config
from balancer.errors import BadRequestError, KeyNotFoundError, TooLargeError
from balancer.hookspecs import ReplicationStrategy, Storage
from balancer.kv.antientropy import AntiEntropy
from balancer.kv.clock import HybridClock
from balancer.kv.coordinator import Coordinator
from balancer.kv.maintenance import Maintainer, Maintenance
from balancer.kv.placement import CachedPlacement, ReplicaSets
from balancer.kv.shared import Shared, pointed
from balancer.kv.transfer import Transfer
from balancer.ring import Ring
from balancer.skew import wall_clock
from balancer.types import Handler, Member, NodeInfo, Record, Version

__all__ = ["KVService"]


class KVService:
    """Key-value operations for one process, on top of its :class:`~balancer.ring.Ring` (the vnodes'
    routing) and its storage. Replica sets are N distinct processes: a process counts once however many
    of its vnodes a key's walk passes.

    ``emit(event, **kwargs)`` reports ring events (``range_moved``) to the plugins.

    The work is done by its parts, which share one :class:`~balancer.kv.shared.Shared`:
    :attr:`replica_sets` (which processes hold a key), :attr:`transfer` (records to and from one node),
    :attr:`coordinator` (quorum reads and writes), :attr:`anti_entropy` (digest exchanges with peers) and
    :attr:`maintainer` (maintenance passes and hand-off).
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
        wall: Callable[[], float] | None = None,
    ) -> None:
        self.ring = ring
        self.config = config
        self.shared = Shared(
            ring,
            storage,
            strategy,
            call,
            config,
            emit=emit or (lambda event, **kwargs: None),
            members=members or functools.partial(pointed, ring),
            trusted=trusted or (lambda: True),
            wall=wall or wall_clock(config.clock_offset, config.clock_drift),
        )
        self.replica_sets = ReplicaSets(self.shared)
        self.transfer = Transfer(self.shared)
        self.coordinator = Coordinator(self.shared, self.replica_sets, self.transfer)
        self.anti_entropy = AntiEntropy(self.shared, self.replica_sets, self.transfer)
        self.maintainer = Maintainer(
            self.shared, self.replica_sets, self.transfer, self.coordinator, self.anti_entropy
        )

    # -- what the parts share ---------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """This process's storage."""
        return self.shared.storage

    @storage.setter
    def storage(self, storage: Storage) -> None:
        self.shared.storage = storage

    @property
    def strategy(self) -> ReplicationStrategy:
        """The replication strategy that places keys' replicas."""
        return self.shared.strategy

    @strategy.setter
    def strategy(self, strategy: ReplicationStrategy) -> None:
        self.shared.strategy = strategy

    @property
    def clock(self) -> HybridClock:
        """The clock that stamps the writes this node coordinates."""
        return self.shared.clock

    @clock.setter
    def clock(self, clock: HybridClock) -> None:
        self.shared.clock = clock

    @property
    def wall(self) -> Callable[[], float]:
        """This node's wall clock (seconds since the epoch)."""
        return self.shared.wall

    @property
    def slice(self) -> float:
        """Longest a maintenance loop works before it yields to the event loop (seconds)."""
        return self.shared.slice

    @slice.setter
    def slice(self, seconds: float) -> None:
        self.shared.slice = seconds

    @property
    def leaving(self) -> bool:
        """Set when the node starts leaving: it stores no more writes, so none can miss the hand-off."""
        return self.transfer.leaving

    @property
    def synced(self) -> bool:
        """See :attr:`~balancer.kv.shared.Shared.synced`."""
        return self.shared.synced

    @property
    def settled(self) -> bool:
        """See :attr:`~balancer.kv.shared.Shared.settled`."""
        return self.shared.settled

    def unsettle(self) -> None:
        """See :meth:`~balancer.kv.shared.Shared.unsettle`."""
        self.shared.unsettle()

    def mark_settled(self) -> None:
        """See :meth:`~balancer.kv.shared.Shared.mark_settled`."""
        self.shared.mark_settled()

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

    async def read(self, key: bytes) -> Record | None:
        """See :meth:`~balancer.kv.coordinator.Coordinator.read`."""
        return await self.coordinator.read(key)

    async def write(self, key: bytes, value: bytes | None) -> Version:
        """See :meth:`~balancer.kv.coordinator.Coordinator.write`."""
        return await self.coordinator.write(key, value)

    async def replica_set(
        self, key: bytes, placement: CachedPlacement | None = None
    ) -> tuple[list[NodeInfo], list[NodeInfo]]:
        """See :meth:`~balancer.kv.placement.ReplicaSets.replica_set`."""
        return await self.replica_sets.replica_set(key, placement)

    # -- maintenance, leaving and closing ---------------------------------------------------------

    async def maintain(self) -> Maintenance:
        """See :meth:`~balancer.kv.maintenance.Maintainer.maintain`."""
        return await self.maintainer.maintain()

    async def hand_off_all(self, successors: Iterable[NodeInfo]) -> int:
        """See :meth:`~balancer.kv.maintenance.Maintainer.hand_off_all`."""
        return await self.maintainer.hand_off_all(successors)

    async def quiesce(self) -> None:
        """See :meth:`~balancer.kv.transfer.Transfer.quiesce`."""
        await self.transfer.quiesce()

    async def drain(self) -> None:
        """See :meth:`~balancer.kv.coordinator.Coordinator.drain`."""
        await self.coordinator.drain()

    def cancel_background(self) -> None:
        """See :meth:`~balancer.kv.coordinator.Coordinator.cancel_background`."""
        self.coordinator.cancel_background()

    def peer_back(self, address: str) -> None:
        """``address`` joined (again): its failures are worth warnings again."""
        self.shared.warnings.back(address)

    def forget_peer(self, address: str, *, left: bool = False) -> None:
        """See :meth:`~balancer.kv.transfer.Transfer.forget_peer`; a peer that ``left`` the ring
        gracefully is no cause for warnings (see :class:`~balancer.kv.shared.PeerWarnings`)."""
        self.transfer.forget_peer(address)
        if left:
            self.shared.warnings.departed(address)

    # -- RPC handlers -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this service adds to the node, by name."""
        limits = self.shared.limits
        return {
            "kv.read_many": wire.serve(wire.ReadMany, self.transfer.rpc_read_many, limits),
            "kv.store": wire.serve(wire.Store, self.transfer.rpc_store, limits),
            "kv.digests": wire.serve(wire.Digests, self.anti_entropy.rpc_digests, limits),
            "kv.compare": wire.serve(wire.Compare, self.anti_entropy.rpc_compare, limits),
        }
