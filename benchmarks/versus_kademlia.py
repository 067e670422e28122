"""Benchmark: balancer's key-value store against kademlia's (bmuller/kademlia), both used the kademlia way.

The shape of kademlia's own examples: ``--nodes`` (5) nodes in this one process and one event loop, every
operation sent through node 0, ``--keys`` (2,000) seeded keys with values of ``--value-bytes`` (64) seeded
random bytes; the same keys, values and seed for both systems. One system runs at a time (started,
measured, stopped; kademlia first), so neither's background work competes with the other's figures:

- *balancer*: ``Node`` objects on 127.0.0.1 with real sockets, over the transport ``--transport`` names
  (default: ``Config``'s default) and otherwise the default settings (32 vnodes a process, N = 3, W = 2,
  R = 2, maintenance running; entry-point plugins not loaded). Node 0 creates the ring and the others
  join it through node 0, one after another; the rows start once every node's survey of the ring
  (``Node.ring_status``) finds it settled with every process up, polled until a deadline.
  ``Node.put`` and ``Node.get`` on node 0.
- *kademlia*: ``kademlia.network.Server`` objects (k = 20, alpha = 3: its defaults) listening on UDP
  ports of 127.0.0.1, node ids drawn from the seed, each bootstrapped to node 0; the rows start once
  every routing table lists every other node, polled until a deadline. ``Server.set`` and
  ``Server.get`` on node 0.

Rows, in this order: *sequential set* (one operation at a time), *sequential get* (each get must return
the value just set), *set, N in flight* (``--concurrency``, 32, operations at once, writing a second
value to every key) and *get, N in flight* (each get must return that second value); then a fifth,
*sequential get, keys kademlia's node 0 lacks*: the same sequential gets of only the keys that
kademlia's node 0 does not store itself (see below), through both systems, which compares the two
systems' gets over the network. Before them, ``--warmup`` (200) other keys go through the first four
steps, uncounted.

Printed: the versions that ran; for each row and system, operations per second (the row's operations
over its wall-clock time), p50 and p99 latency of one operation, and failed operations (raised, took
over 30 s, returned another value, or a kademlia set that no node acknowledged); then balancer's
ops/s over kademlia's (the figure this benchmark is for) and, with ``--baseline``, each system's ops/s
over the baseline run's. The targets (balancer at least 2x kademlia's ops/s and a lower p50 on every
row) are reported for every row, not enforced.

Read the kademlia figures knowing what its get does: it answers from node 0's own storage, with no
message, whenever node 0 stored the key, and node 0 stores every key for which it is not the farthest
of the k closest nodes (with 5 nodes and k = 20, about four keys in five); the script prints that
share and the fifth row. Its set first crawls for the k closest nodes (find_node messages), then sends
a store to every node it found (all the others) and waits for them all; messages are UDP datagrams
encoded by a pure-Python msgpack. balancer's get reads R = 2 of N = 3 replicas, at least one over the
network, and its put waits for W = 2 of 3.

Exit status: 0 when both systems started and every row ran (failed operations are counted in the
table, not in the status); 1 when a system failed to start or settle; 130 when interrupted.

Run: python benchmarks/versus_kademlia.py [--keys 2000] [--value-bytes 64] [--concurrency 32]
     [--nodes 5] [--warmup 200] [--transport stream] [--quorums 3,2,2] [--loop asyncio|uvloop]
     [--seed S] [--json out.json]
     [--baseline old.json]   (adds columns: each system's ops/s relative to the baseline run)
Needs the ``bench`` extra (``pip install -e '.[bench]'``), which brings kademlia.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import platform
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import kademlia
from _harness import (
    HOST,
    Baseline,
    BenchError,
    add_common_arguments,
    failed,
    make_keys,
    percentile,
    table,
    until,
    write_json,
)
from kademlia.network import Server
from kademlia.utils import digest

import balancer
from balancer import Config, Node
from balancer.errors import BalancerError

OP_TIMEOUT = 30.0
"""Seconds one operation may take before it counts as failed."""
START_TIMEOUT = 60.0
"""Seconds a system has to start and settle."""
POLL = 0.05
"""Seconds between two looks at whether a system has settled."""
REMOTE_ROW = "sequential get, keys kademlia's node 0 lacks"
SPEED_TARGET = 2.0
"""balancer's ops/s over kademlia's that the mission asks for, on every row."""

Op = Callable[[str, bytes], Awaitable[bool]]
"""One operation on one key: True if it did what was asked (a set stored, a get returned ``value``)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One row of the table: which operation, how many in flight, on which keys and values."""

    name: str
    kind: str
    """``set`` or ``get``."""
    concurrency: int
    round: int
    """0: the first values; 1: the second values, which the concurrent set writes over the first."""
    only: tuple[str, ...] | None = None
    """The keys of this step (None: every key)."""


@dataclass(frozen=True, slots=True)
class Timing:
    """What one step measured; latencies in milliseconds."""

    ops: float
    """Operations per second over the step's wall-clock time."""
    p50_ms: float
    p99_ms: float
    count: int
    failed: int


