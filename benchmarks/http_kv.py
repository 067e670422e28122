"""Benchmark: the key-value HTTP API of ``balancer node`` processes, against a bare aiohttp application.

Every server is its own process on 127.0.0.1; the load generator (wrk, else a Python client: see
``benchmarks/middleware.py``, whose load harness this script uses) keeps ``--connections`` (64) connections
busy for ``--seconds`` (10) per run, after a ``--warmup`` (1 s) whose figures are thrown away, walking
``--keys`` (1,000) seeded keys, and shares the machine's cores with the servers. Measured, in one run:

- *bare*: an aiohttp application whose one handler answers ``GET /kv/{key}`` with a fixed body of
  ``--value-bytes`` (100) bytes: the ceiling any aiohttp server on this machine has;
- *1 node*: ``balancer node --ring --replicas 1 --write-quorum 1 --read-quorum 1 --no-plugins``:
  ``GET /kv/{key}`` on keys written beforehand (values of ``--value-bytes``), then ``PUT /kv/{key}``;
- *3-node ring*: three ``balancer node`` processes with the defaults N = 3, W = 2, R = 2 (one creates the
  ring, two join it; measured once the ring has settled, as ``GET /ring`` and each node's ``/status``
  report it):
  ``GET`` and then ``PUT /kv/{key}``, all sent to the node that created the ring. Ports are drawn from
  the seed, so node ids repeat (a settled ring of three answers every lookup without an RPC).

Printed: requests per second, p50 and p99 latency, failed requests (socket errors, timeouts, answers of
status 400 or more: a GET of a key that was not written counts), the CPU each group of processes used
(100% is one core; ``rest`` is the rest of the machine: kernel network work and any other program), and
each figure's requests/s over bare's. The mission's targets are GET / bare at least 0.5 and PUT (N = 3,
W = 2) / bare at least 0.25; the script says for each whether this run met it. They are reported
figures, not gates.

Exit status: 0 when every measurement ran, whatever the figures; 1 when a process failed to start or
run; 130 when interrupted (SIGINT or SIGTERM; the servers are killed either way).

Run: python benchmarks/http_kv.py [--seconds 10] [--warmup 1] [--connections 64] [--keys 1000]
     [--value-bytes 100] [--client auto|wrk|python] [--seed S] [--json out.json]
     [--baseline old.json]   (adds a column: requests/s relative to the baseline run)
(Not ``http.py``: run as a script, a file of that name in this folder would stand in for the standard
library's ``http`` module in every script here, and aiohttp would fail to import.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from _harness import (
    HOST,
    Baseline,
    BenchError,
    Fleet,
    failed,
    free_port,
    http_get,
    make_keys,
    sigterm_interrupts,
    table,
    write_json,
)
from aiohttp import web
from middleware import (
    Load,
    Measure,
    add_load_arguments,
    caveats,
    choose_client,
    describe_client,
    measure,
    measure_cells,
    measure_fields,
    serve,
)

HERE = Path(__file__).resolve()
GET_TARGET = 0.5
"""GET requests/s over bare's that the mission asks for."""
PUT_TARGET = 0.25
"""PUT (N = 3, W = 2) requests/s over bare's that the mission asks for."""
PREWRITE_CONCURRENCY = 16


def bare_app(body: bytes) -> web.Application:
    """The bare server: one handler, ``GET /kv/{key}``, answering ``body`` whatever the key."""

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/kv/{key}", fixed)
    return app


def node_command(port: int, join: str | None, n: int, w: int, r: int, loop: str = "asyncio") -> list[str]:
    """The ``balancer node`` command line of one ring member, on the event loop ``loop``."""
    where = ["--join", join] if join else ["--ring"]
    quorums = ["--replicas", str(n), "--write-quorum", str(w), "--read-quorum", str(r)]
    node = [sys.executable, "-m", "balancer", "node", "--port", str(port), "--loop", loop]
    return [*node, *where, *quorums, "--no-plugins"]


