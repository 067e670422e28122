"""The example that uses this package (examples/grpc_routed_service.py) runs as its own process and
prints what it promises, as the core's tests/test_examples.py runs the other examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "grpc_routed_service.py"


def test_the_routed_service_example() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "same owners through another server: True" in out
    # overflow spreads (3 servers on a quiet machine; a starved one may overlap fewer calls)
    spread = out.split("90 concurrent calls for one hot user were served by ")[1].split()[0]
    assert int(spread) >= 2, out
    assert "balanced client, same owners: True" in out
    assert "ada's server went down; ada served by another: True" in out


def test_the_benchmark_runs_small() -> None:
    script = EXAMPLE.parents[1] / "benchmarks" / "grpc_transport.py"
    command = [
        sys.executable,
        str(script),
        "--only",
        "rpc,interceptor",
        "--seconds",
        "0.3",
        "--warmup",
        "0.1",
    ]
    done = subprocess.run(
        [*command, "--concurrency", "4", "--keys", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| grpc | 4 |" in done.stdout
    assert "| forwarded (1 hop) |" in done.stdout
