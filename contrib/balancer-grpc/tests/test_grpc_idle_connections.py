"""A ``--transport grpc`` node limited to 1,024 open files, and 1,100 connections to its gRPC port that send
nothing: its HTTP API keeps answering and it stays in its ring (the core's
tests/integration/test_idle_connections.py, for the gRPC port)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from balancer_grpc.codec import decode_answer, encode, method_path
from grpc_support import GrpcCluster, GrpcProc, get_json, settled
from processes import until

LIMIT = 1024
IDLE = 1100
PROBES = 40
QUORUMS = ("--write-quorum", "3", "--read-quorum", "1")
"""W = N = 3 on a ring of three: a write acknowledged through a peer reached the limited node too."""


@pytest.fixture
def room_for_sockets() -> Iterator[None]:
    """Raise this process's own soft open-file limit so it can hold the idle sockets (within the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-file limit {hard} is below the {need} this test needs")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def grpc_cluster(tmp_path: Path) -> Iterator[GrpcCluster]:
    """Node processes on the gRPC transport; every process started is killed at teardown."""
    made = GrpcCluster(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


async def open_idle(address: str, count: int, opened: list[socket.socket]) -> None:
    """Open ``count`` connections to ``address`` that will send nothing, into ``opened`` (which the
    caller closes, whatever happens)."""
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))


def descriptors(proc: GrpcProc) -> int:
    """How many file descriptors the process has open now."""
    return len(os.listdir(f"/proc/{proc.process.pid}/fd"))


async def probe(http: aiohttp.ClientSession, proc: GrpcProc, count: int, within: float) -> int:
    """Ask ``proc``'s HTTP API for ``/status`` ``count`` times, a new connection each time, within
    ``within`` seconds in all; how many were answered (those never asked in time were not)."""
    answered = 0
    deadline = time.monotonic() + within
    for _ in range(count):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        started = time.monotonic()
        if await get_json(http, proc.http, "/status", min(2.0, left)) is not None:
            answered += 1
        # paced, so the probes span a few seconds of the flood rather than one instant
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    return answered


async def ring_rpc_answers(address: str) -> bool:
    """Whether a ring RPC over a new gRPC connection (a peer dialling afresh) is answered."""
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as chan:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = chan.unary_unary(method_path("node.status"))
        try:
            answer = await call(encode({}), timeout=3)
        except grpc.aio.AioRpcError:
            return False
    return isinstance(decode_answer(answer), dict)


async def test_idle_sockets_on_the_grpc_port_do_not_take_a_node_down(
    grpc_cluster: GrpcCluster, room_for_sockets: None
) -> None:
    target = grpc_cluster.start(extra=QUORUMS, open_files=LIMIT)
    connector = aiohttp.TCPConnector(force_close=True)  # every probe dials: accepting is what is tested
    async with aiohttp.ClientSession(connector=connector) as http:
        await until(lambda: get_json(http, target.http, "/status", 1), what="the limited node answering")
        peers = [grpc_cluster.start(join=target.address, extra=QUORUMS) for _ in range(2)]
        ring = [peers[0], target, peers[1]]  # surveyed by a peer: the limited node as they see it
        await until(lambda: settled(http, ring), timeout=45, what="a ring of three")

        idle: list[socket.socket] = []
        try:
            await open_idle(target.address, IDLE, idle)
            used = descriptors(target)
            answered = await probe(http, target, PROBES, within=25)
            used = max(used, descriptors(target))
            assert answered >= 0.9 * PROBES, f"{answered} of {PROBES} probes answered, {used} descriptors"
            assert used < LIMIT - 64, f"{used} descriptors open of {LIMIT}"
            # a peer dialling afresh is let in, the peers still count the node up, and a write through a
            # peer reaches it (W = 3)
            assert await ring_rpc_answers(target.address)
            await until(lambda: settled(http, ring), timeout=15, what="the ring staying whole")
            async with http.put(f"http://{peers[1].http}/kv/during", data=b"crowd") as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(f"http://{target.http}/kv/during") as resp:
                assert await resp.read() == b"crowd"
            assert target.process.poll() is None
        finally:
            for sock in idle:
                sock.close()

    log = target.output()
    assert "File descriptor limit reached" not in log
    assert "Traceback" not in log
    pressure = [line for line in log.splitlines() if "connections under pressure" in line]
    assert 1 <= len(pressure) <= 6, pressure  # counted, then logged once per interval
