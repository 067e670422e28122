"""Benchmark: the ring's promises at the edges, with real node processes on 127.0.0.1.

Scenarios (each started fresh, every process killed at the end):

1. ``leave``: a graceful leave under write load with N = W = R = 1 on 4 nodes. ``--writers`` (8)
   concurrent clients PUT unique keys through random nodes; one node gets SIGTERM while they write, and
   writing goes on for ``--after`` (2) seconds after it exited. Every acknowledged key is then read back
   through a remaining node: a missing or wrong value is a lost write.
2. ``poison``: a forged ``kv.store`` RPC with a version of ``[2**64 - 1, 0]`` (no cluster secret) sent to
   every node of a 5-node ring (N = 3), then 20 PUTs of that key and 20 of others through every node:
   any answer other than 200 counts as a failed write.
3. ``idle``: one node whose open-file limit is 1,024 faces ``--sockets`` (1,100) TCP connections that
   send nothing for ``--idle-seconds`` (10); meanwhile it is asked for ``/status`` every 0.5 s. Reports the
   answers it gave, the slowest, and its log's size.
4. ``suite`` (only with ``--suite-runs N``): the test suite N times in a row while two busy loops keep
   both cores busy; reports each run's outcome and duration.

Exit status: 1 if a write was lost or failed, the idle node stopped answering, a suite run failed, or
a node did not start or the ring did not settle in time.

Run: python benchmarks/edges.py [--scenarios leave,poison,idle] [--writers 8] [--after 2]
     [--sockets 1100] [--idle-seconds 10] [--suite-runs 0] [--json out.json] [--baseline old.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _harness import (
    HOST,
    BenchError,
    Fleet,
    add_common_arguments,
    failed,
    free_port,
    read_json,
    table,
    until,
    write_json,
)

FAST = [
    "--stabilize-interval",
    "0.2",
    "--rpc-timeout",
    "0.5",
    "--anti-entropy-interval",
    "0.5",
    "--no-plugins",
]
SOLO = ["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"]
ROOT = Path(__file__).resolve().parent.parent


class Ring(Fleet):
    """Node processes started by one scenario, each named by its address; killed on exit."""

    def node(self, *args: str, join: str | None = None, nofile: int | None = None) -> str:
        """Start a node that creates the ring, or joins it through ``join``, with an open-file limit of
        ``nofile`` if given; its address."""
        port = free_port()
        address = f"{HOST}:{port}"
        where = ["--join", join] if join else ["--ring"]
        command = [sys.executable, "-m", "balancer", "-v", "node", "--port", str(port), *where, *FAST, *args]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.start(address, command, setup=limit)
        return address


@contextmanager
def _ring() -> Iterator[Ring]:
    with tempfile.TemporaryDirectory(prefix="balancer-edges-") as folder, Ring(Path(folder)) as ring:
        yield ring


async def _status(http: aiohttp.ClientSession, address: str) -> dict[str, Any] | None:
    try:
        async with http.get(f"http://{address}/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return orjson.loads(await resp.read()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def _ring_view(http: aiohttp.ClientSession, address: str) -> dict[str, Any] | None:
    try:
        async with http.get(f"http://{address}/ring", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return orjson.loads(await resp.read()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def _settled(http: aiohttp.ClientSession, addresses: list[str], deadline: float = 60) -> None:
    """Wait (polling, bounded) until the first node's survey (``GET /ring``) finds the ring settled with
    exactly these processes, every one up: every vnode's successor list and predecessor exact."""

    async def settled() -> bool:
        view = await _ring_view(http, addresses[0])
        if view is None or not view["settled"]:
            return False
        states = {m["address"]: m["state"] for m in view["members"]}
        return set(states) == set(addresses) and all(state == "up" for state in states.values())

    await until(settled, f"the ring of {len(addresses)} nodes settling", deadline, interval=0.1)


async def _answering(http: aiohttp.ClientSession, address: str) -> None:
    """Wait (polling, bounded) until the node at ``address`` answers ``GET /status``."""

    async def answers() -> bool:
        return await _status(http, address) is not None

    await until(answers, f"the node at {address} answering", 30)


async def _form(http: aiohttp.ClientSession, ring: Ring, size: int, *args: str) -> list[str]:
    first = ring.node(*args)
    await _answering(http, first)
    addresses = [first] + [ring.node(*args, join=first) for _ in range(size - 1)]
    await _settled(http, addresses)
    return addresses


async def leave(writers: int, after: float) -> dict[str, Any]:
    """Scenario 1: a graceful leave under write load, N = 1."""
    with _ring() as ring:
        async with aiohttp.ClientSession() as http:
            addresses = await _form(http, ring, 4, *SOLO)
            leaver = ring.processes[addresses[1]]
            acked: dict[str, bytes] = {}
            window: list[str] = []  # acknowledged between the SIGTERM and the exit
            state = {"stop": False, "leaving": False}

            async def write(number: int) -> None:
                rng = random.Random(number)
                for sequence in range(10**6):
                    if state["stop"]:
                        return
                    key, value = f"w{number}-{sequence}", f"{number} {sequence}".encode()
                    try:
                        async with http.put(
                            f"http://{rng.choice(addresses)}/kv/{key}",
                            data=value,
                            timeout=aiohttp.ClientTimeout(total=10),
                        ) as resp:
                            if resp.status == 200:
                                acked[key] = value
                                if state["leaving"] and leaver.poll() is None:
                                    window.append(key)
                    except (aiohttp.ClientError, TimeoutError):
                        pass

            tasks = [asyncio.create_task(write(n)) for n in range(writers)]
            await asyncio.sleep(1.0)  # load before the leave
            state["leaving"] = True
            leaver.send_signal(signal.SIGTERM)
            await asyncio.to_thread(leaver.wait, 60)
            await asyncio.sleep(after)
            state["stop"] = True
            await asyncio.gather(*tasks)
            rest = [a for a, p in ring.processes.items() if p.poll() is None]
            await _settled(http, rest)
            lost = 0
            for key, value in acked.items():
                async with http.get(f"http://{rest[0]}/kv/{key}") as resp:
                    lost += resp.status != 200 or await resp.read() != value
            return {"acked": len(acked), "in window": len(window), "lost": lost}


