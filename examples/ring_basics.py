"""Three ring nodes in one process over real HTTP on 127.0.0.1: store, look up, leave.

Run: python examples/ring_basics.py
"""

from __future__ import annotations

import asyncio

from balancer import Config, Node


async def settled(node: Node, members: int, timeout: float = 10.0) -> None:
    """Wait (polling, with a deadline) until ``node`` knows ``members`` processes that are up."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sum(m.state == "up" for m in node.members()) < members:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{node.address} did not see {members} members in {timeout} s")
        await asyncio.sleep(0.05)


async def main() -> None:
    """Create a ring, join two nodes to it, and use the key-value API and lookups from each."""
    settings = Config(stabilize_interval=0.1, load_entrypoints=False)
    async with Node(settings) as first:
        async with Node(settings, join=first.address) as second, Node(settings, join=first.address) as third:
            await settled(first, 3)
            status = await first.ring_status()  # asks every member: vnodes, records, share of the keys
            print("ring:", ", ".join(f"{m.address} owns {m.share or 0:.0%}" for m in status.members))
            for i, node in enumerate((first, second, third)):
                await node.put(f"city:{i}", f"written through {node.address}".encode())
            found = await third.lookup("city:0")
            print(f"city:0 lives on {found.owner.address}, found in {found.hops} hops")
            print("read through another node:", (await second.get("city:0")).decode())
        # leaving the blocks left the ring gracefully: every key went to a successor first
        keys = sorted(r.key.decode() for r in await first.local_records())
        print("after the others left, the first node holds:", keys)


if __name__ == "__main__":
    asyncio.run(main())
