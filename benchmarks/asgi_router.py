"""Benchmark: balancer-asgi's routing middleware as a pure proxy under uvicorn, against the same backends hit
directly.

Three backend processes serve a FastAPI app under uvicorn, a small JSON object on ``GET /items/{key}``. A
front-door uvicorn process runs ``RoutingMiddleware(app, balancer=BoundedLoadBalancer(backends),
paths=["/items/{key}"])`` with no ``local``: every request is proxied to the backend that bounded-load
hashing picks for its key (load = requests in flight), and the wrapped app is never reached. For each
concurrency (``--concurrency``, 64) the same seeded keys (``--keys``, 10,000) are requested for
``--seconds`` (10) after ``--warmup`` (1 s):

- *direct*: one load generator per backend, sending it the keys the balancer would send it (its
  ``peek``), the connections split evenly;
- *asgi proxy*: one load generator sending every key to the ASGI front door;
- *aiohttp proxy* (``--aiohttp``, on by default): the same through balancer.middleware's aiohttp router
  in front of the same uvicorn backends, for comparison.

The table gives requests per second, p50 and p99 latency, failed requests, the CPU of each group of
processes, and the ratio through / direct of requests per second. The load generator, server processes,
CPU accounting and the table come from ``benchmarks/middleware.py`` and ``benchmarks/_harness.py`` (wrk
when it is on the PATH, else a Python client); uvicorn runs with its default event loop and HTTP parser
(uvloop and httptools when installed), named in the header line. Needs
``pip install -e 'contrib/balancer-asgi[test]'``.

Run: python benchmarks/asgi_router.py [--seconds 10] [--warmup 1] [--concurrency 64] [--keys 10000]
     [--no-aiohttp] [--client auto|wrk|python] [--seed S] [--json out.json]

Exit status: 0 when every measurement ran, whatever the figures; 1 when a process failed to start or
run; 130 when interrupted (the servers are killed either way).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from _harness import (
    HOST,
    BenchError,
    Fleet,
    failed,
    free_port,
    make_keys,
    sigterm_interrupts,
    table,
    write_json,
)
from balancer_asgi import Receive, RoutingMiddleware, Scope, Send
from middleware import (
    Load,
    add_load_arguments,
    caveats,
    choose_client,
    describe_client,
    front_app,
    measure,
    measure_cells,
    measure_fields,
    serve,
    split,
)

from balancer import BoundedLoadBalancer

HERE = Path(__file__).resolve()


async def unreachable(scope: Scope, receive: Receive, send: Send) -> None:
    """The front door's own app: never reached, since every keyed request is forwarded. It takes part in
    the lifespan, as frameworks' apps do, so that the middleware closes its client when the server stops."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b"the front door served a request itself"})


def uvicorn_serve(app: Any, port: int) -> None:
    """Serve ``app`` with uvicorn on 127.0.0.1:``port`` until killed; no access log."""
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, lifespan="on")


def run_role(args: argparse.Namespace) -> None:
    """Play one of the child-process roles of this script."""
    address = f"{HOST}:{args.port}"
    if args.role == "backend":
        from fastapi import FastAPI

        api = FastAPI()

        @api.get("/items/{key}")
        async def item(key: str) -> dict[str, str]:
            return {"key": key, "served_by": address}

        uvicorn_serve(api, args.port)
    elif args.role == "asgi-front":
        router = RoutingMiddleware(
            unreachable, balancer=BoundedLoadBalancer(args.backends.split(",")), paths=["/items/{key}"]
        )
        uvicorn_serve(router, args.port)
    elif args.role == "aiohttp-front":
        serve(front_app(args.backends.split(","), "proxy"), args.port)
    else:
        raise SystemExit(f"unknown role {args.role!r}")


def row_key(row: Mapping[str, Any]) -> str:
    """Identifies a row (for the caveats)."""
    return f"{row['concurrency']}/{row['path']}"


def bench(args: argparse.Namespace, client: str, logs: Path) -> list[dict[str, Any]]:
    """Start the processes, run every measurement, return the rows."""
    keys = make_keys(args.keys, args.seed)
    ports = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with Fleet(logs) as fleet:
        backends = [f"{HOST}:{free_port(ports)}" for _ in range(3)]
        for i, address in enumerate(backends):
            port = address.rpartition(":")[2]
            fleet.start(f"backend-{i}", [sys.executable, str(HERE), "--role", "backend", "--port", port])
        fronts = {"asgi proxy": f"{HOST}:{free_port(ports)}"}
        if args.aiohttp:
            fronts["aiohttp proxy"] = f"{HOST}:{free_port(ports)}"
        for name, address in fronts.items():
            role = "asgi-front" if name.startswith("asgi") else "aiohttp-front"
            port = address.rpartition(":")[2]
            command = [sys.executable, str(HERE), "--role", role, "--port", port]
            fleet.start(name, [*command, "--backends", ",".join(backends)])
        for i, address in enumerate(backends):
            fleet.wait_answering(f"backend-{i}", f"http://{address}/items/{keys[0]}")
        for name, address in fronts.items():
            fleet.wait_answering(name, f"http://{address}/items/{keys[0]}")
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
            for name, address in fronts.items():
                watch = {"front": [fleet.processes[name]], "backends": group}
                through = measure(
                    [Load(address, every, concurrency, args.seconds)], client, warmup=args.warmup, watch=watch
                )
                fleet.check()
                row = {"concurrency": concurrency, "path": name, **measure_fields(through)}
                row["ratio"] = through.rps / direct.rps if direct.rps else None
                rows.append(row)
    return rows


def print_rows(rows: Sequence[Mapping[str, Any]]) -> None:
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
    lines = []
    for row in rows:
        ratio = row.get("ratio")
        cells = [str(row["concurrency"]), row["path"], *measure_cells(row)]
        cells.append("-" if ratio is None else f"**{ratio:.2f}**")
        lines.append(cells)
    table([*head, "through / direct"], lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_load_arguments(parser, keys=10_000)
    parser.add_argument("--concurrency", default="64", help="open connections, one run each")
    parser.add_argument(
        "--no-aiohttp", dest="aiohttp", action="store_false", help="skip the aiohttp router's row"
    )
    parser.add_argument("--backends", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        run_role(args)
        return 0
    if args.baseline:
        parser.error("this benchmark does not compare with a baseline (--json still saves its rows)")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if any(c < 3 for c in args.concurrency):
        parser.error("--concurrency must be at least 3 (the direct run splits it over three backends)")
    parsers = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    started = time.perf_counter()
    try:
        client = choose_client(args.client)
        print(
            f"ASGI routing middleware: 3 uvicorn {uvicorn.__version__} backends ({parsers}, {loop}; FastAPI, "
            f"JSON on /items/{{key}}), a uvicorn front door running RoutingMiddleware(balancer="
            f"BoundedLoadBalancer(backends)); {args.keys:,} keys, seed {args.seed}, {args.seconds:g} s per "
            f"run after {args.warmup:g} s of warm-up\n{describe_client(client)}\n"
        )
        with tempfile.TemporaryDirectory(prefix="balancer-bench-") as logs:
            rows = bench(args, client, Path(logs))
    except (BenchError, KeyboardInterrupt) as exc:  # SIGINT, or SIGTERM (see below): servers killed by now
        return failed(exc)
    print_rows(rows)
    for line in caveats(rows, row_key):
        print(line)
    write_json(args.json, rows)
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sigterm_interrupts()
    sys.exit(main())
