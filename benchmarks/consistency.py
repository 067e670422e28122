"""Consistency under faults: real node processes in network namespaces, a schedule of faults, a checked
history (the long form of ``tests/integration/test_consistency.py``).

For each schedule a ring of ``--nodes`` processes forms (N = 3, W = 2, R = 2), clients write, delete and
read for ``--seconds`` while the schedule injects its faults, everything is healed, and the run waits for
the ring to converge (every node reads the same value of every key). The checker then counts, over the
whole history: acknowledged writes lost, stale reads (older than a write acknowledged before the read
began, or older than a read that ended before it began), deleted keys come back, and error answers. See
``benchmarks/_chaos.py`` for the faults and the rules.

Needs root, iproute2 and nftables (Linux network namespaces). Exit status 1 if anything was lost, stale
or resurrected in any schedule.

Run: python benchmarks/consistency.py [--schedule NAME ...] [--seconds 30] [--nodes 5]
     [--storage memory|sqlite|both] [--replication successor|multi-ring|both] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _chaos import SCHEDULES, Outcome, run_schedule, unavailable
from _harness import sigterm_interrupts, table, write_json


def row(outcome: Outcome) -> list[str]:
    v = outcome.verdict
    converged = "not within 90 s" if outcome.converged is None else f"{outcome.converged:.1f}"
    return [
        outcome.schedule,
        f"{outcome.storage}, {outcome.replication}",
        str(outcome.nodes),
        str(v.operations),
        str(v.acknowledged),
        str(v.lost),
        str(v.stale),
        str(v.resurrected),
        str(v.late),
        f"{v.failed} ({v.unexpected} other)",
        str(v.timeouts),
        str(v.unavailable),
        converged,
    ]


HEAD = ["schedule", "storage, replication", "nodes", "operations", "acknowledged writes", "lost",
        "stale", "resurrected", "late", "errors (not 503/504)", "timeouts", "s unavailable",
        "s to converge"]  # fmt: skip


async def run(args: argparse.Namespace) -> list[Outcome]:
    storages = ["memory", "sqlite"] if args.storage == "both" else [args.storage]
    strategies = ["successor", "multi-ring"] if args.replication == "both" else [args.replication]
    variants = itertools.cycle(itertools.product(storages, strategies))
    outcomes = []
    for name in args.schedule or list(SCHEDULES):
        storage, replication = next(variants)
        folder = Path(tempfile.mkdtemp(prefix=f"balancer-{name}-"))
        outcome = await run_schedule(
            name, folder, nodes=args.nodes, seconds=args.seconds, storage=storage,
            replication=replication, seed=args.seed,
        )  # fmt: skip
        outcomes.append(outcome)
        table(HEAD, [row(outcome)])
        for note in outcome.notes:
            print(f"  {note}")
        for example in outcome.verdict.examples:
            print(f"  {example}")
        print(f"  logs: {folder}", flush=True)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedule", action="append", choices=sorted(SCHEDULES))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--storage", choices=["memory", "sqlite", "both"], default="both")
    parser.add_argument("--replication", choices=["successor", "multi-ring", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    sigterm_interrupts()  # so that the harness removes its namespaces and processes
    outcomes = asyncio.run(run(args))
    print("All schedules:\n")
    table(HEAD, [row(o) for o in outcomes])
    write_json(args.json, [
        {"schedule": o.schedule, "storage": o.storage, "replication": o.replication, "nodes": o.nodes,
         "seconds": o.seconds, "converged": o.converged, "notes": o.notes, **o.verdict.__dict__}
        for o in outcomes
    ])  # fmt: skip
    bad = any(o.verdict.lost or o.verdict.stale or o.verdict.resurrected for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
