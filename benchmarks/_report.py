"""What the benchmark scripts share: printing a Markdown table."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


def table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    """Print one Markdown table, then a blank line."""
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print(flush=True)
