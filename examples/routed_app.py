"""An aiohttp service on three backends behind the routing middleware: each user's requests reach the
backend that owns the user, and a hot user's overflow spreads instead of piling onto one backend.

Run: python examples/routed_app.py
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import aiohttp
from aiohttp import web

from balancer import BoundedLoadBalancer, setup_routing

SECRET = "change me: shared by the backends only"


def make_app(me: str, backends: list[str]) -> web.Application:
    """One backend: its own handler, plus the middleware that forwards what other backends own."""

    async def profile(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)  # some work, so that requests overlap
        return web.json_response({"user": request.match_info["key"], "served_by": me})

    app = web.Application()
    # the backends share a secret, so each serves what another forwarded to it instead of re-balancing it
    setup_routing(app, balancer=BoundedLoadBalancer(backends, load_factor=1.25), local=me, secret=SECRET)
    app.router.add_get("/users/{key}/profile", profile)
    return app


async def main() -> None:
    """Start three backends on loopback, send them requests through any of them, print who served."""
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    backends = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    runners = []
    for me, sock in zip(backends, sockets, strict=True):
        runner = web.AppRunner(make_app(me, backends))
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
    try:
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
        for runner in runners:
            await runner.cleanup()
        for sock in sockets:
            sock.close()


if __name__ == "__main__":
    asyncio.run(main())
