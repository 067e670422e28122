"""``GET /lookup/<key>`` (where a key lives) and the ring page: which of them need the API token."""

from __future__ import annotations

import aiohttp
from helpers import http_ring

from balancer.plugins.ui import PAGE

TOKEN = "lookup-token"
THREE = {"replicas": 3, "write_quorum": 2, "read_quorum": 2, "api_token": TOKEN}


async def test_lookup_names_the_owner_its_replicas_and_the_path() -> None:
    async with http_ring(4, **THREE) as nodes, aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answers = []
        for node in nodes:
            async with http.get(f"http://{node.address}/lookup/user%2F42", headers=auth) as response:
                assert response.status == 200
                answers.append(await response.json())
        found = await nodes[0].lookup("user/42")
        for node, answer in zip(nodes, answers, strict=True):
            assert answer["key"] == "user/42"
            assert answer["owner"]["address"] == found.owner.address  # every node agrees
            assert answer["path"][0] == node.address
            assert answer["hops"] == len(answer["path"]) - 1
            assert len(answer["replicas"]) == 3
            assert answer["replicas"][0] == found.owner.address
            assert not set(answer["replicas"]) & set(answer["standins"])
        async with http.get(f"http://{nodes[0].address}/lookup/k") as response:
            assert response.status == 401  # as guarded as /status


async def test_the_ring_page_needs_no_token_but_its_data_does() -> None:
    async with http_ring(1, **{**THREE, "replicas": 1, "write_quorum": 1, "read_quorum": 1}) as nodes:
        base = f"http://{nodes[0].address}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + PAGE) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "text/html; charset=utf-8"
                page = await response.text()
            assert "<svg" in page
            assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets
            async with http.get(base + "/ring") as response:
                assert response.status == 401
