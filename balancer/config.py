"""One typed configuration object for a node and every plugin it loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from balancer.errors import ConfigError

__all__ = ["PROTOCOL_VERSION", "Config"]

PROTOCOL_VERSION = 3
"""Bumped whenever two nodes of different versions could not share a ring."""


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of one node; plugins read theirs from here, never from the environment.

    Times are in seconds, sizes in bytes. Invalid values raise :class:`ConfigError` on construction.
    """

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one."""
    address: str | None = None
    """Host name other nodes use to reach this one (``--address``); defaults to ``host``."""
    bits: int = 64
    """Size m of the identifier space: ids are m-bit integers."""
    successors: int = 8
    """Length r of the successor list; the ring survives r - 1 adjacent failures."""
    stabilize_interval: float = 0.5
    """Mean period of stabilize + notify."""
    fix_fingers_interval: float = 1.0
    """Mean period of one finger-table refresh pass."""
    check_predecessor_interval: float = 1.0
    """Mean period of the predecessor liveness check."""
    jitter: float = 0.25
    """Each period is drawn uniformly within +-jitter of its mean, so nodes do not act in lockstep."""
    rpc_timeout: float = 1.0
    """Timeout of one inter-node call; a peer that misses it is treated as failed for that call."""
    transport: str = "stream"
    """Name of the transport plugin: ``stream`` (ring RPCs over persistent connections, the public API over
    HTTP), ``aiohttp`` (everything over HTTP), ``local`` (in-process), or a third-party one."""
    storage: str = "memory"
    """Name of the storage plugin (``memory``, ``sqlite``)."""
    data_dir: str | None = None
    """Folder of a durable storage's files (``--data-dir``); setting it selects ``sqlite`` from the CLI."""
    replication: str = "successor"
    """Name of the replication strategy (``successor``, ``multi-ring``)."""
    replicas: int = 3
    """Replication factor N: how many distinct nodes hold each key."""
    write_quorum: int = 2
    """W: a write is acknowledged only after W replicas stored it."""
    read_quorum: int = 2
    """R: a read asks R replicas and returns the newest version; R + W > N gives read-your-writes."""
    tombstone_grace: float = 86400.0
    """Seconds a tombstone is kept before it is collected; a replica away longer may resurrect a key."""
    anti_entropy_interval: float = 5.0
    """Mean period of the replica maintenance pass (hand-off, repair, digest comparison)."""
    survey_interval: float = 30.0
    """Mean period of a survey of the whole ring (one message per process) that keeps
    :meth:`~balancer.node.Node.members` current; a change this node sees triggers one sooner."""
    cluster_secret: str | None = None
    """Shared secret: inter-node RPCs carry an HMAC of the method, destination, body, timestamp and nonce,
    checked on arrival."""
    api_token: str | None = None
    """Bearer token required by the public ``/kv`` and ``/status`` API. Without a ``cluster_secret``, RPCs
    are signed with a key derived from it, so the token never leaves the RPC path open."""
    max_clock_skew: float = 60.0
    """Seconds a signed RPC's timestamp may differ from the receiver's clock, and how far ahead of this
    node's clock a record's version may be stamped (a record further ahead is refused, never adopted)."""
    partition_memory: float = 600.0
    """Seconds a member declared failed (by silence, not by a refused connection) keeps counting as a
    ring member that this node cannot see: a node that sees no majority of the members up (counting
    those, and peers silent for two ``rpc_timeout``) answers reads and writes with 503, so the minority
    side of a partition stops taking writes. Past it, the failed member is assumed gone for good."""
    clock_offset: float = 0.0
    """For fault tests only: seconds added to this node's wall clock (versions, tombstone ages), to run a
    node with a skewed clock on a machine whose clocks agree."""
    clock_drift: float = 0.0
    """For fault tests only: seconds per second this node's wall clock gains from its start (negative:
    loses), to run a node whose clock drifts away from the ring's while it is a member."""
    tls_cert: str | None = None
    """Certificate file (PEM) to serve TLS with; needs ``tls_key``."""
    tls_key: str | None = None
    """Private key file (PEM) of ``tls_cert``."""
    tls_ca: str | None = None
    """CA file (PEM) that peers' certificates are verified against; setting it makes calls use TLS and
    turns on mutual TLS: RPCs need a client certificate signed by this CA (or a valid signature)."""
    max_connections: int = 1024
    """Most client connections served at once (lowered to fit the process's open-file limit); a share is
    kept for ring RPCs, and idle connections are closed first when the limit is reached."""
    idle_timeout: float = 30.0
    """Seconds a keep-alive connection may stay idle between requests before it is closed."""
    header_timeout: float = 10.0
    """Seconds a new connection has to send a complete request head before it is closed."""
    fsync: bool = False
    """Durable storage syncs every commit to disk (SQLite ``synchronous=FULL``): an acknowledged write
    then survives a power loss, not only the process being killed."""
    join_timeout: float = 30.0
    """Seconds to keep retrying seeds that do not answer yet (with backoff) before joining fails."""
    phi_threshold: float = 8.0
    """Suspicion level (phi, as in phi-accrual failure detection) at which a silent peer is declared
    failed; a peer that refuses connections is declared failed at once."""
    max_key_bytes: int = 1024
    """Longest key accepted, in UTF-8 bytes."""
    max_value_bytes: int = 1 << 20
    """Largest value accepted."""
    handoff_batch: int = 256
    """Records per hand-off message when keys move between nodes."""
    vnodes: int = 32
    """Virtual nodes: how many ring ids a process of weight 1 holds (``--vnodes``); see ``weight``."""
    weight: float = 1.0
    """Relative size of this process (``--weight``): it holds ``round(vnodes * weight)`` ids and, once
    placed, a share of the keys proportional to its weight."""
    node_id: int | None = None
    """Fix this node's first id instead of placing it (tests and simulations); usually with ``vnodes=1``."""
    load_entrypoints: bool = True
    """Load third-party plugins from the ``balancer`` entry-point group."""
    seed: int | None = None
    """Seed of this node's random choices (jitter); ``None`` for the system's randomness."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Settings of third-party plugins, by plugin name."""

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        require(8 <= self.bits <= 160, f"bits must be in [8, 160], got {self.bits}")
        require(1 <= self.successors <= 64, f"successors must be in [1, 64], got {self.successors}")
        for name in (
            "stabilize_interval",
            "fix_fingers_interval",
            "check_predecessor_interval",
            "rpc_timeout",
        ):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}")
        require(0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}")
        require(1 <= self.replicas <= 16, f"replicas must be in [1, 16], got {self.replicas}")
        require(
            1 <= self.write_quorum <= self.replicas,
            f"write_quorum must be in [1, replicas={self.replicas}], got {self.write_quorum}",
        )
        require(
            1 <= self.read_quorum <= self.replicas,
            f"read_quorum must be in [1, replicas={self.replicas}], got {self.read_quorum}",
        )
        require(self.replicas <= self.successors + 1, "replicas must not exceed successors + 1")
        for name in (
            "tombstone_grace",
            "anti_entropy_interval",
            "survey_interval",
            "max_clock_skew",
            "partition_memory",
            "idle_timeout",
            "header_timeout",
            "phi_threshold",
        ):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}")
        require(
            math.isfinite(self.clock_offset) and abs(self.clock_offset) < 1e6,
            f"clock_offset must be a number of seconds under 10^6, got {self.clock_offset}",
        )
        require(
            math.isfinite(self.clock_drift) and abs(self.clock_drift) <= 100,
            f"clock_drift must be a number of seconds per second within 100, got {self.clock_drift}",
        )
        require((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together")
        require(
            16 <= self.max_connections <= 1 << 20,
            f"max_connections must be in [16, 1048576], got {self.max_connections}",
        )
        require(
            math.isfinite(self.join_timeout) and self.join_timeout >= 0,
            f"join_timeout must be a non-negative number, got {self.join_timeout}",
        )
        require(1 <= self.vnodes <= 256, f"vnodes must be in [1, 256], got {self.vnodes}")
        require(
            math.isfinite(self.weight) and 0 < self.weight <= 64 and round(self.vnodes * self.weight) <= 4096,
            f"weight must be in (0, 64] with at most 4096 ids in all, got {self.weight}",
        )
        require(self.max_key_bytes >= 1, "max_key_bytes must be positive")
        require(self.max_value_bytes >= 0, "max_value_bytes must be non-negative")
        # a message carries at most 4,096 records (balancer.wire.MAX_BATCH)
        require(
            1 <= self.handoff_batch <= 4096, f"handoff_batch must be in [1, 4096], got {self.handoff_batch}"
        )
        if self.node_id is not None:
            require(0 <= self.node_id < 1 << self.bits, f"node_id must be in [0, 2**{self.bits})")

    @property
    def advertised(self) -> str:
        """The host other nodes use to reach this one."""
        return self.address or self.host

    def evolve(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **changes)

    def ring_settings(self) -> dict[str, int | str]:
        """The settings every member of one ring must share; a joiner with others is refused.

        Replication (strategy, N, W, R) is among them: a quorum means the same on every member. The
        number of virtual nodes and the weight are not: members may differ in size.

        ``secured`` is whether RPCs are signed (with the cluster secret, or a key derived from the API
        token): a node that signs never joins a ring that does not, nor the reverse.
        """
        return {
            "protocol": PROTOCOL_VERSION,
            "bits": self.bits,
            "replication": self.replication,
            "replicas": self.replicas,
            "write_quorum": self.write_quorum,
            "read_quorum": self.read_quorum,
            "secured": int(bool(self.cluster_secret or self.api_token)),
        }

    @property
    def consistent(self) -> bool:
        """Whether ``R + W > N``: every read quorum overlaps every write quorum (read-your-writes)."""
        return self.read_quorum + self.write_quorum > self.replicas
