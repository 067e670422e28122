"""An app that reacts to ring events: a plugin hears joins, graceful leaves, failures, hand-offs and
every change of the membership view.

Run: python examples/ring_events.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from balancer import Config, Member, Node, NodeInfo, hookimpl
from balancer.plugin import plugin_manager


class Membership:
    """Keeps a log of what the ring told this process's nodes (hooks are plain synchronous functions)."""

    def __init__(self) -> None:
        self.log: list[str] = []

    @hookimpl
    def balancer_node_joined(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.log.append(f"{node.address} sees {peer.address} as a new neighbour")

    @hookimpl
    def balancer_node_left(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.log.append(f"{node.address} hears that {peer.address} left")

    @hookimpl
    def balancer_node_failed(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.log.append(f"{node.address} stopped trusting {peer.address}")

    @hookimpl
    def balancer_membership_changed(self, node: NodeInfo, members: tuple[Member, ...]) -> None:
        listed = ", ".join(f"{m.address} {m.state}" for m in members)
        self.log.append(f"{node.address} knows the ring as: {listed}")

    @hookimpl
    def balancer_range_moved(self, node: NodeInfo, target: NodeInfo, records: int) -> None:
        self.log.append(f"{node.address} handed {records} records to {target.address}")


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check()`` with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise TimeoutError("the ring did not settle in time")
        await asyncio.sleep(0.05)


async def main() -> None:
    """Three nodes form a ring; one leaves gracefully, one stops abruptly; print what the plugin heard."""
    membership = Membership()
    pm = plugin_manager(load_entrypoints=False, plugins=[membership])
    settings = Config(
        stabilize_interval=0.05,
        check_predecessor_interval=0.1,
        rpc_timeout=0.3,
        anti_entropy_interval=0.2,
        replicas=2,
        write_quorum=1,
        read_quorum=1,
        load_entrypoints=False,
    )
    first = await Node(settings, pm=pm).start()
    second = await Node(settings, join=first.address, pm=pm).start()
    third = await Node(settings, join=first.address, pm=pm).start()
    await until(lambda: all(len(n.members()) == 3 for n in (first, second, third)))
    for i in range(20):
        await first.put(f"item-{i}", b"x")
    await second.leave()
    await until(lambda: second.address not in [m.address for m in first.members()])
    await third.close()  # no goodbye: the first node finds out by itself
    await until(lambda: any("stopped trusting" in line for line in membership.log))
    await first.leave()
    print("\n".join(dict.fromkeys(membership.log)))


if __name__ == "__main__":
    asyncio.run(main())
