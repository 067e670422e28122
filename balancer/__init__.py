"""balancer: consistent hashing with bounded loads, and a fault-tolerant Chord ring for asyncio.

The names below are the public API; every other module may change between releases.
"""

from __future__ import annotations

from balancer.bounded import DEFAULT_LOAD_FACTOR, BoundedLoadBalancer, Lease, Move, parse_load_factor
from balancer.keyspace import Key, KeySpace, hash_key, in_interval

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "BoundedLoadBalancer",
    "Key",
    "KeySpace",
    "Lease",
    "Move",
    "hash_key",
    "in_interval",
    "parse_load_factor",
]

__version__ = "0.1.0"
