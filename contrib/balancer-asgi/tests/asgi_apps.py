"""The backends the tests run: a FastAPI app and a Starlette app, each behind balancer_asgi's routers, and a
``main`` that serves one with uvicorn on a listening socket handed down by the test process.

Every backend of a cluster gets the same settings: ``me`` (its own address), ``backends`` (the
cluster's addresses, plus a dead one that refuses connections), ``secret`` and ``slow_timeout``. Routers
are stacked, each routing its own paths:

- ``/users/{key}/...``, ``/echo/{key}`` and the ``X-Balancer-Key`` header: proxied, 30 s timeout;
- ``/slow/{key}``: proxied with ``slow_timeout`` (the owner sleeps ten times that long);
- ``/go/{key}/...``: redirected (307) to the owner;
- ``/loop/{key}``: each backend's balancer names only the next backend and no secret is shared, so a
  request goes round until the loop guard stops it (FastAPI only).

Run: ``python asgi_apps.py FD fastapi|starlette h11|httptools SETTINGS_JSON``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from balancer_asgi import ASGIApp, RoutingMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from balancer import BoundedLoadBalancer

PROXIED = ["/users/{key}/...", "/echo/{key}"]
"""The paths the main router routes by their key."""


async def pieces(body: bytes) -> AsyncIterator[bytes]:
    """``body`` in pieces of 64 KiB, for an answer streamed without a length. (The echo reads the request
    whole first: Starlette's streamed answer listens for a disconnect on ``receive`` meanwhile, and would
    take request body messages from ``request.stream()``.)"""
    for start in range(0, len(body), 1 << 16):
        yield body[start : start + (1 << 16)]


def _hops(request: Request) -> str:
    return request.headers.get("x-balancer-hops", "0")


def routed(app: ASGIApp, settings: Mapping[str, Any], balancers: list[BoundedLoadBalancer]) -> ASGIApp:
    """``app`` behind the stacked routers (see the module documentation); their balancers go in
    ``balancers``, so that ``/loads`` can report what they hold."""
    me: str = settings["me"]
    backends: list[str] = settings["backends"]
    secret: str = settings["secret"]

    def balancer(names: list[str]) -> BoundedLoadBalancer:
        balancers.append(BoundedLoadBalancer(names))
        return balancers[-1]

    outer = RoutingMiddleware(app, balancer=balancer(backends), local=me, secret=secret, paths=PROXIED)
    outer = RoutingMiddleware(
        outer,
        balancer=balancer(backends),
        local=me,
        secret=secret,
        paths=["/slow/{key}"],
        header=None,
        timeout=settings["slow_timeout"],
    )
    outer = RoutingMiddleware(
        outer,
        balancer=balancer(backends),
        local=me,
        secret=secret,
        paths=["/go/{key}/..."],
        header=None,
        mode="redirect",
    )
    live = [b for b in backends if b != settings["dead"]]
    following = live[(live.index(me) + 1) % len(live)]
    return RoutingMiddleware(
        outer, balancer=balancer([following]), local=me, paths=["/loop/{key}"], header=None
    )


def fastapi_app(settings: Mapping[str, Any]) -> ASGIApp:
    """The FastAPI backend, routed."""
    from fastapi import FastAPI  # here: the Starlette backends start faster without it

    me: str = settings["me"]
    balancers: list[BoundedLoadBalancer] = []
    api = FastAPI()

    @api.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @api.get("/loads")
    async def loads() -> JSONResponse:
        return JSONResponse([b.total_load for b in balancers])

    @api.get("/users/{key}/profile")
    async def profile(key: str, request: Request) -> JSONResponse:
        return JSONResponse(
            {"user": key, "served_by": me, "hops": _hops(request), "query": request.url.query}
        )

    @api.get("/users/{key}/headers")
    async def headers(key: str, request: Request) -> JSONResponse:
        """The request's headers as they arrived, and an answer with hop-by-hop headers of its own."""
        seen = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]]
        answer = JSONResponse({"served_by": me, "headers": seen})
        answer.headers["Connection"] = "x-private"
        answer.headers["X-Private"] = "connection-only"
        answer.headers["Keep-Alive"] = "timeout=99"
        answer.headers["Proxy-Authenticate"] = "Basic"
        answer.headers["X-End-To-End"] = "kept"
        return answer

    @api.post("/echo/{key}")
    async def echo(key: str, request: Request) -> StreamingResponse:
        """The request's body back, unsized (chunked)."""
        return StreamingResponse(pieces(await request.body()), headers={"X-Served-By": me})

    @api.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"served_by": me, "hops": _hops(request)})

    @api.get("/slow/{key}")
    async def slow(key: str) -> JSONResponse:
        await asyncio.sleep(10 * settings["slow_timeout"])
        return JSONResponse({"served_by": me})

    @api.get("/go/{key}/profile")
    async def go(key: str, request: Request) -> JSONResponse:
        return JSONResponse({"served_by": me, "query": request.url.query})

    @api.get("/loop/{key}")
    async def loop(key: str) -> Response:
        return Response(status_code=500)  # never reached: every backend forwards it

    return routed(api, settings, balancers)


def starlette_app(settings: Mapping[str, Any]) -> ASGIApp:
    """The Starlette backend, routed; its lifespan must run for it to serve."""
    me: str = settings["me"]
    state: dict[str, str] = {}

    async def profile(request: Request) -> JSONResponse:
        key = request.path_params["key"]
        return JSONResponse({"user": key, "served_by": state["me"], "hops": _hops(request)})

    async def echo(request: Request) -> StreamingResponse:
        return StreamingResponse(pieces(await request.body()), headers={"X-Served-By": state["me"]})

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"served_by": state["me"], "hops": _hops(request)})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["me"] = me  # set at startup: the middleware must pass the lifespan on
        yield

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/users/{key}/profile", profile),
            Route("/echo/{key}", echo, methods=["POST"]),
            Route("/whoami", whoami),
        ],
        lifespan=lifespan,
    )
    return RoutingMiddleware(
        app,
        balancer=BoundedLoadBalancer(settings["backends"]),
        local=me,
        secret=settings["secret"],
        paths=PROXIED,
    )


def main() -> None:
    """Serve the app named on the command line on the inherited listening socket, until SIGTERM."""
    fd, kind, http, settings = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    app = fastapi_app(settings) if kind == "fastapi" else starlette_app(settings)
    config = uvicorn.Config(
        app,
        http=http,
        lifespan="on",
        log_level="warning",
        proxy_headers=False,  # the client is the peer: X-Forwarded-For is the routers' to write here
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    main()