@dataclass(frozen=True, slots=True)
class System:
    """A running system as the steps see it: its set and get through node 0."""

    set: Op
    get: Op
    holds: Callable[[str], bool] | None = None
    """Whether node 0 stores a key itself, where that decides whether a get sends any message."""


def steps(concurrency: int) -> list[Step]:
    """The four rows the comparison is about, in the order they run."""
    return [
        Step("sequential set", "set", 1, 0),
        Step("sequential get", "get", 1, 0),
        Step(f"set, {concurrency} in flight", "set", concurrency, 1),
        Step(f"get, {concurrency} in flight", "get", concurrency, 1),
    ]


def remote_step(keys: Sequence[str]) -> Step:
    """The last row: sequential gets of the keys kademlia's node 0 does not store itself."""
    return Step(REMOTE_ROW, "get", 1, 1, tuple(keys))


# -- timing ---------------------------------------------------------------------------------------


async def timed(op: Op, work: Sequence[tuple[str, bytes]], concurrency: int) -> Timing:
    """Run ``op`` on every (key, value) of ``work`` with ``concurrency`` operations in flight.

    Each of ``concurrency`` workers takes the next item as soon as its last operation ends. An
    operation that raises, returns False or takes over :data:`OP_TIMEOUT` seconds counts as failed
    (its latency is kept).
    """
    items = iter(work)
    latencies: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for key, value in items:
            began = time.perf_counter()
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    ok = await op(key, value)
            except Exception:  # any error is a failed operation, counted in the table
                ok = False
            latencies.append(time.perf_counter() - began)
            failed += not ok

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - began
    return Timing(
        ops=len(latencies) / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        count=len(latencies),
        failed=failed,
    )


async def run_steps(
    system: System, plan: Sequence[Step], values: Mapping[str, Sequence[bytes]]
) -> list[Timing]:
    """Every step of ``plan`` on the keys of ``values`` (key -> its value for each round), in order."""
    timings = []
    for step in plan:
        op = system.set if step.kind == "set" else system.get
        keys = values if step.only is None else step.only
        work = [(key, values[key][step.round]) for key in keys]
        timings.append(await timed(op, work, step.concurrency))
    return timings


# -- balancer -------------------------------------------------------------------------------------


async def balancer_set(node: Node, key: str, value: bytes) -> bool:
    """Store ``value`` under ``key`` through ``node`` (raises if the write quorum is not met)."""
    await node.put(key, value)
    return True


async def balancer_get(node: Node, key: str, value: bytes) -> bool:
    """Whether ``key`` read through ``node`` is ``value``."""
    return await node.get(key) == value


async def balancer_settled(nodes: Sequence[Node]) -> bool:
    """Whether every node's survey finds the ring settled, with exactly these processes, all up."""
    everyone = sorted(n.address for n in nodes)
    for node in nodes:
        try:
            status = await node.ring_status()
        except BalancerError:  # a node still joining does not describe itself yet
            return False
        if not status.settled or [m.address for m in status.members if m.state == "up"] != everyone:
            return False
    return True


@contextlib.asynccontextmanager
async def balancer_ring(
    count: int, transport: str, seed: int, quorums: tuple[int, int, int] = (3, 2, 2)
) -> AsyncIterator[System]:
    """``count`` nodes on 127.0.0.1, node 0 creating the ring and the others joining through it; yields
    node 0's set and get once the ring has settled. Every node is closed at the end."""
    nodes: list[Node] = []
    async with contextlib.AsyncExitStack() as stack:
        try:
            for i in range(count):
                replicas, write, read = quorums
                config = Config(
                    host=HOST,
                    transport=transport,
                    load_entrypoints=False,
                    seed=seed + i,
                    replicas=replicas,
                    write_quorum=write,
                    read_quorum=read,
                )
                node = Node(config, join=nodes[0].address if nodes else None)
                stack.push_async_callback(node.close)
                nodes.append(await node.start())
            await until(
                lambda: balancer_settled(nodes),
                f"the {count}-node balancer ring settling",
                START_TIMEOUT,
                interval=POLL,
            )
        except (BalancerError, OSError) as exc:
            raise BenchError(f"balancer: {exc!r}") from exc
        first = nodes[0]
        yield System(set=functools.partial(balancer_set, first), get=functools.partial(balancer_get, first))


