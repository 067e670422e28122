"""Benchmark: the routing middleware as a pure proxy, against the same backends hit directly.

Three backend processes serve a trivial JSON handler on ``GET /items/{key}``. A front-door process runs
an aiohttp application with ``setup_routing(app, balancer=BoundedLoadBalancer(backends))`` and no
handler of its own that is ever reached: every request is forwarded to the backend bounded-load hashing
picks for its key (load = requests in flight). For each concurrency (``--concurrency``, 32 and 128) the
same seeded keys (``--keys``, 10,000 distinct) are requested for ``--seconds`` (10) each, after a
``--warmup`` (1 s) whose figures are thrown away:

- *direct*: one load generator per backend, sending it the keys the balancer would send it (its
  ``peek``), the connections split evenly between the three;
- *proxy*: one load generator sending every key to the front door, which proxies it;
- *redirect* (``--modes``): the same against a front door in ``mode="redirect"``, which answers 307 to
  the owner; the client does not follow it, so this is the cost of the routing decision alone.

Printed: requests per second, p50 and p99 latency, failed requests (socket errors, timeouts, and
answers of status 400 or more), the CPU each group of processes used (100% is one core; ``rest`` is the
rest of the machine: the kernel's network work and any other program, a sign of a noisy run) and the ratio
through / direct of requests per second: the figure this benchmark is for. Below the table: the front
door's CPU time (user and system) per request, which moves less than the rates when other programs share
the machine. The load generator is
``wrk`` (one process per target, ``-t1``, a Lua script walking the keys and reporting 1,000 latency
quantiles) when it is on the PATH, else a Python client (aiohttp, one process per target, one task per
connection). Every process is on 127.0.0.1 and the client shares the machine's cores with the servers,
which the header line says. Latency percentiles of several generators are merged by weighting each
generator's quantiles with its request count.

This file is also the load harness of ``benchmarks/http_kv.py``: load generators, quantile merging, the
CPU each group of processes used, and the cells of those figures; what every benchmark shares (server
processes, ports, tables, the ``--json``/``--baseline`` files) is in ``benchmarks/_harness.py``.

Backend and front-door ports are drawn from the seed, so which backend owns which key repeats.

Exit status: 0 when every measurement ran, whatever the figures; 1 when a process failed to start or
run; 130 when interrupted (SIGINT or SIGTERM; the servers are killed either way).

Run: python benchmarks/middleware.py [--seconds 10] [--warmup 1] [--concurrency 32,128] [--keys 10000]
     [--modes proxy,redirect] [--client auto|wrk|python] [--seed S] [--json out.json]
     [--baseline old.json]   (adds a column: requests/s relative to the baseline run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from _harness import (
    HOST,
    Baseline,
    BenchError,
    Fleet,
    add_common_arguments,
    failed,
    free_port,
    make_keys,
    sigterm_interrupts,
    table,
    write_json,
)
from aiohttp import web

from balancer import BoundedLoadBalancer
from balancer.middleware import setup_routing

HERE = Path(__file__).resolve()
QUANTILES = 1000
"""Latencies each load generator reports: at 0.1 %, 0.2 %, ..., 100 % of its requests."""
RESULT_TAG = "LOAD-RESULT "
"""Prefix of the one line of JSON a load generator prints its result on."""
MAX_REQUESTS = 10_000_000
"""Bound on the requests one Python load-generator connection sends, whatever the duration."""


# -- servers and their CPU -----------------------------------------------------------------------


def serve(app: web.Application, port: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Run ``app`` on 127.0.0.1:``port`` until the process is killed (server roles of these scripts),
    on ``loop`` if given (a uvloop loop, say)."""
    web.run_app(app, host=HOST, port=port, print=None, access_log=None, loop=loop)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (Linux ``/proc``; 0 elsewhere or once gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU seconds all cores spent busy since boot, by ``/proc/stat`` (0 where there is none)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- load generation -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """One load generator's work: ``connections`` connections to ``address``, each sending one request
    after another for ``seconds`` (whole seconds with wrk), the requests walking ``paths`` in turn."""

    address: str
    paths: tuple[str, ...]
    connections: int
    seconds: float
    method: str = "GET"
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Sample:
    """What one load generator measured; latencies in milliseconds."""

    requests: int
    """Answers received, whatever their status."""
    seconds: float
    errors: int
    """Requests that got no answer: connect, read and write errors, timeouts."""
    bad: int
    """Answers with status 400 or more."""
    quantiles: tuple[float, ...]
    """Latency at 0.1 %, 0.2 %, ..., 100 % of the answers (:data:`QUANTILES` values)."""


@dataclass(frozen=True, slots=True)
class Measure:
    """Several load generators' samples, merged; latencies in milliseconds."""

    rps: float
    p50: float
    p99: float
    requests: int
    failed: int
    """Requests without an answer plus answers of status 400 or more."""
    cpu: dict[str, float]
    """CPU used by each group of processes during the run, in cores (1.0 = one core all the time); ``rest``
    is what the rest of the machine used meanwhile (kernel network work, other programs)."""


def quantile(samples: Sequence[Sample], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of the samples' latencies taken together.

    Each sample's quantiles stand for equal shares of its answers, so generators that answered more
    weigh more; the error is at most one quantile step (0.1 % of the answers).
    """
    points = sorted(
        (value, s.requests / len(s.quantiles)) for s in samples if s.requests for value in s.quantiles
    )
    if not points:
        return math.nan
    wanted = q * sum(weight for _, weight in points)
    seen = 0.0
    for value, weight in points:
        seen += weight
        if seen >= wanted * (1 - 1e-12):
            return value
    return points[-1][0]


def wrk_version() -> str | None:
    """``wrk 4.1.0``-style name of the wrk on the PATH, or None if there is none."""
    path = shutil.which("wrk")
    if path is None:
        return None
    done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"wrk\s+(\S+)", done.stdout + done.stderr)
    version = match.group(1) if match else "?"
    return f"wrk {version.removeprefix('debian/')}"


def choose_client(wanted: str) -> str:
    """``wrk`` or ``python``: ``auto`` takes wrk when it is installed."""
    if wanted == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if wanted == "wrk" and not shutil.which("wrk"):
        raise BenchError("--client wrk: wrk is not on the PATH (apt-get install -y wrk)")
    return wanted


def describe_client(client: str) -> str:
    """The header line naming the load generator and the machine it shares with the servers."""
    if client == "wrk":
        name = f"{wrk_version()} (-t1, one process per target, Lua script)"
    else:
        name = (
            f"a Python aiohttp {aiohttp.__version__} client (one process per target, a task per connection)"
        )
    return (
        f"load generator: {name}; client and servers share this machine's {os.cpu_count()} cores; "
        f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}"
    )


_WRK_SCRIPT = """\
local paths = {%(paths)s}
local method = "%(method)s"
local body = %(body)s
local headers = {}
if body ~= nil then headers["Content-Type"] = "application/octet-stream" end
local counter = 0
local started = 0

function setup(thread)
  thread:set("offset", started * 7919)
  started = started + 1
end

function init(args)
  counter = offset or 0
end

function request()
  counter = counter + 1
  return wrk.format(method, paths[(counter %% #paths) + 1], headers, body)
end

function done(summary, latency, requests)
  local q = {}
  for i = 1, %(quantiles)d do q[i] = string.format("%%.1f", latency:percentile(i * 100 / %(quantiles)d)) end
  local e = summary.errors
  io.write(string.format(
    '%(tag)s{"requests":%%d,"duration_us":%%d,"errors":%%d,"bad":%%d,"quantiles_us":[%%s]}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    table.concat(q, ",")))
end
"""


def wrk_script(load: Load) -> str:
    """The Lua script that makes wrk send ``load``'s requests and print its :class:`Sample`."""
    safe = re.compile(r"[A-Za-z0-9/_:.~-]*")
    if not all(safe.fullmatch(p) for p in load.paths) or not re.fullmatch(rb"[A-Za-z0-9 ]*", load.body):
        raise ValueError("paths and bodies are kept to characters that need no escaping in Lua")
    return _WRK_SCRIPT % {
        "paths": ",".join(f'"{p}"' for p in load.paths),
        "method": load.method,
        "body": f'"{load.body.decode()}"' if load.body else "nil",
        "quantiles": QUANTILES,
        "tag": RESULT_TAG,
    }


def parse_result(output: str) -> Sample:
    """The :class:`Sample` in a load generator's output (wrk's Lua report or the Python client's)."""
    line = next((x for x in output.splitlines() if x.startswith(RESULT_TAG)), None)
    if line is None:
        raise BenchError(f"the load generator printed no result:\n{output[-2000:]}")
    data = json.loads(line.removeprefix(RESULT_TAG))
    return Sample(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        errors=int(data["errors"]),
        bad=int(data["bad"]),
        quantiles=tuple(v / 1e3 for v in data["quantiles_us"]),
    )


def generator_command(load: Load, client: str, folder: Path, index: int) -> list[str]:
    """The command of one load generator process, its script or spec written to ``folder``."""
    if client == "wrk":
        script = folder / f"load-{index}.lua"
        script.write_text(wrk_script(load))
        seconds = max(1, round(load.seconds))
        return [
            "wrk",
            "-t1",
            f"-c{load.connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://{load.address}/",
        ]
    spec = folder / f"load-{index}.json"
    fields = asdict(load)
    fields["body"] = load.body.decode("latin-1")
    spec.write_text(json.dumps(fields))
    return [sys.executable, str(HERE), "--role", "load", "--spec", str(spec)]


def run_generators(loads: Sequence[Load], client: str) -> list[Sample]:
    """Run one generator process per load, all at once, and collect their samples."""
    with tempfile.TemporaryDirectory(prefix="balancer-load-") as tmp:
        folder = Path(tmp)
        processes = []
        try:
            for i, load in enumerate(loads):
                command = generator_command(load, client, folder, i)
                with (folder / f"load-{i}.out").open("wb") as out:
                    processes.append(
                        subprocess.Popen(
                            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                        )
                    )
            longest = max(load.seconds for load in loads)
            for process in processes:
                process.wait(timeout=longest + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"a load generator did not finish: {exc}") from exc
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
        samples = []
        for i, process in enumerate(processes):
            output = (folder / f"load-{i}.out").read_text(errors="replace")
            if process.returncode != 0:
                raise BenchError(f"load generator {i} exited with {process.returncode}:\n{output[-2000:]}")
            samples.append(parse_result(output))
        return samples


def measure(
    loads: Sequence[Load],
    client: str,
    *,
    warmup: float,
    watch: Mapping[str, Sequence[subprocess.Popen[bytes]]],
) -> Measure:
    """Run ``loads`` at once (after a warm-up with the same loads), merge what they measured, and the CPU
    the ``watch``-ed groups of server processes and the load generators (``client``) used meanwhile.
    """
    if warmup > 0:
        run_generators([replace(x, seconds=warmup) for x in loads], client)
    before = {name: sum(cpu_seconds(p.pid) for p in group) for name, group in watch.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = machine_cpu_seconds()
    started = time.perf_counter()
    samples = run_generators(loads, client)
    wall = time.perf_counter() - started
    machine = machine_cpu_seconds() - machine
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {
        name: (sum(cpu_seconds(p.pid) for p in group) - before[name]) / wall for name, group in watch.items()
    }
    cpu["client"] = (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / wall
    if machine > 0:
        cpu["rest"] = max(0.0, machine / wall - sum(cpu.values()))
    return Measure(
        rps=sum(s.requests / s.seconds for s in samples if s.seconds > 0),
        p50=quantile(samples, 0.50),
        p99=quantile(samples, 0.99),
        requests=sum(s.requests for s in samples),
        failed=sum(s.errors + s.bad for s in samples),
        cpu=cpu,
    )


def split(total: int, parts: int) -> list[int]:
    """``total`` connections over ``parts`` generators, as evenly as can be (at least one each)."""
    return [max(1, total // parts + (i < total % parts)) for i in range(parts)]


async def python_load(load: Load) -> Sample:
    """The Python load generator: one task per connection, for ``load.seconds``."""
    latencies: list[float] = []
    errors = bad = 0
    url = f"http://{load.address}"
    data = load.body or None
    connector = aiohttp.TCPConnector(limit=load.connections)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + load.seconds

        async def connection(offset: int) -> None:
            nonlocal errors, bad
            for i in range(offset, offset + MAX_REQUESTS):
                if time.perf_counter() >= deadline:
                    return
                path = load.paths[i % len(load.paths)]
                sent = time.perf_counter()
                try:
                    async with session.request(
                        load.method, url + path, data=data, allow_redirects=False
                    ) as response:
                        await response.read()
                        bad += response.status >= 400
                except (aiohttp.ClientError, TimeoutError, OSError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(connection(k * 7919) for k in range(load.connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    steps = [
        latencies[max(0, math.ceil(n * i / QUANTILES) - 1)] if n else 0.0 for i in range(1, 1 + QUANTILES)
    ]
    return Sample(n, elapsed, errors, bad, tuple(steps))


def run_python_load(spec: Path) -> None:
    """Role ``load``: run the Python load generator on the spec file and print its result line."""
    fields = json.loads(spec.read_text())
    fields["paths"] = tuple(fields["paths"])
    fields["body"] = fields["body"].encode("latin-1")
    sample = asyncio.run(python_load(Load(**fields)))
    result = {
        "requests": sample.requests,
        "duration_us": sample.seconds * 1e6,
        "errors": sample.errors,
        "bad": sample.bad,
        "quantiles_us": [v * 1e6 for v in sample.quantiles],
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- reporting -----------------------------------------------------------------------------------


def cpu_cell(cpu: Mapping[str, float]) -> str:
    """``front 98%, backends 75%, client 40%, rest 5%`` (100% is one core)."""
    return ", ".join(f"{name} {share:.0%}" for name, share in cpu.items())


def caveats(rows: Sequence[Mapping[str, Any]], name: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Lines flagging rows whose figures say more about the machine than about the server under test: a
    load generator near a core of its own (it, not the server, may be the limit), or other programs busy."""
    lines = []
    for row in rows:
        client, rest = row["cpu"].get("client", 0.0), row["cpu"].get("rest", 0.0)
        if client >= 0.9:
            lines.append(
                f"WARNING {name(row)}: the load generator used {client:.0%} of a core, it may be the limit"
            )
        if rest >= 0.25:
            lines.append(
                f"WARNING {name(row)}: the rest of the machine used {rest:.0%} of a core: a noisy run"
            )
    return lines


def measure_fields(m: Measure) -> dict[str, Any]:
    """A :class:`Measure` as JSON-safe row fields."""
    return {
        "rps": m.rps,
        "p50_ms": m.p50,
        "p99_ms": m.p99,
        "requests": m.requests,
        "failed": m.failed,
        "cpu": m.cpu,
    }


def measure_cells(row: Mapping[str, Any]) -> list[str]:
    """requests/s, p50, p99, failed and CPU cells of a row made by :func:`measure_fields`."""
    return [
        f"{row['rps']:,.0f}",
        f"{row['p50_ms']:.2f}",
        f"{row['p99_ms']:.2f}",
        f"{row['failed']:,} / {row['requests']:,}",
        cpu_cell(row["cpu"]),
    ]


def add_load_arguments(parser: argparse.ArgumentParser, *, keys: int) -> None:
    """The options both HTTP benchmarks share."""
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured run before each (0: none)")
    parser.add_argument("--keys", type=int, default=keys, help="distinct keys requested")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto", help="load generator")
    add_common_arguments(parser, compare="requests/s")
    # the roles the script plays in its own child processes
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


# -- this benchmark ------------------------------------------------------------------------------


def backend_app(address: str) -> web.Application:
    """A backend: ``GET /items/{key}`` answers a small JSON object."""

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"key": request.match_info["key"], "served_by": address})

    app = web.Application()
    app.router.add_get("/items/{key}", item)
    return app


def front_app(backends: Sequence[str], mode: str) -> web.Application:
    """The front door: routes every ``/items/{key}`` to a backend, handling none itself."""

    async def unreachable(request: web.Request) -> web.Response:
        return web.Response(status=500, text="the front door handled a request itself")

    app = web.Application()
    app.router.add_get("/items/{key}", unreachable)
    setup_routing(app, balancer=BoundedLoadBalancer(backends), mode=mode)
    return app


def run_role(args: argparse.Namespace) -> None:
    """Play one of the child-process roles of this script."""
    address = f"{HOST}:{args.port}"
    if args.role == "backend":
        serve(backend_app(address), args.port)
    elif args.role == "front":
        serve(front_app(args.backends.split(","), args.mode), args.port)
    elif args.role == "load":
        run_python_load(Path(args.spec))
    else:
        raise SystemExit(f"unknown role {args.role!r}")


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row across runs, for baseline comparison."""
    return f"{row['concurrency']}/{row['path']}"


def bench(args: argparse.Namespace, client: str, logs: Path) -> list[dict[str, Any]]:
    """Start the processes, run every measurement, return the rows."""
    keys = make_keys(args.keys, args.seed)
    ports = random.Random(args.seed)
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    with Fleet(logs) as fleet:
        backends = [f"{HOST}:{free_port(ports)}" for _ in range(3)]
        for i, address in enumerate(backends):
            port = address.rpartition(":")[2]
            fleet.start(f"backend-{i}", [sys.executable, str(HERE), "--role", "backend", "--port", port])
        fronts: dict[str, str] = {}
        for mode in modes:
            fronts[mode] = f"{HOST}:{free_port(ports)}"
            port = fronts[mode].rpartition(":")[2]
            command = [sys.executable, str(HERE), "--role", "front", "--port", port, "--mode", mode]
            fleet.start(f"front-{mode}", [*command, "--backends", ",".join(backends)])
        for i, address in enumerate(backends):
            fleet.wait_answering(f"backend-{i}", f"http://{address}/items/{keys[0]}")
        if "proxy" in fronts:
            fleet.wait_answering("front-proxy", f"http://{fronts['proxy']}/items/{keys[0]}")
        if "redirect" in fronts:
            # a 307 is not 200 to urllib, which follows it: answering the owner's 200 means both are up
            fleet.wait_answering("front-redirect", f"http://{fronts['redirect']}/items/{keys[0]}")
        owner = BoundedLoadBalancer(backends)
        mine = {b: tuple(f"/items/{k}" for k in keys if owner.peek(k) == b) for b in backends}
        every = tuple(f"/items/{k}" for k in keys)
        group = [fleet.processes[f"backend-{i}"] for i in range(3)]
        for concurrency in args.concurrency:
            loads = [
                Load(b, mine[b], c, args.seconds)
                for b, c in zip(backends, split(concurrency, 3), strict=True)
            ]
            direct = measure(loads, client, warmup=args.warmup, watch={"backends": group})
            fleet.check()
            rows.append({"concurrency": concurrency, "path": "direct", **measure_fields(direct)})
            for mode in modes:
                watch = {"front": [fleet.processes[f"front-{mode}"]], "backends": group}
                through = measure(
                    [Load(fronts[mode], every, concurrency, args.seconds)],
                    client,
                    warmup=args.warmup,
                    watch=watch,
                )
                fleet.check()
                row = {"concurrency": concurrency, "path": mode, **measure_fields(through)}
                row["ratio"] = through.rps / direct.rps if direct.rps else None
                rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]], baseline: Baseline) -> None:
    """The table of every measurement."""
    head = [
        "concurrency",
        "path",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "failed / requests",
        "CPU (100% = 1 core)",
    ]
    head += ["through / direct"]
    if baseline:
        head += ["vs baseline", "baseline ratio"]
    lines = []
    for row in rows:
        ratio = row.get("ratio")
        cells = [str(row["concurrency"]), row["path"], *measure_cells(row)]
        cells.append("-" if ratio is None else f"**{ratio:.2f}**")
        if baseline:
            cells += [baseline.ratio(row, "rps"), *baseline.figure(row, "ratio", ".2f")]
        lines.append(cells)
    table(head, lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_load_arguments(parser, keys=10_000)
    parser.add_argument("--concurrency", default="32,128", help="open connections, one run each")
    parser.add_argument("--modes", default="proxy,redirect", help="front-door modes: proxy, redirect")
    parser.add_argument("--backends", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        run_role(args)
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if any(c < 3 for c in args.concurrency):
        parser.error("--concurrency must be at least 3 (the direct run splits it over three backends)")
    if not set(args.modes.split(",")) <= {"proxy", "redirect"}:
        parser.error("--modes takes proxy and/or redirect")
    started = time.perf_counter()
    try:
        client = choose_client(args.client)
        baseline = Baseline.load(args.baseline, row_key)
        print(
            f"Routing middleware: 3 backend processes (aiohttp, JSON on /items/{{key}}), a front door with "
            f"setup_routing(balancer=BoundedLoadBalancer(backends)); {args.keys:,} keys, seed {args.seed}, "
            f"{args.seconds:g} s per run after {args.warmup:g} s of warm-up\n{describe_client(client)}\n"
        )
        with tempfile.TemporaryDirectory(prefix="balancer-bench-") as logs:
            rows = bench(args, client, Path(logs))
    except (BenchError, KeyboardInterrupt) as exc:  # SIGINT, or SIGTERM (see below): servers killed by now
        return failed(exc)
    print_rows(rows, baseline)
    for line in caveats(rows, row_key):
        print(line)
    for row in rows:
        if row.get("ratio") is not None and row["path"] == "proxy":
            ratio, concurrency = row["ratio"], row["concurrency"]
            print(f"proxy through the front door / direct, concurrency {concurrency}: {ratio:.2f}")
    for row in rows:
        if "front" in row["cpu"] and row["rps"]:
            # CPU per request moves less than requests/s when other programs share the machine
            cost = row["cpu"]["front"] / row["rps"] * 1e6
            print(
                f"front door CPU per request, {row['path']}, concurrency {row['concurrency']}: {cost:.0f} us"
            )
    if any(row["path"] == "redirect" for row in rows):
        print("redirect rows: the front door's 307 answers, not followed (a client pays a second request)")
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sigterm_interrupts()
    sys.exit(main())
