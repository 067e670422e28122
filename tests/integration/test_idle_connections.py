"""A node process limited to 1,024 open files, and 1,100 connections that send nothing: it keeps serving
its clients and its ring, and says so in a handful of log lines."""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Iterator

import aiohttp
import pytest
from processes import Cluster, Proc, ring_correct, status, until

LIMIT = 1024
IDLE = 1100


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


async def open_idle(address: str, count: int) -> list[socket.socket]:
    """``count`` connections to ``address`` that will send nothing."""
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.setblocking(False)
            async with asyncio.timeout(30):
                await loop.sock_connect(sock, (host, int(port)))
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


async def rpc_answers(http: aiohttp.ClientSession, address: str) -> bool:
    try:
        async with http.post(
            f"http://{address}/rpc/node.status", data=b"{}", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_idle_sockets_do_not_take_a_node_down(cluster: Cluster, room_for_sockets: None) -> None:
    target = cluster.start(open_files=LIMIT)
    async with aiohttp.ClientSession() as http:
        await until(lambda: _answers(http, target), what="the limited node answering")
        peer = cluster.start(join=target.address)
        both = [target.address, peer.address]
        await until(lambda: ring_correct(http, both), what="a ring of two")

        idle = await open_idle(target.address, IDLE)
        try:
            # every check goes over new connections while the idle ones are (from this side) still open
            await until(lambda: _answers(http, target), what="/status answering under the crowd")
            await until(lambda: rpc_answers(http, target.address), what="ring RPCs answering")
            await until(lambda: ring_correct(http, both), what="the ring staying whole")
            async with http.put(f"http://{peer.address}/kv/during", data=b"crowd") as resp:
                assert resp.status == 200, await resp.text()  # W = 2: the limited node stored it too
            async with http.get(f"http://{target.address}/kv/during") as resp:
                assert await resp.read() == b"crowd"
            assert target.process.poll() is None
        finally:
            for sock in idle:
                sock.close()

    log = target.output()
    lines = log.splitlines()
    assert "Traceback" not in log
    assert "out of system resource" not in log
    assert any("serving at most" in line for line in lines), "the lowered cap was not reported"
    own = [line for line in lines if "aiohttp.access" not in line]
    assert len(own) < 40, "\n".join(own[-40:])
    assert len(log) < 256 << 10  # 100,000 tracebacks before the gate existed


async def _answers(http: aiohttp.ClientSession, proc: Proc) -> bool:
    return await status(http, proc.address) is not None
