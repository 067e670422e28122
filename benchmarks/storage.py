"""Benchmark: what a durable write costs. Puts into each built-in storage, timed one by one.

Storages measured, each on a fresh database file in a temporary folder under ``--dir`` (default: the
system's temporary folder; the file system it is on is printed, since tmpfs makes every sync free):

- *memory*: ``MemoryStorage``, the default: nothing reaches a disk;
- *sqlite*: ``SqliteStorage`` as ``--data-dir`` opens it: WAL, ``synchronous=NORMAL`` (a commit is
  written to the log but not synced: it survives the process being killed, not a power loss);
- *sqlite fsync*: as ``--data-dir --fsync`` opens it: WAL, ``synchronous=FULL`` (every commit is synced
  to disk before the put returns: it survives a power loss too).

Each storage gets ``--puts`` (2,000) puts of new seeded keys with ``--value-bytes`` (100) random bytes,
after 100 warm-up puts whose times are thrown away, at each ``--concurrency`` (1 and 16 puts in flight,
as a replica serving one client or many). A put is timed from the call to its answer, as a node's
write handler awaits it.

Printed: puts per second, p50 and p99 latency of one put, and each row's puts/s over the same
concurrency's plain *sqlite* row. Figures depend on the disk and its cache far more than on balancer.

Run: python benchmarks/storage.py [--puts 2000] [--value-bytes 100] [--concurrency 1,16] [--dir DIR]
     [--seed S] [--json out.json]
     [--baseline old.json]   (adds a column: puts/s relative to the baseline run)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _harness import Baseline, add_common_arguments, machine, percentile, ratio, table, write_json

from balancer.hookspecs import Storage
from balancer.plugins.memory_storage import MemoryStorage
from balancer.plugins.sqlite_storage import FILENAME, SqliteStorage
from balancer.types import Record, Version

WARMUP = 100

STORAGES: dict[str, Callable[[Path], Storage]] = {
    "memory": lambda folder: MemoryStorage(),
    "sqlite": lambda folder: SqliteStorage(folder / FILENAME).open(),
    "sqlite fsync": lambda folder: SqliteStorage(folder / FILENAME, fsync=True).open(),
}
"""Each storage by the name its rows carry, made on a fresh folder."""


def file_system(path: Path) -> str:
    """The type of the file system ``path`` is on (from /proc/mounts), or ``unknown``."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind


async def measure(store: Storage, records: Sequence[Record], concurrency: int) -> tuple[float, list[float]]:
    """Put ``records`` with ``concurrency`` puts in flight; returns total seconds and each put's seconds."""
    latencies: list[float] = []
    queue = iter(records)

    async def worker() -> None:
        for record in queue:  # the workers share one iterator: each record is put once
            started = time.perf_counter()
            await store.put(record)
            latencies.append(time.perf_counter() - started)

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def bench(name: str, root: Path, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    """One row: ``--puts`` puts into a fresh storage of kind ``name``."""
    rng = random.Random(f"{args.seed}/{name}/{concurrency}")
    total = WARMUP + args.puts
    records = [
        Record(f"key-{rng.getrandbits(64):016x}".encode(), rng.randbytes(args.value_bytes), Version(i + 1, 1))
        for i in range(total)
    ]
    with tempfile.TemporaryDirectory(prefix="balancer-bench-", dir=root) as folder:
        async with STORAGES[name](Path(folder)) as store:
            await measure(store, records[:WARMUP], concurrency)
            seconds, latencies = await measure(store, records[WARMUP:], concurrency)
            assert await store.count() == total, "a put was lost"
    return {
        "storage": name,
        "concurrency": concurrency,
        "puts": args.puts,
        "rate": args.puts / seconds,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "mean": statistics.fmean(latencies),
    }


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['storage']}/{row['concurrency']}"


def print_table(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """Print the rows as a Markdown table."""
    plain = {r["concurrency"]: r["rate"] for r in rows if r["storage"] == "sqlite"}
    head = ["storage", "puts in flight", "puts", "puts/s", "p50 ms", "p99 ms", "vs sqlite"]
    head += ["vs baseline"] if baseline else []
    lines = []
    for r in rows:
        line = [
            r["storage"],
            str(r["concurrency"]),
            f"{r['puts']:,}",
            f"{r['rate']:,.0f}",
            f"{r['p50'] * 1e3:.3f}",
            f"{r['p99'] * 1e3:.3f}",
            ratio(r["rate"], plain.get(r["concurrency"])),
        ]
        if baseline:
            line.append(baseline.ratio(r, "rate"))
        lines.append(line)
    table(head, lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every storage at every concurrency, one after the other (never two at once on the disk)."""
    root = Path(args.dir or tempfile.gettempdir())
    rows = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        for name in STORAGES:
            rows.append(await bench(name, root, args, concurrency))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--puts", type=int, default=2000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--concurrency", default="1,16", help="puts in flight, one row set each")
    parser.add_argument("--dir", help="folder to create the databases in (default: the temporary folder)")
    add_common_arguments(parser, seed=20261129, compare="puts/s")
    args = parser.parse_args(argv)
    if args.puts < 1 or args.value_bytes < 0:
        parser.error("--puts must be positive and --value-bytes non-negative")
    baseline = Baseline.load(args.baseline, row_key)
    root = Path(args.dir or tempfile.gettempdir())
    print(
        f"{args.puts:,} puts of {args.value_bytes} bytes, seed {args.seed}; {root} on "
        f"{file_system(root)}; {machine()}\n"
    )
    started = time.perf_counter()
    rows = asyncio.run(run(args))
    print_table(rows, baseline)
    print(f"{time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
