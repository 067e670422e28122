"""Benchmark: plain consistent hashing, bounded loads with linear probing, and with random jumps.

For each node count and load factor it places the same seeded keys (load = keys held) and prints:
lookups per second of ``peek`` (on an idle balancer and on the loaded one), max/mean load, the load's
coefficient of variation, the longest run of consecutive full nodes along the ring, the fraction of keys
that change node when one node joins and when one leaves (assignments recomputed from scratch), and
whether any node ever held more than its capacity. ``uhashring`` (the bench extra) is the outside peer.

Run: python benchmarks/bounded.py [--keys 100000] [--nodes 10,100,1000] [--json out.json]
     [--baseline old.json]   (adds a column: lookups/s relative to the baseline run)
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from _harness import Baseline, add_common_arguments, make_keys, ratio, table, write_json

from balancer import BoundedLoadBalancer

FACTORS = (1.1, 1.25, 1.5, 2.0)


def rate(fn: Callable[[str], object], keys: Sequence[str], repeat: int = 3) -> float:
    """Best-of-``repeat`` calls per second of ``fn`` over ``keys``."""
    best = math.inf
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for key in keys:
            fn(key)
        best = min(best, time.perf_counter() - start)
    return len(keys) / best


def assign(
    nodes: Sequence[str], keys: Sequence[str], factor: float, probing: str, vnodes: int
) -> BoundedLoadBalancer:
    """A balancer over ``nodes`` that has acquired every key once, in order."""
    lb = BoundedLoadBalancer(nodes, load_factor=factor, probing=probing, vnodes=vnodes)  # type: ignore[arg-type]
    for key in keys:
        lb.acquire(key)
    return lb


def mapping(lb: BoundedLoadBalancer) -> dict[str, str]:
    """Key to node, read from the balancer's own bookkeeping."""
    return {str(key): node for node in lb.nodes for key in lb.keys_on(node)}


def longest_full_run(lb: BoundedLoadBalancer, factor: float) -> int:
    """Longest run of consecutive distinct nodes along the ring that are all full.

    Full means at the capacity the last key saw, ``ceil(c * m / n)`` (all weights are 1 here).
    """
    owners = lb._ring.owners[:-1]  # the ring order is internal; a benchmark may look
    cap = math.ceil(Fraction(repr(factor)) * lb.total_load / len(lb))
    loads = lb.loads()
    sequence: list[str] = []
    for member in owners:
        if not sequence or sequence[-1] != member.name:
            sequence.append(member.name)
    if len(sequence) > 1 and sequence[0] == sequence[-1]:
        sequence.pop()
    full = [loads[name] >= cap for name in sequence]
    if all(full):
        return len(full)
    best = run = 0
    for flag in full + full:  # twice around, for runs that wrap
        run = run + 1 if flag else 0
        best = max(best, run)
    return min(best, len(full))


def spread(loads: Sequence[int]) -> tuple[float, float]:
    """(max / mean, standard deviation / mean) of a list of loads."""
    mean = statistics.fmean(loads)
    return max(loads) / mean, statistics.pstdev(loads) / mean


def moved(before: dict[str, str], after: dict[str, str]) -> float:
    """Fraction of keys whose node differs between two assignments."""
    return sum(before[k] != after[k] for k in before) / len(before)


def bench_balancer(n: int, keys: Sequence[str], factor: float, probing: str, vnodes: int) -> dict[str, Any]:
    """One table row for balancer's own strategies."""
    nodes = [f"node-{i}" for i in range(n)]
    idle = BoundedLoadBalancer(nodes, load_factor=factor, probing=probing, vnodes=vnodes)  # type: ignore[arg-type]
    lookups_idle = rate(idle.peek, keys)
    lb = assign(nodes, keys, factor, probing, vnodes)
    loads = lb.loads()
    over = sum(load > lb.capacity(node) for node, load in loads.items())
    lookups_loaded = rate(lb.peek, keys)
    base = mapping(lb)
    joined = mapping(assign([*nodes, "node-new"], keys, factor, probing, vnodes))
    left = mapping(assign(nodes[1:], keys, factor, probing, vnodes))
    max_mean, cv = spread(list(loads.values()))
    bounded = not math.isinf(factor)
    name = "random jumps" if probing == "random" else "linear probe"
    name = name if bounded else "plain hashing"
    return {
        "n": n,
        "strategy": f"{name}, {vnodes} vn",
        "c": factor if bounded else None,
        "peek_idle": lookups_idle,
        "peek_loaded": lookups_loaded,
        "max_mean": max_mean,
        "cv": cv,
        "full_run": longest_full_run(lb, factor) if bounded else None,
        "moved_join": moved(base, joined),
        "moved_leave": moved(base, left),
        "over_capacity": over,
    }