def ring_formed(addresses: Sequence[str]) -> bool:
    """Whether the ring has settled (``GET /ring``: every successor list exact) with every node up, and
    every node has too (``GET /status``: a maintenance pass synced it since the ring last changed)."""
    reply = http_get(f"http://{addresses[0]}/ring", timeout=2)
    if reply is None or reply[0] != 200:
        return False
    view = json.loads(reply[1])
    states = {m["address"]: m["state"] for m in view["members"]}
    if not view["settled"] or states != dict.fromkeys(addresses, "up"):
        return False
    for address in addresses:  # and every node has synced with its peers since (GET /status: settled)
        status = http_get(f"http://{address}/status", timeout=2)
        if status is None or status[0] != 200 or not json.loads(status[1]).get("settled"):
            return False
    return True


async def prewrite(address: str, keys: Sequence[str], value: bytes, timeout: float) -> None:
    """PUT ``value`` under every key through ``address``, a few at a time; :class:`BenchError` if one
    is still refused at the deadline."""
    deadline = time.monotonic() + timeout
    pending = list(reversed(keys))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def writer() -> None:
            while pending:
                key = pending.pop()
                while True:  # the ring may still be settling: retry until the deadline
                    try:
                        async with session.put(f"http://{address}/kv/{key}", data=value) as response:
                            await response.read()
                            if response.status == 200:
                                break
                            problem = f"status {response.status}"
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        problem = repr(exc)
                    if time.monotonic() > deadline:
                        raise BenchError(f"writing {key!r} through {address} failed: {problem}")
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(writer() for _ in range(PREWRITE_CONCURRENCY)))


def check_value(address: str, key: str, value: bytes) -> None:
    """Raise :class:`BenchError` unless ``GET /kv/{key}`` on ``address`` answers ``value``."""
    reply = http_get(f"http://{address}/kv/{key}")
    if reply != (200, value):
        raise BenchError(f"{address} answered {reply!r:.200} for {key!r}, not the value written")


def make_row(server: str, method: str, quorums: str, m: Measure) -> dict[str, Any]:
    """One measurement as a table row."""
    return {"server": server, "method": method, "quorums": quorums, **measure_fields(m)}


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['server']}/{row['method']}"


def bench(args: argparse.Namespace, client: str, logs: Path) -> list[dict[str, Any]]:
    """Run the three phases one after another, each with only its own servers up; returns the rows."""
    keys = make_keys(args.keys, args.seed)
    rng = random.Random(args.seed)
    value = "".join(rng.choices(string.ascii_letters + string.digits, k=args.value_bytes)).encode()
    ports = random.Random(args.seed)
    paths = tuple(f"/kv/{k}" for k in keys)
    rows: list[dict[str, Any]] = []

    def run(address: str, method: str, watch: Mapping[str, Sequence[subprocess.Popen[bytes]]]) -> Measure:
        body = value if method == "PUT" else b""
        load = Load(address, paths, args.connections, args.seconds, method=method, body=body)
        return measure([load], client, warmup=args.warmup, watch=watch)

    with Fleet(logs / "bare") as fleet:
        port = free_port(ports)
        command = [sys.executable, str(HERE), "--role", "bare", "--port", str(port), "--loop", args.loop]
        bare = fleet.start("bare", [*command, "--value-bytes", str(args.value_bytes)])
        address = f"{HOST}:{port}"
        fleet.wait_answering("bare", f"http://{address}/kv/{keys[0]}")
        rows.append(make_row("bare aiohttp", "GET", "-", run(address, "GET", {"server": [bare]})))
        fleet.check()

    with Fleet(logs / "node") as fleet:
        port = free_port(ports)
        node = fleet.start("node", node_command(port, None, 1, 1, 1, args.loop))
        address = f"{HOST}:{port}"
        fleet.wait_answering("node", f"http://{address}/status")
        asyncio.run(prewrite(address, keys, value, timeout=60))
        check_value(address, keys[-1], value)
        quorums = "N=1 W=1 R=1"
        rows.append(make_row("1 node", "GET", quorums, run(address, "GET", {"node": [node]})))
        rows.append(make_row("1 node", "PUT", quorums, run(address, "PUT", {"node": [node]})))
        fleet.check()

    with Fleet(logs / "ring") as fleet:
        addresses = [f"{HOST}:{free_port(ports)}" for _ in range(3)]
        nodes = []
        for i, address in enumerate(addresses):
            port = int(address.rpartition(":")[2])
            join = None if i == 0 else addresses[0]
            nodes.append(fleet.start(f"node-{i}", node_command(port, join, 3, 2, 2, args.loop)))
            fleet.wait_answering(f"node-{i}", f"http://{address}/status")
        fleet.wait_until(lambda: ring_formed(addresses), "the 3-node ring forming")
        entry = addresses[0]
        asyncio.run(prewrite(entry, keys, value, timeout=60))
        for address in addresses:
            check_value(address, keys[-1], value)
        watch = {"entry node": nodes[:1], "other nodes": nodes[1:]}
        quorums = "N=3 W=2 R=2"
        for method in ("GET", "PUT"):
            rows.append(make_row("3-node ring", method, quorums, run(entry, method, watch)))
        fleet.check()

    bare_rps = rows[0]["rps"]
    for each in rows:
        each["ratio"] = each["rps"] / bare_rps if bare_rps else None
    return rows


