"""Benchmark: what a node's records cost in RAM, and how long a maintenance pass holds up its event loop.

Two measurements, on the same ``--records`` (10**6) seeded records of ``--key-bytes`` (16) random key bytes
and ``--value-bytes`` (100) random value bytes:

- *RSS*: one ``balancer node --ring --replicas 1 --write-quorum 1 --read-quorum 1 --no-plugins`` process
  with the memory storage (its other settings the defaults, a maintenance pass every 5 s included).
  Its resident set size (``VmRSS`` in ``/proc/<pid>/status``) is read once it answers ``/status``, then
  after every record was loaded and ``/status`` counts them all. Records are loaded through the node's
  own replica-write RPC, ``POST /rpc/kv.store``, ``--batch`` (2,048) records per request: the node decodes
  and checks them as it does any replica write and stores each through ``KVService`` into its storage,
  which is much faster than one ``PUT /kv/<key>`` per record and ends in the same storage.
- *stall*: a ring of ``--ring-nodes`` (3) nodes in this process, on the in-process transport, with
  replication factor N = the ring's size, so every node holds every record and shares every record with
  every other node. The same records are put into every node's storage (a settled ring: every replica
  agrees). While ``KVService.maintain()`` runs on the first node, a ticker task wakes every 1 ms and
  records the longest gap between two of its wake-ups: the worst time the event loop was held up (the
  peers' answers to its digests run on the same loop, and count too). Measured twice: the node's *first*
  pass (no peer has digests yet), then, after every other node ran its own first pass, a *settled* pass,
  which compares its 64 bucket digests with each peer's and finds them equal. The gaps are also given in
  this thread's CPU time, which leaves out time the operating system gave to other processes: on a
  shared machine, the wall-clock figure includes being descheduled, the CPU figure only this process's work.

Printed: one table of each figure (MB, bytes, ms, s) and, with ``--baseline``, each figure over the
baseline run's. Timings depend on the machine and on what else runs on it; sizes much less.

Run: python benchmarks/memory.py [--records 1000000] [--key-bytes 16] [--value-bytes 100] [--batch 2048]
     [--ring-nodes 3] [--only rss|stall] [--seed S] [--json out.json]
     [--baseline old.json]   (adds a column: each figure relative to the baseline run)
To measure another checkout (a baseline), put it first on PYTHONPATH: the node process inherits it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from _harness import (
    HOST,
    BenchError,
    Fleet,
    add_common_arguments,
    failed,
    free_port,
    machine,
    ratio,
    read_json,
    table,
    until,
    write_json,
)

from balancer.config import Config
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.survey import exact
from balancer.types import Record, Version

WRITER = 1  # the writer id every record is stamped with
TICK = 0.001  # seconds the ticker sleeps between wake-ups


def records(args: argparse.Namespace) -> Iterator[Record]:
    """The seeded records: the same ones at every call, stamped just before now (within any skew)."""
    rng = random.Random(args.seed)
    base = (int(time.time() * 1000) - 60_000) << 16
    for i in range(args.records):
        key, value = rng.randbytes(args.key_bytes), rng.randbytes(args.value_bytes)
        yield Record(key, value, Version(base + i, WRITER))


def rss_mb(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def stored(http: aiohttp.ClientSession, address: str) -> int | None:
    """The node's record count from ``/status``, or ``None`` while it does not answer."""
    try:
        async with http.get(f"http://{address}/status") as response:
            if response.status != 200:
                return None
            return int((await response.json())["records"])
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_for(http: aiohttp.ClientSession, address: str, count: int, fleet: Fleet) -> None:
    """Poll ``/status`` until the node reports at least ``count`` records (:class:`BenchError` if it
    exits, or after 600 s)."""

    async def enough() -> bool:
        fleet.check()
        found = await stored(http, address)
        return found is not None and found >= count

    await until(enough, f"the node reporting {count:,} records", 600, interval=0.1)


