"""The key-value service: quorum reads and writes on a key's replicas, repair, hand-off, anti-entropy."""

from balancer.kv.clock import HybridClock
from balancer.kv.service import (
    BUCKET_BITS,
    MAX_CANDIDATES,
    SET_CACHE,
    SET_TTL,
    SLICE_SECONDS,
    KVService,
    Maintenance,
)

__all__ = [
    "BUCKET_BITS",
    "MAX_CANDIDATES",
    "SET_CACHE",
    "SET_TTL",
    "SLICE_SECONDS",
    "HybridClock",
    "KVService",
    "Maintenance",
]