def print_rows(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """The table of every measurement."""
    head = ["server", "request", "quorums", "requests/s", "p50 ms", "p99 ms", "failed / requests"]
    head += ["CPU (100% = 1 core)", "/ bare"]
    if baseline:
        head += ["vs baseline"]
    lines = []
    for each in rows:
        ratio = "-" if each["ratio"] is None else f"{each['ratio']:.2f}"
        cells = [each["server"], each["method"], each["quorums"], *measure_cells(each), ratio]
        if baseline:
            cells.append(baseline.ratio(each, "rps"))
        lines.append(cells)
    table(head, lines)


def print_targets(rows: list[dict[str, Any]]) -> None:
    """Each ratio the mission sets a target for, and whether this run met it."""
    found = {row_key(r): r for r in rows}
    checks = [
        ("GET, 1 node (N=1, R=1) / bare", "1 node/GET", GET_TARGET),
        ("GET, 3-node ring through one node (N=3, R=2) / bare", "3-node ring/GET", GET_TARGET),
        ("PUT, 3-node ring through one node (N=3, W=2) / bare", "3-node ring/PUT", PUT_TARGET),
    ]
    lines = []
    for name, key, target in checks:
        ratio = found[key]["ratio"]
        met = ratio is not None and ratio >= target
        lines.append(
            [name, "-" if ratio is None else f"{ratio:.2f}", f">= {target:g}", "met" if met else "MISSED"]
        )
    table(["ratio", "this run", "target", "result"], lines)
    for name, shown, wanted, result in lines:
        print(f"TARGET {result.upper()}: {name} = {shown} (target {wanted})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_load_arguments(parser, keys=1000)
    parser.add_argument("--connections", type=int, default=64, help="open connections during each run")
    parser.add_argument(
        "--value-bytes", type=int, default=100, help="bytes of every value and of bare's body"
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop of every server, bare and nodes alike (uvloop: pip install 'balancer[fast]')",
    )
    args = parser.parse_args(argv)
    if args.role == "bare":
        loop = None
        if args.loop == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        serve(bare_app(b"v" * args.value_bytes), args.port, loop)
        return 0
    if args.role:
        parser.error(f"unknown role {args.role!r}")
    if args.connections < 1 or args.keys < 1 or args.value_bytes < 1:
        parser.error("--connections, --keys and --value-bytes must be positive")
    started = time.perf_counter()
    try:
        client = choose_client(args.client)
        baseline = Baseline.load(args.baseline, row_key)
        print(
            f"KV over HTTP: {args.connections} connections, {args.keys:,} keys, values of {args.value_bytes} "
            f"bytes, seed {args.seed}, {args.seconds:g} s per run after {args.warmup:g} s of warm-up, "
            f"{args.loop} event loop in every server\n"
            f"{describe_client(client)}\n"
        )
        with tempfile.TemporaryDirectory(prefix="balancer-bench-") as tmp:
            logs = Path(tmp)
            for phase in ("bare", "node", "ring"):
                (logs / phase).mkdir()
            rows = bench(args, client, logs)
    except (BenchError, KeyboardInterrupt) as exc:  # SIGINT, or SIGTERM (see below): servers killed by now
        return failed(exc)
    print_rows(rows, baseline)
    for line in caveats(rows, row_key):
        print(line)
    print_targets(rows)
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sigterm_interrupts()
    sys.exit(main())
