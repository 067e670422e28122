"""Every Python snippet in README.md and docs/ runs as written, each in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    (f"{page.name}-{i}", snippet)
    for page in PAGES
    for i, snippet in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
]


def test_the_documentation_has_snippets() -> None:
    assert len(SNIPPETS) >= 5
    assert any(name.startswith("README.md") for name, _ in SNIPPETS)


@pytest.mark.parametrize("snippet", [s for _, s in SNIPPETS], ids=[name for name, _ in SNIPPETS])
def test_snippet_runs(snippet: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, f"{snippet}\n---\n{done.stdout}\n{done.stderr}"
