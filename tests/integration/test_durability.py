"""Real processes with N = 3, W = 2 and durable storage: two nodes killed one after the other lose no
acknowledged write, and a killed node restarted on its data folder comes back with its records; a
single node keeps every acknowledged write through kill -9 with and without --fsync."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from processes import Cluster, kill9, ring_correct, status, until

from balancer.plugins.sqlite_storage import FILENAME, SqliteStorage

KEYS = 2000


async def total_records(http: aiohttp.ClientSession, addresses: list[str]) -> int:
    views = [await status(http, a) for a in addresses]
    return sum(int(v["records"]) for v in views if v)


async def test_two_kills_lose_nothing_and_a_restart_keeps_its_data(cluster: Cluster, tmp_path: Path) -> None:
    def durable(port_dir: str) -> tuple[str, ...]:
        return ("--data-dir", str(tmp_path / port_dir), "--replicas", "3", "--write-quorum", "2")

    first = cluster.start(extra=durable("n0"))
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, first.address), what="the first node")
        for i in range(1, 5):
            cluster.start(join=first.address, extra=durable(f"n{i}"))
        addresses = [p.address for p in cluster.procs]
        # 5 processes x 32 vnodes settle in about 5 s on a busy 2-core machine, with a tail past 30 s
        await until(lambda: ring_correct(http, addresses), timeout=60, what="5-node ring convergence")

        limit = asyncio.Semaphore(32)

        async def put(i: int) -> None:
            async with (
                limit,
                http.put(f"http://{addresses[i % 5]}/kv/key-{i}", data=f"v{i}".encode()) as resp,
            ):
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(put(i) for i in range(KEYS)))
        await until(lambda: _total(http, addresses, 3 * KEYS), what="three copies of every key")

        # one node killed; wait until every key has three copies again; then the next
        victims = [cluster.procs[1], cluster.procs[3]]
        held: dict[str, int] = {}
        for victim in victims:
            held[victim.address] = int((await status(http, victim.address) or {}).get("records", -1))
            kill9(victim)
            alive = [p.address for p in cluster.alive()]
            await until(lambda alive=alive: ring_correct(http, alive), what="healing")  # type: ignore[misc]
            await until(lambda alive=alive: _total(http, alive, 3 * KEYS), what="re-replication")  # type: ignore[misc]

        alive = [p.address for p in cluster.alive()]
        for i in range(KEYS):
            async with http.get(f"http://{alive[i % 3]}/kv/key-{i}") as resp:
                assert resp.status == 200, (i, await resp.text())
                assert await resp.read() == f"v{i}".encode()

        # the first victim's records survived kill -9 on disk...
        victim = victims[0]
        async with SqliteStorage(tmp_path / "n1" / FILENAME) as disk:
            assert await disk.count() == held[victim.address]
            assert held[victim.address] > 0
        # ...and it comes back on the same port and folder, rejoins, and the ring converges
        port = int(victim.address.rsplit(":", 1)[1])
        back = cluster.start(join=first.address, extra=durable("n1"), port=port)
        assert back.address == victim.address  # same address, hence the same ring id
        await until(lambda: _up(http, back.address), what="the restarted node")
        alive = [p.address for p in cluster.alive()]
        await until(lambda: ring_correct(http, alive), what="convergence after the restart")
        await until(lambda: _total(http, alive, 3 * KEYS), what="three copies with the returning node")
        for i in range(0, KEYS, 7):
            async with http.get(f"http://{back.address}/kv/key-{i}") as resp:
                assert await resp.read() == f"v{i}".encode()


async def _total(http: aiohttp.ClientSession, addresses: list[str], expected: int) -> bool:
    return await total_records(http, addresses) == expected


async def _up(http: aiohttp.ClientSession, address: str) -> bool:
    return await status(http, address) is not None


@pytest.mark.parametrize("fsync", [False, True], ids=["normal", "fsync"])
async def test_an_acknowledged_write_survives_kill9_in_both_sync_modes(
    cluster: Cluster, tmp_path: Path, fsync: bool
) -> None:
    """kill -9 takes no acknowledged write with either mode (power loss is what only --fsync survives,
    and no test can pull the plug); the node says which mode it runs in."""
    solo = ("--replicas", "1", "--write-quorum", "1", "--read-quorum", "1")
    folder = tmp_path / "data"
    node = cluster.start(extra=(*solo, "--data-dir", str(folder), *(["--fsync"] if fsync else [])))
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, node.address), what="the node")
        for i in range(200):
            async with http.put(f"http://{node.address}/kv/k{i}", data=f"v{i}".encode()) as resp:
                assert resp.status == 200, await resp.text()
    kill9(node)
    mode = "FULL" if fsync else "NORMAL"
    assert f"{folder / FILENAME}: open, WAL, synchronous={mode}" in node.output()
    async with SqliteStorage(folder / FILENAME).open() as disk:
        assert await disk.count() == 200
        for i in range(200):
            record = await disk.get(f"k{i}".encode())
            assert record is not None
            assert record.value == f"v{i}".encode()
