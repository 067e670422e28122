"""The README's run command: ``balancer demo`` starts separate node processes and a REPL, and stops them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_a_three_node_ring_and_stops_it() -> None:
    script = "put colour deep blue\nget colour\nring\nstatus\ndelete colour\nget colour\nexit\n"
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "demo", "--nodes", "3", "--no-plugins"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    pids = [int(p) for p in re.findall(r"started node 127\.0\.0\.1:\d+ \(pid (\d+)\)", out)]
    assert len(pids) == 2
    assert "[balancer] OUT-> stored: deep blue" in out
    assert "[balancer] OUT-> value: deep blue" in out
    assert "[balancer] OUT-> deleted: colour" in out
    assert "[balancer] OUT-> not found: colour" in out
    assert "stopped 2 node processes" in out
    for pid in pids:  # every child is gone (reaped by the demo, so the pid no longer exists)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"node process {pid} is still running")
    logs = re.search(r"node logs are in (\S+)", out)
    assert logs is not None
    assert not Path(logs.group(1)).exists()  # removed at the end


def test_demo_keeps_its_logs_when_asked_and_they_hold_no_request_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "demo", "--nodes", "2", "--keep-logs", "--no-plugins"],
        input="put k v\nget k\nexit\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    kept = re.search(r"node logs kept in (\S+)", done.stdout)
    assert kept is not None
    folder = Path(kept.group(1))
    try:
        logs = sorted(folder.glob("node-*.log"))
        assert len(logs) == 1
        text = logs[0].read_text()
        assert "created a ring" in text  # the node logs at info (-v) ...
        assert "aiohttp.access" not in text  # ... but not every request it served (that is -vv)
    finally:
        for log in folder.glob("*"):
            log.unlink()
        folder.rmdir()
