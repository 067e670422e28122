"""The key-value service: quorum reads and writes on a key's replicas, repair, hand-off, anti-entropy.

One process's service is a :class:`KVService` (:mod:`~balancer.kv.service`), which wires these parts:

- :mod:`~balancer.kv.clock`: the hybrid logical clock that stamps every write (versions);
- :mod:`~balancer.kv.shared`: what the parts share, and whether the node is *settled*;
- :mod:`~balancer.kv.placement`: replica sets, the processes that hold a key;
- :mod:`~balancer.kv.transfer`: records to and from one node, batched per peer (``kv.read_many``,
  ``kv.store``);
- :mod:`~balancer.kv.coordinator`: quorum reads and writes, repair, background replication;
- :mod:`~balancer.kv.antientropy`: digest exchanges with peers (``kv.digests``, ``kv.compare``);
- :mod:`~balancer.kv.maintenance`: the periodic pass (hand-off, repair, anti-entropy, tombstone
  collection) and the hand-off of every record on leaving.
"""

from balancer.kv.antientropy import BUCKET_BITS
from balancer.kv.clock import HybridClock
from balancer.kv.maintenance import Maintenance
from balancer.kv.placement import MAX_CANDIDATES, SET_CACHE, SET_TTL
from balancer.kv.service import KVService
from balancer.kv.shared import SLICE_SECONDS

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
