"""Spread keys over servers with consistent hashing and bounded loads, then watch a server join.

Run: python examples/bounded_loads.py
"""

from __future__ import annotations

from collections import Counter

from balancer import BoundedLoadBalancer


def main() -> None:
    """Place 10,000 sessions on five servers (one twice as big), add a sixth, and print the loads."""
    servers = {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1, "10.0.0.4": 1, "10.0.0.5": 2}
    lb = BoundedLoadBalancer(servers, load_factor=1.25)
    for i in range(10_000):
        lb.acquire(f"session-{i}")
    print("load factor", lb.load_factor, "- capacity = ceil(c * (m + 1) * w / W)")
    for node, load in lb.loads().items():
        print(f"  {node:10} weight {lb.weight(node):3.0f}  load {load:5}  capacity {lb.capacity(node):5}")

    # A hot key never overloads one server: past its capacity it jumps to others.
    hot = Counter(lb.acquire("celebrity") for _ in range(3_000))
    print("3,000 concurrent requests for one hot key went to", dict(hot))
    for _ in range(3_000):
        lb.release("celebrity")

    moves = lb.add_node("10.0.0.6")
    print(f"a sixth server joined; {len(moves)} sessions moved to keep every server within capacity")
    fresh = Counter(lb.acquire(f"session-{i}") for i in range(10_000, 12_000))
    print("the next 2,000 sessions went to", dict(sorted(fresh.items())))
    for node, load in lb.loads().items():
        print(f"  {node:10} load {load:5}  capacity {lb.capacity(node):5}")


if __name__ == "__main__":
    main()