async def load(http: aiohttp.ClientSession, address: str, args: argparse.Namespace) -> float:
    """Send every record through ``kv.store``, ``--batch`` at a time; returns the seconds it took."""
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    stream = records(args)
    while True:
        record = next(stream, None)
        if record is not None:
            batch.append(record.to_wire())
        if batch and (record is None or len(batch) >= args.batch):
            async with http.post(f"http://{address}/rpc/kv.store", json={"records": batch}) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"kv.store answered {response.status}: {answer}")
                if not all(kept for kept, _ in answer["each"]):
                    raise RuntimeError("the node refused records it should have kept")
            batch = []
        if record is None:
            return time.perf_counter() - started


async def measure_rss(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Start a node, load it, and read its RSS before and after."""
    port = free_port()
    address = f"{HOST}:{port}"
    command = [sys.executable, "-m", "balancer", "node", "--ring", "--port", str(port), "--no-plugins"]
    command += ["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"]
    with Fleet(folder) as fleet:
        # started before anything else runs on this loop: nothing waits while Popen forks; in the
        # fleet's folder, so that PYTHONPATH picks the code measured (see Fleet.start)
        node = fleet.start("node", command)
        try:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await wait_for(http, address, 0, fleet)
                before = rss_mb(node.pid)
                seconds = await load(http, address, args)
                await wait_for(http, address, args.records, fleet)
                after = rss_mb(node.pid)
        except BaseException:
            print(fleet.tail("node", 40), file=sys.stderr)
            raise
    return {
        "rss idle": before,
        "rss loaded": after,
        "bytes per record": (after - before) * 2**20 / args.records,
        "load records/s": args.records / seconds,
    }


async def build_ring(count: int) -> list[Node]:
    """``count`` nodes on one in-process network, every one replicating every key, settled."""
    network = LocalNetwork()
    pm = plugin_manager(load_entrypoints=False)
    config = Config(
        transport="local",
        load_entrypoints=False,
        replicas=count,
        write_quorum=min(2, count),
        read_quorum=min(2, count),
        # nothing runs by itself: the script drives every step
        stabilize_interval=3600.0,
        fix_fingers_interval=3600.0,
        check_predecessor_interval=3600.0,
        anti_entropy_interval=3600.0,
    )
    nodes: list[Node] = []
    for _ in range(count):
        join = nodes[0].address if nodes else None
        node = Node(config, join=join, pm=pm, transport=LocalTransport(network))
        await node.start()
        nodes.append(node)
        for _round in range(60):
            if exact(v for n in nodes for v in n.ring.vnodes):
                break
            for member in nodes:
                await member.ring.check_predecessor()
                await member.ring.stabilize()
        else:
            raise RuntimeError("the in-process ring did not settle")
    for node in nodes:
        await node.ring.fix_all()
    return nodes


async def timed_pass(node: Node) -> dict[str, float]:
    """Run one maintenance pass on ``node`` beside a ticker: the longest gap between the ticker's wake-ups
    in wall-clock time and in this thread's CPU time (which leaves out the time the operating system gave
    other processes: on a shared machine, the part of a stall that is this process's own work), the
    pass's seconds, and how many wall-clock gaps were over 50 ms."""
    stop = asyncio.Event()
    worst = {"wall": 0.0, "cpu": 0.0, "over": 0.0}

    async def ticker() -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now_wall, now_cpu = time.perf_counter(), time.thread_time()
            worst["wall"] = max(worst["wall"], now_wall - wall)
            worst["cpu"] = max(worst["cpu"], now_cpu - cpu)
            worst["over"] += now_wall - wall > 0.050
            wall, cpu = now_wall, now_cpu

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(TICK * 2)  # the ticker is running before the pass starts
    started = time.perf_counter()
    try:
        await node.kv.maintain()
    finally:
        worst["seconds"] = time.perf_counter() - started
        stop.set()
        await task
    return worst


async def measure_stall(args: argparse.Namespace) -> dict[str, float]:
    """Build the in-process ring, fill every node's storage, and time the first node's passes."""
    nodes = await build_ring(args.ring_nodes)
    try:
        for record in records(args):
            for node in nodes:
                await node.storage.put(record)
        first = await timed_pass(nodes[0])
        for node in nodes[1:]:
            await node.kv.maintain()
        settled = await timed_pass(nodes[0])
    finally:
        for node in nodes:
            await node.close()
    figures: dict[str, float] = {}
    for name, found in (("first", first), ("settled", settled)):
        figures[f"{name} pass stall ms"] = found["wall"] * 1e3
        figures[f"{name} pass cpu stall ms"] = found["cpu"] * 1e3
        figures[f"{name} pass s"] = found["seconds"]
        figures[f"{name} pass gaps > 50 ms"] = found["over"]
    return figures


UNITS = {
    "rss idle": ("RSS of the idle node", "MB"),
    "rss loaded": ("RSS with the records", "MB"),
    "bytes per record": ("RSS per record", "bytes"),
    "load records/s": ("load through kv.store", "records/s"),
    "first pass stall ms": ("first pass: longest event-loop stall", "ms"),
    "first pass cpu stall ms": ("first pass: longest stall, CPU time", "ms"),
    "first pass s": ("first pass: duration", "s"),
    "first pass gaps > 50 ms": ("first pass: stalls over 50 ms", "count"),
    "settled pass stall ms": ("settled pass: longest event-loop stall", "ms"),
    "settled pass cpu stall ms": ("settled pass: longest stall, CPU time", "ms"),
    "settled pass s": ("settled pass: duration", "s"),
    "settled pass gaps > 50 ms": ("settled pass: stalls over 50 ms", "count"),
}
"""Each figure's label and unit, in the order printed."""


def print_table(figures: Mapping[str, float], baseline: Mapping[str, float]) -> None:
    """Print the figures as a Markdown table."""
    head = ["figure", "value", "unit", *(["vs baseline"] if baseline else [])]
    lines = []
    for name, (label, unit) in UNITS.items():
        if name not in figures:
            continue
        value = figures[name]
        whole = unit == "count" or abs(value) >= 100
        line = [label, f"{value:,.0f}" if whole else f"{value:,.2f}", unit]
        if baseline:
            line.append(ratio(value, baseline.get(name), ".3g"))
        lines.append(line)
    table(head, lines)


async def run(args: argparse.Namespace) -> dict[str, float]:
    """The measurements asked for, one after the other (never two at once on the machine)."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="balancer-bench-") as folder:
        if args.only in (None, "rss"):
            figures.update(await measure_rss(args, Path(folder)))
        if args.only in (None, "stall"):
            figures.update(await measure_stall(args))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--key-bytes", type=int, default=16)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2048, help="records per kv.store request")
    parser.add_argument("--ring-nodes", type=int, default=3, help="nodes of the in-process ring")
    parser.add_argument("--only", choices=["rss", "stall"], help="run only one of the measurements")
    add_common_arguments(parser, seed=20261129, saved="figures")
    args = parser.parse_args(argv)
    if args.records < 1 or args.key_bytes < 1 or args.value_bytes < 0:
        parser.error("--records and --key-bytes must be positive, --value-bytes non-negative")
    if not 1 <= args.batch <= 4096 or args.ring_nodes < 1:
        parser.error("--batch must be in [1, 4096] and --ring-nodes positive")
    baseline: dict[str, float] = read_json(args.baseline) if args.baseline else {}
    print(
        f"{args.records:,} records of {args.key_bytes}-byte keys and {args.value_bytes}-byte values, seed "
        f"{args.seed}; {machine()}\n"
    )
    started = time.perf_counter()
    try:
        figures = asyncio.run(run(args))
    except (BenchError, KeyboardInterrupt) as exc:
        return failed(exc)
    print_table(figures, baseline)
    print(f"{time.perf_counter() - started:.0f} s")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
