"""What balancer-grpc's tests share: real ``balancer node --transport grpc`` processes and TLS material.

Not a ``conftest.py``: the core's tests have one, and two top-level modules of one name would collide
(for mypy, which checks both). The tests run from the repository root (its pytest settings apply:
asyncio_mode=auto, warnings are errors, and ``tests/`` is on the import path, whose ``processes`` module
this one builds on) after ``pip install -e 'contrib/balancer-grpc[test]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
from processes import free_port, with_open_files

FAST = ["--stabilize-interval", "0.2", "--rpc-timeout", "0.5", "--anti-entropy-interval", "0.5"]
"""As the core's process tests: quick maintenance, so rings settle within seconds."""
PLUGINS = ["--no-plugins", "--plugin", "balancer_grpc"]
"""As the core's process tests load only the plugins they bring: this package's, by module name (an
installed plugin that is broken or slow cannot fail these tests)."""


@dataclass
class GrpcProc:
    """One ``balancer node --transport grpc`` process: its ring (gRPC) and HTTP addresses."""

    address: str
    http: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """What the process logged so far."""
        return self.log.read_text(errors="replace")

    def terminate(self) -> int:
        """SIGTERM (a graceful leave), then the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    def kill9(self) -> None:
        """kill -9 the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@dataclass