# -- kademlia -------------------------------------------------------------------------------------


async def kademlia_set(server: Server, key: str, value: bytes) -> bool:
    """Store ``value`` under ``key`` through ``server``; whether any node acknowledged the store."""
    return bool(await server.set(key, value))


async def kademlia_get(server: Server, key: str, value: bytes) -> bool:
    """Whether ``key`` read through ``server`` is ``value`` (kademlia answers None when not found)."""
    return bool(await server.get(key) == value)


def kademlia_port(server: Server) -> int:
    """The UDP port ``server`` listens on."""
    return int(server.transport.get_extra_info("sockname")[1])


def kademlia_holds(server: Server, key: str) -> bool:
    """Whether ``server`` stores ``key`` itself (its get then answers from there, with no message)."""
    return digest(key) in server.storage.data


@contextlib.asynccontextmanager
async def kademlia_network(count: int, seed: int) -> AsyncIterator[System]:
    """``count`` kademlia servers on 127.0.0.1, each bootstrapped to the first; yields node 0's set and
    get once every routing table lists every other node. Every server is stopped at the end."""
    rng = random.Random(seed)
    servers: list[Server] = []
    with contextlib.ExitStack() as stack:
        try:
            for _ in range(count):
                server = Server(node_id=digest(rng.randbytes(20)))
                stack.callback(server.stop)
                await server.listen(0, interface=HOST)
                servers.append(server)
            seed_address = (HOST, kademlia_port(servers[0]))
            for server in servers[1:]:
                await server.bootstrap([seed_address])

            async def known() -> bool:
                return all(len(s.protocol.router.find_neighbors(s.node)) == count - 1 for s in servers)

            await until(known, f"the {count} kademlia routing tables filling", START_TIMEOUT, interval=POLL)
        except OSError as exc:
            raise BenchError(f"kademlia: {exc!r}") from exc
        first = servers[0]
        yield System(
            set=functools.partial(kademlia_set, first),
            get=functools.partial(kademlia_get, first),
            holds=functools.partial(kademlia_holds, first),
        )


# -- the run --------------------------------------------------------------------------------------


def make_values(keys: Sequence[str], size: int, seed: int) -> dict[str, tuple[bytes, bytes]]:
    """Two seeded random values of ``size`` bytes for every key (the first round's, the second's)."""
    rng = random.Random(f"values/{seed}")
    return {key: (rng.randbytes(size), rng.randbytes(size)) for key in keys}


