"""balancer: consistent hashing with bounded loads, and a fault-tolerant Chord ring for asyncio.

The names below are the public API; every other module may change between releases. The ring's names
(``Node``, ``Config``, ...) load on first use, so ``from balancer import BoundedLoadBalancer`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from balancer.bounded import (
    DEFAULT_LOAD_FACTOR,
    BoundedLoadBalancer,
    Lease,
    Move,
    parse_load_factor,
)
from balancer.keyspace import Key, KeySpace, hash_key, in_interval

if TYPE_CHECKING:
    from balancer.config import Config
    from balancer.hookspecs import hookimpl
    from balancer.middleware import BalancedSession, setup_routing
    from balancer.node import Node
    from balancer.types import Lookup, Member, NodeInfo, Record, RingView, Version

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "BalancedSession",
    "BoundedLoadBalancer",
    "Config",
    "Key",
    "KeySpace",
    "Lease",
    "Lookup",
    "Member",
    "Move",
    "Node",
    "NodeInfo",
    "Record",
    "RingView",
    "Version",
    "hash_key",
    "hookimpl",
    "in_interval",
    "parse_load_factor",
    "setup_routing",
]

__version__ = "0.1.0"

_LAZY = {
    "BalancedSession": "balancer.middleware",
    "Config": "balancer.config",
    "Node": "balancer.node",
    "hookimpl": "balancer.hookspecs",
    "setup_routing": "balancer.middleware",
    "Lookup": "balancer.types",
    "Member": "balancer.types",
    "NodeInfo": "balancer.types",
    "Record": "balancer.types",
    "RingView": "balancer.types",
    "Version": "balancer.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'balancer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