class GrpcCluster:
    """Node processes on the gRPC transport, each with its HTTP API on a port of its own."""

    tmp: Path
    procs: list[GrpcProc] = field(default_factory=list)

    def start(
        self,
        *,
        join: str | None = None,
        extra: tuple[str, ...] = (),
        open_files: int | None = None,
    ) -> GrpcProc:
        """Start a node creating a ring (``join=None``) or joining ``join`` (a ring, that is gRPC,
        address), with this package's plugin alone; with ``open_files``, under that soft open-file limit
        (``processes.with_open_files``: no ``preexec_fn`` in a process that has used gRPC)."""
        port, http_port = free_port(), free_port()
        where = ["--join", join] if join else ["--ring"]
        log = self.tmp / f"node-{port}.log"
        command = [
            *(sys.executable, "-m", "balancer", "-v", "node", "--port", str(port), *where, *FAST, *PLUGINS),
            *("--transport", "grpc", "--set", f"grpc.http_port={http_port}", *extra),
        ]
        if open_files is not None:
            command = with_open_files(open_files, command)
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        proc = GrpcProc(f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", process, log)
        self.procs.append(proc)
        return proc

    def alive(self) -> list[GrpcProc]:
        """The processes still running."""
        return [p for p in self.procs if p.process.poll() is None]

    def stop_all(self) -> None:
        """Kill every process still running and reap them all."""
        for proc in self.procs:
            if proc.process.poll() is None:
                proc.process.kill()
        for proc in self.procs:
            proc.process.wait(timeout=10)


async def get_json(http: aiohttp.ClientSession, address: str, path: str, timeout: float) -> Any:
    """``GET http://address/path`` decoded, or ``None`` if it does not answer 200 within ``timeout`` s."""
    try:
        async with http.get(f"http://{address}{path}", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return orjson.loads(await resp.read()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def settled(http: aiohttp.ClientSession, procs: Sequence[GrpcProc]) -> bool:
    """Whether the first process's survey finds exactly these processes up (by their ring addresses,
    which are their gRPC ports) and the ring settled."""
    view = await get_json(http, procs[0].http, "/ring", 5)
    if not isinstance(view, dict) or not view.get("settled"):
        return False
    up = {m["address"] for m in view["members"] if m["state"] != "down"}
    wanted = {p.address for p in procs}
    return up == wanted and all(m["state"] == "up" for m in view["members"] if m["address"] in up)


def openssl(*args: str | Path) -> None:
    """Run the openssl command; fail the test if it fails."""
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    """A test CA, one node certificate it signed (for 127.0.0.1, for server and client use), and one
    certificate of another CA (a stranger's)."""

    ca: str
    cert: str
    key: str
    other_cert: str
    other_key: str


def _signed(folder: Path, name: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    key, request, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", key, "-out", request)
    extensions = folder / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(
        "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
        "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Two CAs and a certificate signed by each, in ``folder``, made with the openssl command (EC keys:
    quick)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    made: list[tuple[Path, Path]] = []
    for name in ("ca", "other-ca"):
        ca, ca_key = folder / f"{name}.pem", folder / f"{name}.key"
        openssl("req", "-x509", *ec, "-days", "1", "-subj", f"/CN={name}", "-keyout", ca_key, "-out", ca)
        made.append((ca, ca_key))
    cert, key = _signed(folder, "node", *made[0])
    other_cert, other_key = _signed(folder, "stranger", *made[1])
    return Pki(str(made[0][0]), str(cert), str(key), str(other_cert), str(other_key))


# -- a small gRPC service to route and balance -------------------------------------------------------

SERVICE = "demo.Echo"
"""The test service: JSON requests and answers, no generated code."""


def dumps(value: Any) -> bytes:
    """JSON bytes (the test service's serializer)."""
    return json.dumps(value).encode()


def loads(data: bytes) -> Any:
    """From JSON bytes (the test service's deserializer)."""
    return json.loads(data)


class Echo(grpc.GenericRpcHandler):
    """``/demo.Echo/<Method>``, each answering with the name of the server that served it:

    - ``Who`` (unary): ``{"served_by", "key", "hops"}``, the request's key and the hop count it arrived with;
    - ``Count`` (server streaming): ``n`` answers;
    - ``Sum`` (client streaming): the sum of the requests' ``n``;
    - ``Slow`` (unary): waits until :attr:`release` is set (or 30 s);
    - ``Fail`` (unary): aborts with ``NOT_FOUND`` and trailing metadata of its own.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.served: list[str] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    def _seen(self, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
        return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}

    async def who(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.served.append("Who")
        seen = self._seen(context)
        return {"served_by": self.name, "key": request.get("key"), "hops": seen.get("x-balancer-hops")}

    async def count(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        self.served.append("Count")
        for i in range(int(request["n"])):
            yield {"served_by": self.name, "i": i}

    async def sum(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.served.append("Sum")
        total = 0
        async for request in requests:
            total += int(request["n"])
        return {"served_by": self.name, "sum": total}

    async def slow(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.served.append("Slow")
        self.entered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), 30)
        return {"served_by": self.name}

    async def fail(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.served.append("Fail")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"nothing here ({self.name})", (("x-app", self.name),))

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        io = {"request_deserializer": loads, "response_serializer": dumps}
        if method == f"/{SERVICE}/Who":
            return grpc.unary_unary_rpc_method_handler(self.who, **io)
        if method == f"/{SERVICE}/Count":
            return grpc.unary_stream_rpc_method_handler(self.count, **io)
        if method == f"/{SERVICE}/Sum":
            return grpc.stream_unary_rpc_method_handler(self.sum, **io)
        if method == f"/{SERVICE}/Slow":
            return grpc.unary_unary_rpc_method_handler(self.slow, **io)
        if method == f"/{SERVICE}/Fail":
            return grpc.unary_unary_rpc_method_handler(self.fail, **io)
        return None


@dataclass
class App:
    """One server of the test service on 127.0.0.1."""

    server: grpc.aio.Server
    address: str
    echo: Echo


async def start_app(interceptors: Sequence[grpc.aio.ServerInterceptor] = (), port: int = 0) -> App:
    """Serve :class:`Echo` on 127.0.0.1 (``port`` 0: a free one); named by its address."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    address = f"127.0.0.1:{bound}"
    echo = Echo(address)
    server.add_generic_rpc_handlers((echo,))
    await server.start()
    return App(server, address, echo)
