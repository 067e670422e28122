"""Consistency under faults, the short form of ``benchmarks/consistency.py``: real node processes, each in
its own network namespace, clients recording every operation while a schedule injects faults, and the
checker over the history (``drift-``: a member whose clock falls 12 s behind per second, fenced). Every
schedule here keeps a quorum of each key's replicas alive and reachable, so nothing acknowledged may be
lost, no read may be stale and no delete undone. (Partitions run in the long form only: healing one is
a change of membership whose window can still give a stale read, see docs/guarantees.md.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _chaos import run_schedule, unavailable

WHY = unavailable()
pytestmark = pytest.mark.skipif(
    WHY is not None, reason=f"the fault harness needs Linux network namespaces as root: {WHY}"
)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("schedule", "storage", "replication"),
    [
        ("loss", "memory", "successor"),
        ("pause", "memory", "multi-ring"),
        ("kill-restart", "sqlite", "successor"),
        ("churn", "memory", "successor"),
        ("drift-", "memory", "successor"),
    ],
)
async def test_no_acknowledged_write_is_lost_or_read_stale(
    schedule: str, storage: str, replication: str, tmp_path: Path
) -> None:
    outcome = await run_schedule(
        schedule, tmp_path, nodes=5, seconds=12, storage=storage, replication=replication, seed=3
    )
    verdict = outcome.verdict
    found = "\n".join(verdict.examples)
    assert verdict.acknowledged > 100, f"too little got through to judge: {verdict}"
    assert outcome.converged is not None, "the ring did not converge within 90 s of healing"
    assert (verdict.lost, verdict.stale, verdict.resurrected) == (0, 0, 0), found
    assert verdict.unexpected == 0, "an operation failed with an error other than 503/504/413"
    if schedule.startswith("drift"):  # the drifting member was fenced before the reads that judge it
        assert any("drifting node was fenced" in note for note in outcome.notes), outcome.notes
