"""Benchmark: the ``grpc`` transport (contrib/balancer-grpc) against the default ``stream`` transport, and
the gRPC routing interceptor's forwarded calls against direct ones, in one run on one machine.

Three measurements, each printed as a table:

1. *Ring RPC round trips*, in this process: a transport serving one ``echo`` handler and another calling
   it on 127.0.0.1, for each transport: one call at a time (latency), then ``--concurrency`` (64) callers
   at once (calls/s). The payload is a small map with a ``--value-bytes`` (100) string. This isolates what
   the transport itself costs per call.
2. *KV through a 3-node ring of real processes*, for each transport: ``balancer node`` processes with
   N = 3, W = 2, R = 2 (one creates the ring, two join it; measured once it has settled), ``GET`` then
   ``PUT /kv/{key}`` over HTTP to the node that created the ring, ``--concurrency`` requests in flight
   from an aiohttp client in this process, over ``--keys`` (500) seeded keys written beforehand. The HTTP
   front is aiohttp's in both; only the ring RPCs behind it (lookups, replica reads and writes) change.
   Nodes on ``grpc`` load that plugin alone (``--no-plugins --plugin balancer_grpc``); ``stream`` nodes
   load none.
3. *The routing interceptor*: two gRPC servers, each its own process, each behind a
   :class:`~balancer_grpc.RoutingInterceptor` over the same two backends (plain consistent hashing, so
   both agree), serving a unary method with a JSON body; keys that the first server owns are sent
   ``direct`` (to the first: the interceptor decides, then the handler runs) and ``forwarded`` (to the
   second, which forwards each call to the first); ``no interceptor`` is the same server without it.
   ``--concurrency`` calls in flight from a grpc.aio client in this process.

Each measurement runs ``--seconds`` (3) after ``--warmup`` (0.5 s); the client shares the machine's cores
with the servers, so figures are lower than on separate machines, and comparable only within one run.

Exit status: 0 when every measurement ran, whatever the figures; 1 when a process failed to start or a
wait ran out; 130 when interrupted (the servers are killed either way).

Run: python benchmarks/grpc_transport.py [--seconds 3] [--warmup 0.5] [--concurrency 64] [--keys 500]
     [--value-bytes 100] [--seed S] [--json out.json] [--only rpc,kv,interceptor]
     (needs ``pip install -e contrib/balancer-grpc``)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from _harness import (
    HOST,
    BenchError,
    Fleet,
    add_common_arguments,
    failed,
    free_port,
    http_get,
    machine,
    make_keys,
    percentile,
    sigterm_interrupts,
    table,
    write_json,
)
from balancer_grpc import GrpcTransport, RoutingInterceptor

from balancer.bounded import BoundedLoadBalancer
from balancer.config import Config
from balancer.hookspecs import Payload, Transport
from balancer.plugins.stream_transport import StreamTransport

HERE = Path(__file__).resolve()
TRANSPORTS = ("stream", "grpc")
METHOD = "/bench.Items/Get"


@dataclass(frozen=True, slots=True)
class Figures:
    """One measurement: calls answered per second, latency quantiles in milliseconds, failures."""

    rps: float
    p50: float
    p99: float
    calls: int
    failed: int

    def cells(self) -> list[str]:
        return [f"{self.rps:,.0f}", f"{self.p50:.2f}", f"{self.p99:.2f}", f"{self.failed} / {self.calls}"]


async def drive(
    call: Callable[[int], Awaitable[bool]], concurrency: int, seconds: float, warmup: float
) -> Figures:
    """``concurrency`` workers making ``call(i)`` one after another for ``warmup`` then ``seconds``
    seconds; only the calls that end after the warm-up count. ``call`` answers whether it succeeded."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    counted_from = start + warmup
    stop = counted_from + seconds
    latencies: list[float] = []
    bad = 0
    counter = iter(range(1 << 62))

    async def worker() -> None:
        nonlocal bad
        while (now := loop.time()) < stop:
            try:
                ok = await call(next(counter))
            except Exception:
                ok = False
            done = loop.time()
            if done >= counted_from:
                latencies.append((done - now) * 1000)
                bad += not ok

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = max(1e-9, loop.time() - counted_from)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return Figures(len(latencies) / elapsed, p50, p99, len(latencies), bad)


# -- 1. ring RPC round trips in one process -------------------------------------------------------


def make_transport(name: str, config: Config) -> Transport:
    """A transport by name, as the node's registry would make it."""
    if name == "grpc":
        return GrpcTransport(config.evolve(extra={"grpc": {"http_port": "off"}}))
    return StreamTransport(config)


