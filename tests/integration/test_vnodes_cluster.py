"""Real node processes with virtual nodes: a 5-process ring balances its keys, lists every member in
``GET /ring`` and ``balancer status --ring``, and loses nothing when one process is killed with -9."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson
from processes import Cluster, kill9, ring_correct, ring_view, until


async def _cli(*args: str) -> str:
    """Run ``balancer ARGS`` in its own process; it must exit 0. Returns what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balancer", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out
    return out.decode()


async def _answers(http: aiohttp.ClientSession, address: str) -> bool:
    return await ring_view(http, address) is not None


async def test_a_ring_of_vnodes_survives_kill9_and_shows_it(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as http:
        first = cluster.start(extra=("--vnodes", "16"))
        await until(lambda: _answers(http, first.address), what="the first node answering")
        for weight in ("1", "1", "1", "2"):
            cluster.start(join=first.address, extra=("--vnodes", "16", "--weight", weight))
        addresses = [p.address for p in cluster.procs]
        await until(lambda: ring_correct(http, addresses), timeout=60, what="5-process ring convergence")

        view = await ring_view(http, addresses[1])
        assert view is not None
        members = {m["address"]: m for m in view["members"]}
        assert sorted(members) == sorted(addresses)
        assert [members[a]["vnodes"] for a in addresses] == [16, 16, 16, 16, 32]
        assert abs(sum(m["share"] for m in members.values()) - 1) < 1e-9
        shares = [members[a]["share"] for a in addresses]
        assert max(shares[:4]) / min(shares[:4]) < 1.25  # placed ids: even shares
        assert 1.7 < shares[4] / (sum(shares[:4]) / 4) < 2.3  # weight 2: twice the share

        keys = {f"user:{i}": f"value {i}".encode() for i in range(150)}
        for i, (key, value) in enumerate(keys.items()):
            async with http.put(f"http://{addresses[i % 5]}/kv/{key}", data=value) as resp:
                assert resp.status == 200, await resp.text()

        out = await _cli("status", addresses[0], "--ring")
        assert "5 processes, 96 vnodes, settled" in out
        assert all(address in out for address in addresses)

        victim = cluster.procs[2]
        kill9(victim)
        survivors = [p.address for p in cluster.alive()]
        await until(lambda: ring_correct(http, survivors), timeout=60, what="healing after kill -9")
        for key, value in keys.items():  # N = 3, one process lost: every acknowledged write is there
            async with http.get(f"http://{survivors[-1]}/kv/{key}") as resp:
                assert resp.status == 200, (key, await resp.text())
                assert await resp.read() == value
        raw = await _cli("status", survivors[0], "--ring", "--json")
        states = {m["address"]: m["state"] for m in orjson.loads(raw)["members"]}
        assert states == {**dict.fromkeys(survivors, "up"), victim.address: "down"}
