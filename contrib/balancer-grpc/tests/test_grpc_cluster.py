"""Real node processes on ``--transport grpc``, as the core's tests/integration/test_cluster.py runs them on
``stream``: a 5-node ring forms, keys written and read through every node with quorums, a graceful leave
loses nothing, and after a kill -9 the ring heals and keeps every acknowledged key."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from grpc_support import GrpcCluster, GrpcProc, get_json, settled
from processes import until


@pytest.fixture
def grpc_cluster(tmp_path: Path) -> Iterator[GrpcCluster]:
    """Node processes on the gRPC transport; every process started is killed at teardown."""
    made = GrpcCluster(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


async def _answers(http: aiohttp.ClientSession, proc: GrpcProc) -> bool:
    return await get_json(http, proc.http, "/status", 1) is not None


async def _records(http: aiohttp.ClientSession, procs: list[GrpcProc], expected: int) -> bool:
    views = [await get_json(http, p.http, "/status", 1) for p in procs]
    return sum(int(v["records"]) for v in views if isinstance(v, dict)) == expected


async def _all_read(http: aiohttp.ClientSession, proc: GrpcProc, keys: dict[str, bytes]) -> None:
    for key, value in keys.items():
        async with http.get(f"http://{proc.http}/kv/{key}") as resp:
            assert resp.status == 200, (proc.address, key, await resp.text())
            assert await resp.read() == value


async def test_five_grpc_processes_share_keys_survive_a_leave_and_heal_after_kill9(
    grpc_cluster: GrpcCluster,
) -> None:
    first = grpc_cluster.start()
    async with aiohttp.ClientSession() as http:
        await until(lambda: _answers(http, first), what="the first node answering")
        for _ in range(4):
            grpc_cluster.start(join=first.address)
        procs = list(grpc_cluster.procs)
        await until(lambda: settled(http, procs), timeout=90, what="5-node ring convergence")
        assert f"the HTTP API is at http://{first.http}" in first.output()

        keys = {f"user:{i}": f"value {i}".encode() for i in range(120)}
        for i, (key, value) in enumerate(keys.items()):
            writer = procs[i % len(procs)]  # writes enter through every node
            async with http.put(f"http://{writer.http}/kv/{key}", data=value) as resp:
                assert resp.status == 200, await resp.text()
        for proc in procs:
            await _all_read(http, proc, keys)
        # ring RPC answers carry the answering node's clock over gRPC too: every node has measured peers
        for proc in procs:
            view = await get_json(http, proc.http, "/status", 5)
            assert isinstance(view, dict)
            assert view["clock"]["peers"] >= 1, view["clock"]
            assert view["clock"]["fenced"] is False
        await until(
            lambda: _records(http, procs, 3 * len(keys)), timeout=60, what="three copies of every key"
        )

        # a graceful leave (SIGTERM) hands every key over: none is lost
        leaver = procs[2]
        assert leaver.terminate() == 0
        assert "left the ring" in leaver.output()
        rest = grpc_cluster.alive()
        await until(lambda: settled(http, rest), timeout=60, what="convergence after a leave")
        await _all_read(http, rest[0], keys)

        # kill -9: the ring heals, no acknowledged key is lost (N = 3), and three copies are restored
        victim = procs[3]
        victim.kill9()
        survivors = grpc_cluster.alive()
        await until(lambda: settled(http, survivors), timeout=60, what="healing after kill -9")
        await _all_read(http, survivors[-1], keys)
        await until(lambda: _records(http, survivors, 3 * len(keys)), timeout=60, what="re-replication")

        # the public API's errors are the HTTP API's own, and the node keeps serving
        big = io.BytesIO(b"x" * ((1 << 20) + 1))
        async with http.put(f"http://{first.http}/kv/big", data=big) as resp:
            assert resp.status == 413
        async with http.get(f"http://{first.http}/kv/missing-key") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["message"] == "not found: missing-key"
        assert await _answers(http, first)