async def rpc_round_trips(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One transport's sequential and concurrent round trips to an ``echo`` handler."""
    config = Config(load_entrypoints=False, rpc_timeout=10.0)

    async def echo(payload: Payload) -> Payload:
        return payload

    server, client = make_transport(name, config), make_transport(name, config)
    port = await server.serve(HOST, 0, {"echo": echo})
    address = f"{HOST}:{port}"
    payload = {"key": "user:1", "value": "v" * args.value_bytes}
    try:

        async def call(i: int) -> bool:
            return await client.call(address, "echo", payload, 10.0) == payload

        one = await drive(call, 1, args.seconds / 2, args.warmup)
        many = await drive(call, args.concurrency, args.seconds, args.warmup)
    finally:
        await client.aclose()
        await server.aclose()
    return {"transport": name, "sequential": one, "concurrent": many}


# -- 2. KV through a ring of node processes ---------------------------------------------------------


def node_command(transport: str, port: int, http_port: int, join: str | None) -> list[str]:
    """``balancer node`` with N = 3, W = 2, R = 2 on ``transport``; a ``grpc`` node serves HTTP on
    ``http_port`` and loads the grpc plugin alone."""
    where = ["--join", join] if join else ["--ring"]
    command = [
        sys.executable,
        "-m",
        "balancer",
        "node",
        "--port",
        str(port),
        *where,
        "--transport",
        transport,
    ]
    command.append("--no-plugins")
    if transport == "grpc":
        command += ["--plugin", "balancer_grpc", "--set", f"grpc.http_port={http_port}"]
    return command


def settled(http: Sequence[str], ring: Sequence[str]) -> bool:
    """Whether the ring of ``ring`` addresses has settled with every member up, and every node synced."""
    reply = http_get(f"http://{http[0]}/ring", timeout=2)
    if reply is None or reply[0] != 200:
        return False
    view = json.loads(reply[1])
    if not view["settled"] or {m["address"]: m["state"] for m in view["members"]} != dict.fromkeys(
        ring, "up"
    ):
        return False
    for address in http:
        status = http_get(f"http://{address}/status", timeout=2)
        if status is None or status[0] != 200 or not json.loads(status[1]).get("settled"):
            return False
    return True


async def kv_ring(name: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """GET and PUT through the first node of a settled 3-node ring on ``name``."""
    keys = make_keys(args.keys, args.seed)
    rng = random.Random(args.seed)
    value = "".join(rng.choices(string.ascii_letters, k=args.value_bytes)).encode()
    (logs / name).mkdir()
    with Fleet(logs / name) as fleet:
        ports = [(free_port(), free_port()) for _ in range(3)]
        ring = [f"{HOST}:{p}" for p, _ in ports]
        http = [f"{HOST}:{h}" if name == "grpc" else f"{HOST}:{p}" for p, h in ports]
        for i, (port, http_port) in enumerate(ports):
            fleet.start(f"node-{i}", node_command(name, port, http_port, None if i == 0 else ring[0]))
            fleet.wait_answering(f"node-{i}", f"http://{http[i]}/status")
        fleet.wait_until(lambda: settled(http, ring), f"the 3-node {name} ring settling", timeout=60)
        entry = http[0]
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=10)
        ) as session:
            for key in keys:  # written beforehand, retried while the ring finishes settling
                for _ in range(100):
                    async with session.put(f"http://{entry}/kv/{key}", data=value) as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise BenchError(f"writing {key!r} through {entry} kept failing")

            async def get(i: int) -> bool:
                async with session.get(f"http://{entry}/kv/{keys[i % len(keys)]}") as resp:
                    return resp.status == 200 and await resp.read() == value

            async def put(i: int) -> bool:
                async with session.put(f"http://{entry}/kv/{keys[i % len(keys)]}", data=value) as resp:
                    await resp.read()
                    return resp.status == 200

            gets = await drive(get, args.concurrency, args.seconds, args.warmup)
            puts = await drive(put, args.concurrency, args.seconds, args.warmup)
        fleet.check()
    return {"transport": name, "GET": gets, "PUT": puts}


# -- 3. the routing interceptor -----------------------------------------------------------------------


