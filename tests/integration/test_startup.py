"""Start-up checks against real node processes: an unusable data folder is refused at once with one
line, and seeds that are not up yet are waited for."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from processes import Cluster, Proc

from balancer.plugins.sqlite_storage import FILENAME


def exit_status(proc: Proc, timeout: float = 60.0) -> int:
    """The process's exit status; fails the test if it is still running after ``timeout`` seconds."""
    try:
        return proc.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the node on {proc.address} still runs after {timeout} s") from None


def error_lines(proc: Proc) -> list[str]:
    """The lines the node printed as its error (click prefixes them with ``Error:``)."""
    return [line for line in proc.output().splitlines() if line.startswith("Error:")]


def unusable(tmp_path: Path, case: str) -> Path:
    """A data folder that cannot be used, of the kind ``case`` names."""
    plain = tmp_path / "plain"
    plain.write_text("a file, not a folder")
    if case == "under a file":
        return plain / "data"
    if case == "database is a folder":
        (tmp_path / "db" / FILENAME).mkdir(parents=True)
        return tmp_path / "db"
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / FILENAME).write_bytes(random.Random(11).randbytes(16384))
    return folder


@pytest.mark.parametrize("case", ["under a file", "database is a folder", "corrupt"])
def test_an_unusable_data_dir_is_refused_with_one_line(cluster: Cluster, tmp_path: Path, case: str) -> None:
    folder = unusable(tmp_path, case)
    node = cluster.start(extra=("--data-dir", str(folder)))
    assert exit_status(node) == 1
    output = node.output()
    assert "Traceback" not in output, output
    lines = error_lines(node)
    assert len(lines) == 1, output
    assert lines[0].startswith(f"Error: cannot use {folder}"), output
    assert "created a ring" not in output  # it never served
