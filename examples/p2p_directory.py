"""A tiny peer-to-peer app on the ring: a chat-room directory that every peer can update and search.

Each peer runs a ring node. A room's member list is stored under the key ``room:<name>``, so it lives on
the room's replicas wherever that is; any peer can join a room or list it, and a peer that leaves takes
nothing with it: the ring hands its records over first. Built only on the public API (Node, Config).

Run: python examples/p2p_directory.py
"""

from __future__ import annotations

import asyncio
import json

from balancer import Config, Node
from balancer.errors import KeyNotFoundError


class Directory:
    """The chat-room directory as seen from one peer."""

    def __init__(self, node: Node, name: str) -> None:
        self.node = node
        self.name = name

    async def members(self, room: str) -> list[str]:
        """Who is in ``room`` (empty if nobody ever joined it)."""
        try:
            return list(json.loads(await self.node.get(f"room:{room}")))
        except KeyNotFoundError:
            return []

    async def join(self, room: str) -> None:
        """Add this peer to ``room`` (read, add, write back: a sketch, not a transaction)."""
        members = await self.members(room)
        if self.name not in members:
            await self.node.put(f"room:{room}", json.dumps(sorted([*members, self.name])).encode())

    async def where(self, room: str) -> str:
        """The address of the peer that owns the room's record, and how many hops it took to find it."""
        found = await self.node.lookup(f"room:{room}")
        return f"{found.owner.address} ({found.hops} hops)"


async def main() -> None:
    """Four peers form a ring, join rooms, and one leaves; the directory stays whole."""
    settings = Config(stabilize_interval=0.05, load_entrypoints=False)
    names = ["ana", "bo", "cy", "di"]
    nodes = [await Node(settings).start()]
    for _ in names[1:]:
        nodes.append(await Node(settings, join=nodes[0].address).start())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while any(len(n.view().successors) < 3 for n in nodes):  # let the ring settle, polling
        if loop.time() > deadline:
            raise TimeoutError("the ring did not settle")
        await asyncio.sleep(0.05)
    peers = [Directory(node, name) for node, name in zip(nodes, names, strict=True)]
    for peer, room in zip(peers, ["python", "python", "rust", "python"], strict=True):
        await peer.join(room)
    await peers[2].join("python")
    print("python:", await peers[0].members("python"), "stored on", await peers[0].where("python"))
    print("rust:", await peers[3].members("rust"))
    await nodes[1].leave()  # bo leaves the ring; his node's records move to the others first
    print("after bo's node left, python:", await peers[3].members("python"))
    for node in (nodes[0], nodes[2], nodes[3]):
        await node.leave()


if __name__ == "__main__":
    asyncio.run(main())