def run_app(port: int, backends: list[str], routed: bool) -> None:
    """``--role app``: a gRPC server answering :data:`METHOD`, behind the interceptor if ``routed``."""

    async def item(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return json.dumps({"item": json.loads(request)["key"], "served_by": port}).encode()

    class Items(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            return grpc.unary_unary_rpc_method_handler(item) if details.method == METHOD else None

    async def serve() -> None:
        me = f"{HOST}:{port}"
        interceptors = []
        if routed:
            balancer = BoundedLoadBalancer(backends, load_factor=math.inf)
            interceptors.append(RoutingInterceptor(balancer=balancer, local=me))
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((Items(),))
        server.add_insecure_port(me)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def interceptor(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    """Direct, forwarded and uninterceptored calls for keys the first server owns."""
    (logs / "apps").mkdir()
    ports = [free_port() for _ in range(3)]
    addresses = [f"{HOST}:{p}" for p in ports]
    backends = addresses[:2]
    owner = BoundedLoadBalancer(backends, load_factor=math.inf)
    owned = [k for k in make_keys(args.keys * 4, args.seed) if owner.peek(k) == backends[0]]
    rows: list[dict[str, Any]] = []
    with Fleet(logs / "apps") as fleet:
        for i, port in enumerate(ports):
            role = ["--role", "app", "--port", str(port), "--backends", ",".join(backends)]
            fleet.start(f"app-{i}", [sys.executable, str(HERE), *role, *(["--plain"] if i == 2 else [])])
        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        try:
            calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
                c.unary_unary(METHOD) for c in channels
            ]

            async def ready() -> None:
                deadline = time.monotonic() + 30
                for i, call in enumerate(calls):
                    while True:
                        fleet.check()
                        try:
                            await call(json.dumps({"key": owned[0]}).encode(), timeout=1)
                            break
                        except grpc.aio.AioRpcError as exc:
                            if time.monotonic() > deadline:
                                raise BenchError(f"app-{i} did not answer: {exc.details()}") from None
                            await asyncio.sleep(0.1)

            await ready()
            for label, index in (("no interceptor", 2), ("direct (owner)", 0), ("forwarded (1 hop)", 1)):
                call = calls[index]

                async def one(i: int, call: Any = call, routed: bool = index != 2) -> bool:
                    key = owned[i % len(owned)]
                    body = json.dumps({"key": key}).encode()
                    answer = json.loads(await call(body, metadata=(("x-balancer-key", key),), timeout=10))
                    return not routed or bool(answer["served_by"] == ports[0])

                figures = await drive(one, args.concurrency, args.seconds, args.warmup)
                rows.append({"path": label, "figures": figures})
        finally:
            for channel in channels:
                await channel.close()
        fleet.check()
    return rows


# -- the report -----------------------------------------------------------------------------------------


def as_data(value: Any) -> Any:
    """``value`` with every :class:`Figures` as a dict, for ``--json``."""
    if isinstance(value, Figures):
        return asdict(value)
    if isinstance(value, dict):
        return {k: as_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_data(v) for v in value]
    return value


def ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}" if old else "-"


async def bench(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    only = set(args.only.split(","))
    head = ["requests/s", "p50 ms", "p99 ms", "failed / calls"]
    if "rpc" in only:
        rpc = [await rpc_round_trips(name, args) for name in TRANSPORTS]
        results["rpc"] = rpc
        lines = []
        for row in rpc:
            for mode, callers in (("sequential", 1), ("concurrent", args.concurrency)):
                f = row[mode]
                base = rpc[0][mode].rps
                lines.append([row["transport"], str(callers), *f.cells(), ratio(f.rps, base)])
        print("### 1. Ring RPC round trips (in one process, echo handler)\n")
        table(["transport", "callers", *head, "/ stream"], lines)
    if "kv" in only:
        kv = [await kv_ring(name, args, logs) for name in TRANSPORTS]
        results["kv"] = kv
        lines = []
        for row in kv:
            for method in ("GET", "PUT"):
                f = row[method]
                lines.append([row["transport"], method, *f.cells(), ratio(f.rps, kv[0][method].rps)])
        print("### 2. KV over HTTP through a 3-node ring of processes (N=3 W=2 R=2)\n")
        table(["ring transport", "request", *head, "/ stream"], lines)
    if "interceptor" in only:
        rows = await interceptor(args, logs)
        results["interceptor"] = rows
        base = rows[0]["figures"].rps
        print("### 3. gRPC routing interceptor: calls for keys the first server owns\n")
        lines = [[r["path"], *r["figures"].cells(), ratio(r["figures"].rps, base)] for r in rows]
        table(["sent to", *head, "/ no interceptor"], lines)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements and print their tables; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds each measurement counts")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before counting starts")
    parser.add_argument("--concurrency", type=int, default=64, help="calls or requests in flight")
    parser.add_argument("--keys", type=int, default=500, help="seeded keys written and read")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes of every value")
    parser.add_argument("--only", default="rpc,kv,interceptor", help="which measurements, comma-separated")
    add_common_arguments(parser, saved="figures")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backends", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "app":
        run_app(args.port, args.backends.split(","), routed=not args.plain)
        return 0
    if args.seconds <= 0 or args.concurrency < 1 or args.keys < 1 or args.value_bytes < 1:
        parser.error("--seconds, --concurrency, --keys and --value-bytes must be positive")
    if not set(args.only.split(",")) <= {"rpc", "kv", "interceptor"}:
        parser.error("--only takes rpc, kv and interceptor")
    print(
        f"gRPC transport and interceptor vs stream: {args.concurrency} in flight, {args.seconds:g} s per "
        f"measurement after {args.warmup:g} s, values of {args.value_bytes} bytes, seed {args.seed}\n"
        f"{machine()}, grpcio {grpc.__version__}\n"
    )
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="balancer-bench-grpc-") as tmp:
            results = asyncio.run(bench(args, Path(tmp)))
    except (BenchError, KeyboardInterrupt) as exc:
        return failed(exc)
    print(f"total runtime {time.perf_counter() - started:.0f} s")
    write_json(args.json, as_data(results))
    return 0


if __name__ == "__main__":
    sigterm_interrupts()
    sys.exit(main())
