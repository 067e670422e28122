"""A FastAPI service on three backends behind balancer-asgi's routing middleware, under uvicorn: each user's
requests reach the backend that owns the user, and a hot user's overflow spreads instead of piling onto one
backend. The ASGI counterpart of routed_app.py.

Needs the contrib package and its test extras: pip install -e 'contrib/balancer-asgi[test]'
Run: python examples/asgi_routed_app.py
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import aiohttp
import uvicorn
from balancer_asgi import ASGIApp, RoutingMiddleware
from fastapi import FastAPI

from balancer import BoundedLoadBalancer

SECRET = "change me: shared by the backends only"


def make_app(me: str, backends: list[str]) -> ASGIApp:
    """One backend: its FastAPI app, wrapped in the middleware that forwards what other backends own."""
    api = FastAPI()

    @api.get("/users/{user}/profile")
    async def profile(user: str) -> dict[str, str]:
        await asyncio.sleep(0.01)  # some work, so that requests overlap
        return {"user": user, "served_by": me}

    # the backends share a secret, so each serves what another forwarded to it instead of re-balancing it
    return RoutingMiddleware(
        api,
        balancer=BoundedLoadBalancer(backends, load_factor=1.25),
        local=me,
        secret=SECRET,
        paths=["/users/{key}/..."],
    )


async def main() -> None:
    """Start three uvicorn servers on loopback, send them requests through any of them, print who served."""
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    backends = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    servers = [
        uvicorn.Server(uvicorn.Config(make_app(me, backends), log_level="warning", lifespan="on"))
        for me in backends
    ]
    tasks = [asyncio.ensure_future(s.serve(sockets=[sock])) for s, sock in zip(servers, sockets, strict=True)]
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not all(s.started for s in servers):  # poll until every server listens, with a deadline
            if asyncio.get_running_loop().time() > deadline or any(t.done() for t in tasks):
                raise RuntimeError("the servers did not start")
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as http:
            owners = {}
            for user in ("ada", "grace", "alan", "edsger"):
                async with http.get(f"http://{backends[0]}/users/{user}/profile") as resp:
                    owners[user] = (await resp.json())["served_by"]
            print("owners:", owners)
            again = {}
            for user in owners:  # through another entry point: same owners
                async with http.get(f"http://{backends[2]}/users/{user}/profile") as resp:
                    again[user] = (await resp.json())["served_by"]
            print("same owners through another backend:", again == owners)

            async def hit(i: int) -> str:
                async with http.get(f"http://{backends[i % 3]}/users/celebrity/profile") as resp:
                    return str((await resp.json())["served_by"])

            spread = Counter(await asyncio.gather(*(hit(i) for i in range(90))))
            print("90 concurrent requests for one hot user were served by", len(spread), "backends")
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)
        for sock in sockets:
            sock.close()


if __name__ == "__main__":
    asyncio.run(main())