def bench_uhashring(n: int, keys: Sequence[str]) -> dict[str, Any] | None:
    """One table row for uhashring's ketama ring, or None when it is not installed."""
    try:
        from uhashring import HashRing
    except ImportError:
        return None
    nodes = [f"node-{i}" for i in range(n)]
    ring = HashRing(nodes=nodes)
    lookups = rate(ring.get_node, keys)
    base = {k: ring.get_node(k) for k in keys}
    ring.add_node("node-new")
    joined = {k: ring.get_node(k) for k in keys}
    ring.remove_node("node-new")
    ring.remove_node("node-0")
    left = {k: ring.get_node(k) for k in keys}
    counts = Counter(base.values())
    max_mean, cv = spread([counts.get(node, 0) for node in nodes])
    return {
        "n": n,
        "strategy": "uhashring, 160 pts",
        "c": None,
        "peek_idle": lookups,
        "peek_loaded": lookups,
        "max_mean": max_mean,
        "cv": cv,
        "full_run": None,
        "moved_join": moved(base, joined),
        "moved_leave": moved(base, left),
        "over_capacity": 0,
    }


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['n']}/{row['strategy']}/{row['c']}"


def print_table(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """Print the rows as a Markdown table."""
    head = ["n", "strategy", "c", "peek/s idle", "peek/s loaded", "vs uhashring", "max/mean", "CV"]
    head += ["longest full run", "moved on join", "moved on leave", "over capacity"]
    head += ["vs baseline"] if baseline else []
    peer = {row["n"]: row["peek_idle"] for row in rows if row["strategy"].startswith("uhashring")}
    lines = []
    for row in rows:
        line = [
            str(row["n"]),
            row["strategy"],
            "inf" if row["c"] is None else f"{row['c']:g}",
            f"{row['peek_idle'] / 1e3:,.0f}k",
            f"{row['peek_loaded'] / 1e3:,.0f}k",
            ratio(row["peek_idle"], peer.get(row["n"])),
            f"{row['max_mean']:.3f}",
            f"{row['cv']:.3f}",
            "-" if row["full_run"] is None else str(row["full_run"]),
            f"{row['moved_join']:.2%}",
            f"{row['moved_leave']:.2%}",
            str(row["over_capacity"]),
        ]
        if baseline:
            line.append(baseline.ratio(row, "peek_idle"))
        lines.append(line)
    table(head, lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--nodes", default="10,100,1000")
    parser.add_argument("--factors", default=",".join(map(str, FACTORS)))
    parser.add_argument("--vnodes", default="1,100", help="virtual nodes per node, one row set each")
    add_common_arguments(parser, compare="lookups/s")
    args = parser.parse_args(argv)
    keys = make_keys(args.keys, args.seed)
    factors = [float(f) for f in args.factors.split(",")]
    baseline = Baseline.load(args.baseline, row_key)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.nodes.split(",")):
        peer = bench_uhashring(n, keys)
        if peer:
            rows.append(peer)
        for vnodes in (int(v) for v in args.vnodes.split(",")):
            rows.append(bench_balancer(n, keys, math.inf, "random", vnodes))
            for factor in factors:
                for probing in ("linear", "random"):
                    rows.append(bench_balancer(n, keys, factor, probing, vnodes))
    print(f"{len(keys):,} keys, seed {args.seed}, Python {sys.version.split()[0]}\n")
    print_table(rows, baseline)
    print(f"{time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    failures = sum(row["over_capacity"] for row in rows)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