async def poison() -> dict[str, Any]:
    """Scenario 2: one forged record with an out-of-range version, then writes of every kind."""
    with _ring() as ring:
        async with aiohttp.ClientSession() as http:
            addresses = await _form(http, ring, 5)
            record = {
                "key": base64.b64encode(b"victim").decode(),
                "value": None,
                "version": [(1 << 64) - 1, 0],
            }
            answers = []
            for address in addresses:
                async with http.post(
                    f"http://{address}/rpc/kv.store", data=orjson.dumps({"records": [record]})
                ) as resp:
                    answers.append(resp.status)
            failed = writes = 0
            for address in addresses:
                for i in range(20):
                    for key in ("victim", f"other{i}"):
                        writes += 1
                        async with http.put(f"http://{address}/kv/{key}", data=b"x") as resp:
                            failed += resp.status != 200
            return {"forged answered": sorted(set(answers)), "writes": writes, "failed": failed}


async def idle(sockets: int, seconds: float) -> dict[str, Any]:
    """Scenario 3: idle connections against a node with an open-file limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, sockets + 512)), hard))
    with _ring() as ring:
        async with aiohttp.ClientSession() as http:
            address = ring.node(*SOLO, nofile=1024)
            await _answering(http, address)
            host, port = address.split(":")
            loop = asyncio.get_running_loop()
            opened: list[socket.socket] = []
            try:
                # each connection completed before the next, as a crowd would; all within 30 s
                with suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        for _ in range(sockets):
                            sock = socket.socket()
                            opened.append(sock)
                            sock.setblocking(False)
                            with suppress(OSError):
                                await loop.sock_connect(sock, (host, int(port)))
                asked = answered = 0
                slowest = 0.0
                stop = time.monotonic() + seconds
                while time.monotonic() < stop:
                    started = time.monotonic()
                    asked += 1
                    # a new connection each time, as a new client or a new peer would open
                    async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=True)
                    ) as fresh:
                        view = await _status(fresh, address)
                    if view is not None:
                        answered += 1
                        slowest = max(slowest, time.monotonic() - started)
                    await asyncio.sleep(0.5)
            finally:
                for sock in opened:
                    sock.close()
            text = ring.log(address).read_bytes()
            return {
                "status asked": asked,
                "answered": answered,
                "slowest (s)": round(slowest, 3),
                "log lines": text.count(b"\n"),
                "log bytes": len(text),
                "tracebacks": text.count(b"Traceback"),
            }


def suite(runs: int) -> dict[str, Any]:
    """Scenario 4: the test suite while two busy loops keep both cores busy."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    outcomes = []
    try:
        for _ in range(runs):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
            outcomes.append(
                {"ok": done.returncode == 0, "seconds": round(time.monotonic() - started), "summary": last}
            )
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return {"runs": outcomes, "passed": sum(o["ok"] for o in outcomes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="leave,poison,idle")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--after", type=float, default=2.0)
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--suite-runs", type=int, default=0)
    add_common_arguments(parser, seed=None, saved="figures")
    args = parser.parse_args(argv)
    chosen = set(args.scenarios.split(","))
    results: dict[str, Any] = {}
    try:
        if "leave" in chosen:
            results["leave"] = asyncio.run(leave(args.writers, args.after))
        if "poison" in chosen:
            results["poison"] = asyncio.run(poison())
        if "idle" in chosen:
            results["idle"] = asyncio.run(idle(args.sockets, args.idle_seconds))
    except (BenchError, KeyboardInterrupt) as exc:
        return failed(exc)
    if args.suite_runs:
        results["suite"] = suite(args.suite_runs)
    baseline = read_json(args.baseline) if args.baseline else {}
    rows = []
    for scenario, figures in results.items():
        for name, value in figures.items():
            if name == "runs":
                for i, run in enumerate(value, 1):
                    rows.append(
                        [scenario, f"run {i}", f"{'pass' if run['ok'] else 'FAIL'} in {run['seconds']} s", ""]
                    )
                continue
            old = baseline.get(scenario, {}).get(name, "")
            rows.append([scenario, name, str(value), str(old)])
    table(["scenario", "figure", "this run", "baseline"], rows)
    write_json(args.json, results, indent=2)
    bad = (
        results.get("leave", {}).get("lost", 0)
        or results.get("poison", {}).get("failed", 0)
        or ("idle" in results and results["idle"]["answered"] < results["idle"]["status asked"])
        or ("suite" in results and results["suite"]["passed"] < len(results["suite"]["runs"]))
    )
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