async def measure(
    name: str, system: System, args: argparse.Namespace, keys: Sequence[str], remote: Sequence[str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The warm-up, then every step on ``keys``, then sequential gets of ``remote`` (None: the keys
    this system's node 0 does not store itself); one row per step, and the remote keys."""
    plan = steps(args.concurrency)
    warm = make_keys(args.warmup, args.seed + 1)
    await run_steps(system, plan, make_values([f"warm:{k}" for k in warm], args.value_bytes, args.seed + 1))
    values = make_values(keys, args.value_bytes, args.seed)
    timings = await run_steps(system, plan, values)
    if remote is None:
        holds = system.holds
        remote = [key for key in keys if holds is None or not holds(key)]
    plan.append(remote_step(remote))
    timings += await run_steps(system, plan[-1:], values)
    rows = [
        {"system": name, "operation": step.name, **asdict(timing)}
        for step, timing in zip(plan, timings, strict=True)
    ]
    return rows, list(remote)


async def bench(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Start, measure and stop each system in turn (kademlia first: its node 0 picks the remote keys);
    the rows of both and how many keys kademlia's node 0 stores itself."""
    keys = make_keys(args.keys, args.seed)
    async with kademlia_network(args.nodes, args.seed) as system:
        rows, remote = await measure("kademlia", system, args, keys, None)
    async with balancer_ring(args.nodes, args.transport, args.seed, args.quorums) as system:
        rows += (await measure("balancer", system, args, keys, remote))[0]
    return rows, len(keys) - len(remote)


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['system']}/{row['operation']}"


def quorums(text: str) -> tuple[int, int, int]:
    """``N,W,R`` as three positive integers."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N,W,R such as 3,2,2, got {text!r}")
    n, w, r = (int(p) for p in parts)
    return n, w, r


def versions(transport: str) -> str:
    """The versions that ran, as one line."""
    return (
        f"balancer {balancer.__version__} (transport {transport}, aiohttp {version('aiohttp')}), "
        f"kademlia {kademlia.__version__} (rpcudp {version('rpcudp')}, "
        f"u-msgpack-python {version('u-msgpack-python')}), Python {platform.python_version()}"
    )


def cells(row: Mapping[str, Any]) -> list[str]:
    """ops/s, p50, p99 and failed cells of one system's row."""
    return [
        f"{row['ops']:,.0f}",
        f"{row['p50_ms']:.3f}",
        f"{row['p99_ms']:.3f}",
        f"{row['failed']:,} / {row['count']:,}",
    ]


def print_rows(rows: Sequence[Mapping[str, Any]], baseline: Baseline) -> None:
    """One table: each operation's figures for both systems side by side, and their ratio."""
    found = {row_key(r): r for r in rows}
    head = ["operation"]
    for system in ("balancer", "kademlia"):
        head += [f"{system} ops/s", "p50 ms", "p99 ms", "failed"]
    head += ["balancer / kademlia"]
    if baseline:
        head += ["balancer vs baseline", "kademlia vs baseline"]
    lines = []
    for row in rows:
        if row["system"] != "balancer":
            continue
        other = found[f"kademlia/{row['operation']}"]
        ratio = row["ops"] / other["ops"] if other["ops"] else math.nan
        line = [row["operation"], *cells(row), *cells(other), f"**{ratio:.2f}x**"]
        if baseline:
            line += [baseline.ratio(each, "ops") for each in (row, other)]
        lines.append(line)
    table(head, lines)


def print_targets(rows: Sequence[Mapping[str, Any]]) -> None:
    """Each row against the targets (ops/s at least 2x kademlia's, p50 below kademlia's)."""
    found = {row_key(r): r for r in rows}
    for row in rows:
        if row["system"] != "balancer":
            continue
        other = found[f"kademlia/{row['operation']}"]
        ratio = row["ops"] / other["ops"] if other["ops"] else math.nan
        met = ratio >= SPEED_TARGET and row["p50_ms"] < other["p50_ms"]
        print(
            f"TARGET {'MET' if met else 'MISSED'}: {row['operation']}: {ratio:.2f}x kademlia's ops/s "
            f"(target >= {SPEED_TARGET:g}x), p50 {row['p50_ms']:.3f} ms against {other['p50_ms']:.3f} ms"
        )
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"FAILED OPERATIONS: {failed:,} in all (see the table)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, default=2000, help="distinct keys set and read")
    parser.add_argument("--value-bytes", type=int, default=64, help="bytes of every value")
    parser.add_argument("--concurrency", type=int, default=32, help="operations in flight (concurrent rows)")
    parser.add_argument("--nodes", type=int, default=5, help="nodes of each system")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted keys run through every step first")
    parser.add_argument(
        "--transport", default=Config().transport, help="balancer's transport plugin (default: %(default)s)"
    )
    parser.add_argument(
        "--quorums",
        type=quorums,
        default=(3, 2, 2),
        help="balancer's N,W,R (default 3,2,2; 3,3,1 keeps R + W > N and reads one replica, often local)",
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop both systems run on (uvloop: pip install 'balancer[fast]')",
    )
    add_common_arguments(parser, compare="ops/s")
    args = parser.parse_args(argv)
    if min(args.keys, args.value_bytes, args.concurrency, args.warmup) < 1 or args.nodes < 2:
        parser.error("--keys, --value-bytes, --concurrency and --warmup must be positive, --nodes at least 2")
    started = time.perf_counter()
    baseline = Baseline.load(args.baseline, row_key)
    print(
        f"balancer against kademlia: {args.nodes} nodes each in one process, every operation through "
        f"node 0, {args.keys:,} keys, values of {args.value_bytes} bytes, {args.concurrency} in flight "
        f"in the concurrent rows, {args.warmup} warm-up keys, seed {args.seed}, balancer N,W,R = "
        f"{','.join(map(str, args.quorums))}, {args.loop} event loop\n{versions(args.transport)}\n"
    )
    try:
        factory = None
        if args.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            rows, held = runner.run(bench(args))
    except (BenchError, KeyboardInterrupt) as exc:
        return failed(exc)
    print_rows(rows, baseline)
    print(
        f"kademlia's node 0 stores {held:,} of the {args.keys:,} keys itself ({held / args.keys:.0%}) and "
        f"its get answers those from its own storage with no message; the last row reads only the other "
        f"{args.keys - held:,}, through both systems.\n"
    )
    print_targets(rows)
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
