"""Stateful property test on the in-process network: writes, deletes, joins, graceful leaves and crashes
(never more than N - 1 crashed between two repairs), in any order. After healing, every acknowledged
write is readable with its latest value, and no deleted key comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from helpers import QUIET, converge, settle
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from balancer.config import Config
from balancer.errors import BalancerError, KeyNotFoundError
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport

T = TypeVar("T")
KEYS = [f"key-{i}" for i in range(6)]
N = 3


class RingMachine(RuleBasedStateMachine):
    """A ring under random operations, checked against a model of what may be read."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.network = LocalNetwork()
        self.pm = plugin_manager(load_entrypoints=False)
        self.config = Config(transport="local", load_entrypoints=False, seed=1, vnodes=4, **QUIET)  # type: ignore[arg-type]
        self.alive: list[Node] = []
        self.every: list[Node] = []
        self.crashed_since_repair = 0
        # for each key, the values a read may return (None: absent or deleted); several after a failed write
        self.allowed: dict[str, set[bytes | None]] = {key: {None} for key in KEYS}
        self.counter = 0
        for _ in range(5):
            self.run(self._add())
        self.run(converge(self.alive))

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    async def _add(self) -> None:
        join = self.alive[0].address if self.alive else None
        node = Node(self.config, join=join, pm=self.pm, transport=LocalTransport(self.network))
        await node.start()
        self.alive.append(node)
        self.every.append(node)
        await converge(self.alive)

    @rule(key=st.sampled_from(KEYS), via=st.integers(0, 100))
    def write(self, key: str, via: int) -> None:
        self.counter += 1
        value = f"v{self.counter}".encode()
        try:
            self.run(self.alive[via % len(self.alive)].put(key, value))
            self.allowed[key] = {value}
        except BalancerError:  # not acknowledged: it may or may not have reached a replica
            self.allowed[key].add(value)

    @rule(key=st.sampled_from(KEYS), via=st.integers(0, 100))
    def delete(self, key: str, via: int) -> None:
        try:
            self.run(self.alive[via % len(self.alive)].delete(key))
            self.allowed[key] = {None}
        except KeyNotFoundError:
            assert None in self.allowed[key], f"{key} should exist: {self.allowed[key]}"
        except BalancerError:
            self.allowed[key].add(None)

    @precondition(lambda self: len(self.alive) < 8)
    @rule()
    def join(self) -> None:
        self.run(self._add())

    @precondition(lambda self: len(self.alive) > N + 1 and self.crashed_since_repair == 0)
    @rule(which=st.integers(0, 100))
    def leave(self, which: int) -> None:
        node = self.alive.pop(which % len(self.alive))
        self.run(node.leave())
        self.run(converge(self.alive))

    @precondition(lambda self: len(self.alive) > N + 1 and self.crashed_since_repair < N - 1)
    @rule(which=st.integers(0, 100))
    def crash(self, which: int) -> None:
        node = self.alive.pop(which % len(self.alive))
        self.network.kill(node.address)
        self.crashed_since_repair += 1

    @rule()
    def repair(self) -> None:
        self.run(converge(self.alive))
        self.run(settle(self.alive))
        self.crashed_since_repair = 0

    @rule()
    def check(self) -> None:
        self.repair()
        for i, key in enumerate(KEYS):
            reader = self.alive[i % len(self.alive)]
            try:
                value: bytes | None = self.run(reader.get(key))
            except KeyNotFoundError:
                value = None
            assert value in self.allowed[key], f"{key}: read {value!r}, allowed {self.allowed[key]}"
            self.allowed[key] = {value}  # a read that saw it makes it the latest for what follows

    def teardown(self) -> None:
        try:
            self.check()
        finally:
            for node in self.every:
                self.run(node.close())
            self.loop.close()


TestRing = RingMachine.TestCase
TestRing.settings = settings(max_examples=60, stateful_step_count=30, derandomize=True, deadline=None)
