"""Tests for balancer.bounded: capacities, random jumps, stability, moves and errors."""

from __future__ import annotations

import math
import threading
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from balancer import BoundedLoadBalancer, Lease, parse_load_factor
from balancer.errors import (
    CapacityError,
    ConfigError,
    NoNodesError,
    NotAcquiredError,
    UnknownNodeError,
)

NODES = [f"node-{i}" for i in range(8)]


def assert_within_capacity(lb: BoundedLoadBalancer) -> None:
    loads = lb.loads()
    assert sum(loads.values()) == lb.total_load
    for node, load in loads.items():
        assert load <= lb.capacity(node), (node, load, lb.capacity(node))


class BalancerMachine(RuleBasedStateMachine):
    """Random acquire/release/add/remove sequences; no node may ever exceed its capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.lb = BoundedLoadBalancer(NODES[:3], load_factor=1.1, vnodes=8)
        self.held: Counter[str] = Counter()
        self.next_node = 3

    @rule(key=st.integers(0, 40))
    def acquire(self, key: int) -> None:
        self.lb.acquire(f"k{key}")
        self.held[f"k{key}"] += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.held)))
        for move in self.lb.release(key):
            assert move.source != move.target
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]

    @precondition(lambda self: self.next_node < len(NODES))
    @rule(weight=st.sampled_from([1, 2, 0.5]))
    def add(self, weight: float) -> None:
        self.lb.add_node(NODES[self.next_node], weight)
        self.next_node += 1

    @precondition(lambda self: len(self.lb) > 1)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(self.lb.nodes))
        moves = self.lb.remove_node(node)
        assert all(m.source == node and m.target != node for m in moves)

    @invariant()
    def within_capacity(self) -> None:
        assert_within_capacity(self.lb)
        assert self.lb.total_load == sum(self.held.values())


TestBalancerMachine = BalancerMachine.TestCase
TestBalancerMachine.settings = settings(max_examples=60, stateful_step_count=60, derandomize=True)


@pytest.mark.parametrize("probing", ["random", "linear"])
@pytest.mark.parametrize("factor", [1.1, 1.25, 2.0])
def test_capacity_never_exceeded_under_skew(probing: str, factor: float) -> None:
    lb = BoundedLoadBalancer(NODES, load_factor=factor, probing=probing)  # type: ignore[arg-type]
    # a hot key asked for again and again, among ordinary ones
    for i in range(2_000):
        lb.acquire("hot" if i % 3 == 0 else f"k{i}")
        assert_within_capacity(lb)
    for i in range(0, 2_000, 2):
        lb.release("hot" if i % 3 == 0 else f"k{i}")
        assert_within_capacity(lb)


def test_same_key_same_node_while_loads_allow() -> None:
    lb = BoundedLoadBalancer(NODES)
    first = {f"k{i}": lb.peek(f"k{i}") for i in range(500)}
    for _ in range(3):
        for key, node in first.items():
            assert lb.peek(key) == node
    # with plenty of room, acquire agrees with peek and with itself
    for key, node in first.items():
        assert lb.acquire(key) == node
        lb.release(key)


def test_overflow_jumps_are_deterministic_and_spread() -> None:
    lb = BoundedLoadBalancer(NODES, load_factor=1.25)
    targets = [lb.acquire("hot") for _ in range(400)]
    again = BoundedLoadBalancer(NODES, load_factor=1.25)
    assert [again.acquire("hot") for _ in range(400)] == targets
    # 400 units of one key need at least ceil(400 / 63) = 7 nodes at capacity 63 each
    assert lb.capacity(NODES[0]) == 63
    assert len(set(targets)) >= 7
    assert_within_capacity(lb)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30, unique=True))
@settings(max_examples=50, derandomize=True)
def test_peek_predicts_acquire(keys: list[str]) -> None:
    lb = BoundedLoadBalancer(NODES[:4], load_factor=1.1, vnodes=4)
    for key in keys * 2:
        assert lb.peek(key) == lb.acquire(key)


def test_plain_hashing_moves_about_one_over_n_plus_one() -> None:
    n = 20
    lb = BoundedLoadBalancer([f"n{i}" for i in range(n)], load_factor=math.inf)
    keys = [f"key-{i}" for i in range(20_000)]
    before = [lb.peek(k) for k in keys]
    lb.add_node("new")
    after = [lb.peek(k) for k in keys]
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    assert all(b == "new" for a, b in zip(before, after, strict=True) if a != b)
    expected = len(keys) / (n + 1)
    assert 0.75 * expected < moved < 1.25 * expected
    # plain hashing never refuses and never bounds
    assert lb.capacity("new") == math.inf
    assert lb.load_factor == math.inf


def test_weights_shift_capacity_and_share() -> None:
    lb = BoundedLoadBalancer({"big": 3, "small": 1}, load_factor=1.25)
    for i in range(4_000):
        lb.acquire(f"k{i}")
    loads = lb.loads()
    assert lb.capacity("big") > 2.9 * lb.capacity("small")
    assert loads["big"] > 2 * loads["small"]
    assert lb.weight("big") == 3


def test_add_node_sheds_load_to_keep_capacities() -> None:
    lb = BoundedLoadBalancer(NODES[:2], load_factor=1.25)
    for i in range(1_000):
        lb.acquire(f"k{i}")
    moves = lb.add_node("third")
    assert moves, "capacities fell from 626 to 418, so load had to move"
    assert_within_capacity(lb)
    assert lb.loads()["third"] == sum(1 for m in moves if m.target == "third")


def test_remove_node_places_its_load_elsewhere() -> None:
    lb = BoundedLoadBalancer(NODES[:4])
    for i in range(400):
        lb.acquire(f"k{i}")
    held = lb.loads()["node-1"]
    moves = lb.remove_node("node-1")
    assert len(moves) == held
    assert lb.total_load == 400
    assert_within_capacity(lb)
    # a moved key is released from where it went
    key = moves[0].key
    lb.release(key)
    assert lb.total_load == 399


def test_lease_releases_on_error_and_prefers_its_node() -> None:
    lb = BoundedLoadBalancer(NODES)
    seen = []

    def fail() -> None:
        with lb.lease("k") as lease:
            seen.append((lease, lb.total_load))
            raise RuntimeError("request failed")

    with pytest.raises(RuntimeError):
        fail()
    assert seen == [(Lease("k", lb.peek("k")), 1)]
    assert lb.total_load == 0
    a = lb.acquire("k", exclude=[lb.peek("k")])
    b = lb.acquire("k")
    assert a != b
    lb.release(Lease("k", a))
    assert lb.loads()[a] == 0
    assert lb.loads()[b] == 1


def test_candidates_cover_every_node_once_in_key_order() -> None:
    lb = BoundedLoadBalancer(NODES)
    order = list(lb.candidates("user:7"))
    assert sorted(order) == sorted(NODES)
    assert order[0] == lb.peek("user:7")
    assert order == list(lb.candidates(b"user:7"))


def test_concurrent_acquire_release_keeps_counts() -> None:
    lb = BoundedLoadBalancer(NODES, load_factor=1.1)

    def worker(seed: int) -> None:
        for i in range(2_000):
            key = f"w{seed}-{i % 50}"
            lb.acquire(key)
            if i % 2:
                lb.release(key)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lb.total_load == 4 * 1_000
    assert_within_capacity(lb)


def test_parse_load_factor_forms() -> None:
    assert parse_load_factor(1.25) == Fraction(5, 4)
    assert parse_load_factor(125) == Fraction(5, 4)
    assert parse_load_factor("125%") == Fraction(5, 4)
    assert parse_load_factor("1.1") == Fraction(11, 10)
    assert parse_load_factor(math.inf) is None
    assert parse_load_factor("inf") is None
    for bad in (1, 1.0, 0.5, 100, "abc", -3, True, "50%", math.nan):
        with pytest.raises(ConfigError):
            parse_load_factor(bad)


def test_exact_capacity_rule() -> None:
    # ceil(1.1 * 10 * 1 / 1) must be 11, not 12 as binary floats would make it
    lb = BoundedLoadBalancer(["only"], load_factor=1.1)
    for i in range(9):
        lb.acquire(f"k{i}")
    assert lb.capacity("only") == 11


def test_errors() -> None:
    empty = BoundedLoadBalancer()
    with pytest.raises(NoNodesError):
        empty.peek("k")
    with pytest.raises(NoNodesError):
        empty.acquire("k")
    assert list(empty.candidates("k")) == []
    lb = BoundedLoadBalancer(["a", "b"])
    with pytest.raises(UnknownNodeError, match="unknown node: 'zzz'"):
        lb.remove_node("zzz")
    with pytest.raises(UnknownNodeError):
        lb.capacity("zzz")
    with pytest.raises(NotAcquiredError):
        lb.release("never")
    with pytest.raises(ConfigError):
        lb.add_node("a")
    for weight in (0, -1, math.inf, "2"):
        with pytest.raises(ConfigError):
            lb.add_node("c", weight)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BoundedLoadBalancer(["a"], load_factor=1)
    with pytest.raises(ConfigError):
        BoundedLoadBalancer(["a"], probing="quadratic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BoundedLoadBalancer(["a"], vnodes=0)
    with pytest.raises(ConfigError):
        BoundedLoadBalancer([""])
    with pytest.raises(CapacityError):
        lb.acquire("k", exclude=["a", "b"])
    # a failed call changed nothing
    assert lb.nodes == ["a", "b"]
    assert lb.total_load == 0
    # removing the last node drops its load
    solo = BoundedLoadBalancer(["x"])
    solo.acquire("k")
    assert solo.remove_node("x") == []
    assert solo.total_load == 0
    assert "x" not in solo
