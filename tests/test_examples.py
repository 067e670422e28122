"""Every example runs to completion as a separate process and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BENCHMARKS = EXAMPLES.parent / "benchmarks"


def run_script(path: Path, *args: str) -> str:
    """Run a script in a fresh interpreter; it must exit 0. Returns what it printed."""
    done = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_example(name: str) -> str:
    return run_script(EXAMPLES / name)


def test_bounded_loads_example() -> None:
    out = run_example("bounded_loads.py")
    assert "3,000 concurrent requests for one hot key went to" in out
    assert "a sixth server joined" in out
    assert "10.0.0.6" in out.split("the next 2,000 sessions went to")[1]


def test_ring_basics_example() -> None:
    out = run_example("ring_basics.py")
    assert out.count(" owns ") == 3
    assert "read through another node: written through" in out
    assert "after the others left, the first node holds: ['city:0', 'city:1', 'city:2']" in out


def test_ring_events_example() -> None:
    out = run_example("ring_events.py")
    assert "as a new neighbour" in out
    assert "left" in out
    assert "stopped trusting" in out
    assert "handed" in out


def test_routed_app_example() -> None:
    out = run_example("routed_app.py")
    assert "same owners through another backend: True" in out
    assert "90 concurrent requests for one hot user were served by 3 backends" in out


def test_asgi_routed_app_example() -> None:
    out = run_example("asgi_routed_app.py")  # needs contrib/balancer-asgi[test], which CI installs
    assert "same owners through another backend: True" in out
    assert "90 concurrent requests for one hot user were served by 3 backends" in out


def test_p2p_directory_example() -> None:
    out = run_example("p2p_directory.py")
    assert "python: ['ana', 'bo', 'cy', 'di']" in out
    assert "rust: ['cy']" in out
    assert "after bo's node left, python: ['ana', 'bo', 'cy', 'di']" in out


def test_benchmark_runs_small() -> None:
    out = run_script(BENCHMARKS / "bounded.py", "--keys", "2000", "--nodes", "10", "--factors", "1.25")
    assert "| 10 | random jumps, 100 vn | 1.25 |" in out


def test_lookup_benchmark_runs_small() -> None:
    out = run_script(BENCHMARKS / "lookup.py", "--sizes", "64", "--lookups", "200")
    assert "| 64 | fingers alone | 200 |" in out


def test_balance_benchmark_runs_small() -> None:
    out = run_script(
        BENCHMARKS / "balance.py",
        *("--keys", "3000", "--sizes", "3,10", "--vnodes", "1,32", "--processes", "3"),
        *("--live-vnodes", "1,8", "--lookups", "50", "--rounds", "4"),
    )
    for heading in (
        "### 1. Keys owned",
        "### 2. Keys moved",
        "### 3. Maintenance traffic",
        "### 4. Lookup hops",
    ):
        assert heading in out
    assert "| 10 | 32 |" in out  # a placed ring's rows in tables 1 and 2
    assert "| 3 | 8 | 4 |" in out  # the live ring's traffic row: 3 processes, V = 8, 4 rounds
    assert "target: keys max/mean <= 1.25 at 3 processes, V = 32: met" in out
    assert "CHECK FAILED" not in out


def test_faults_benchmark_runs_small() -> None:
    out = run_script(BENCHMARKS / "faults.py", "--nodes", "6", "--keys", "120")
    assert "acknowledged writes lost: 0" in out


def test_http_benchmarks_parse_their_options() -> None:
    for script in ("middleware.py", "http_kv.py", "asgi_router.py"):
        assert "--seconds" in run_script(BENCHMARKS / script, "--help")
