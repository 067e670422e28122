"""balancer-asgi called in the test's own event loop: routing keys, settings, the lifespan, ownership from a
running ring, and interoperability with balancer.middleware's aiohttp router (owners and routers that are
aiohttp servers on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from balancer_asgi import (
    ForwardError,
    Message,
    PathKey,
    Receive,
    RoutingMiddleware,
    Scope,
    Send,
    compile_path,
)
from yarl import URL

from balancer import BoundedLoadBalancer, Config, Node
from balancer.errors import ConfigError
from balancer.middleware import HOPS_HEADER, proof_path, setup_routing

SECRET = "shared by the routers of these tests"


@dataclass
class Answer:
    """What an ASGI application sent back for one request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v.decode() for k, v in self.headers if k == name.lower().encode()), None)


def scope_of(method: str, target: str, headers: Iterable[tuple[str, str]] = ()) -> Scope:
    """The scope an ASGI server gives a request for ``target`` (as sent: percent-encoded)."""
    raw_path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def call(
    app: Any, method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> Answer:
    """Run one request through ``app`` as an ASGI server would."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    finished = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope_of(method, target, headers), receive, send)
    finished.set()
    assert sent[0]["type"] == "http.response.start"
    assert sent[-1].get("more_body", False) is False
    return Answer(sent[0]["status"], list(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:]))


async def here(scope: Scope, receive: Receive, send: Send) -> None:
    """The wrapped application: says it served the request."""
    body = json.dumps({"served_by": "here", "path": scope["path"]}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def aiohttp_server(app: web.Application, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (on ``sock`` if given, bound already) for the block; yields its address."""
    sock = sock or bound()
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


def owner_app(name: str, setup: Any = None) -> web.Application:
    """An aiohttp owner that says who served a request, what path it saw and its hop count."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "served_by": name,
                "path_qs": request.rel_url.path_qs,
                "hops": request.headers.get(HOPS_HEADER, "0"),
            }
        )

    app = web.Application()
    if setup is not None:
        setup(app)
    for path in ("/users/{key}/{rest:.*}", "/items/{key}", "/{key}", "/{rest:.*}"):  # aiohttp's key: {key}
        app.router.add_route("*", path, handle)
    return app


# -- routing keys


@pytest.mark.parametrize(
    ("template", "path", "key"),
    [
        ("/users/{key}/...", "/users/42", "42"),
        ("/users/{key}/...", "/users/42/orders/7", "42"),
        ("/users/{key}/...", "/users/", None),
        ("/users/{key}/...", "/users42", None),
        ("/users/{key}", "/users/42/orders", None),
        ("/t/{tenant}/doc/{key}", "/t/a/doc/b", "b"),
        ("/files/{key:path}", "/files/a/b/c.txt", "a/b/c.txt"),
        ("/a.b/{key}", "/aXb/1", None),  # literal parts are literal
        (re.compile(r"/v\d+/(?P<key>[a-z]+)"), "/v2/abc/more", "abc"),
    ],
)
def test_path_templates(template: str | re.Pattern[str], path: str, key: str | None) -> None:
    found = compile_path(template).match(path)
    assert (found.group("key") if found else None) == key


@pytest.mark.parametrize("template", ["/users/{id}", "/a/{key}/{key}", re.compile(r"/users/(\d+)")])
def test_a_template_without_one_key_is_refused(template: str | re.Pattern[str]) -> None:
    with pytest.raises(ConfigError):
        compile_path(template)


def test_the_key_comes_from_the_first_matching_path_then_the_header() -> None:
    key = PathKey(["/a/{key}", "/a/{other}/{key}"])
    assert key(scope_of("GET", "/a/1")) == "1"
    assert key(scope_of("GET", "/a/1/2")) == "2"
    assert key(scope_of("GET", "/b", [("X-Balancer-Key", "h")])) == "h"
    assert key(scope_of("GET", "/a/1", [("X-Balancer-Key", "h")])) == "1"
    assert key(scope_of("GET", "/b")) is None
    assert PathKey([], header=None)(scope_of("GET", "/b", [("X-Balancer-Key", "h")])) is None
    assert PathKey(["/u/{key}"])(scope_of("GET", "/u/%C3%A9t%C3%A9")) == "été"  # decoded, as aiohttp does


async def test_a_key_function_decides_alone() -> None:
    router = RoutingMiddleware(
        here, balancer=BoundedLoadBalancer(["me", "you"]), local="me", key=lambda scope: scope["method"]
    )
    owner = await router.owner("GET")
    target = "/anything"
    if owner == "me":
        assert (await call(router, "GET", target)).json()["served_by"] == "here"
    assert (await call(router, "GET", target, [(HOPS_HEADER, "x")])).status == 400  # it had a key: routed


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"balancer": BoundedLoadBalancer(["a"]), "node": object()},
        {"balancer": BoundedLoadBalancer(["a"]), "mode": "bounce"},
        {"balancer": BoundedLoadBalancer(["a"]), "max_hops": 0},
        {"balancer": BoundedLoadBalancer(["a"]), "timeout": 0},
        {"balancer": BoundedLoadBalancer(["a"]), "paths": ["/u/{key}"], "key": lambda scope: "k"},
        {"balancer": BoundedLoadBalancer(["a"]), "paths": ["/u/{id}"]},
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RoutingMiddleware(here, **options)


async def test_requests_without_a_key_and_other_scopes_reach_the_app() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await here(scope, receive, send)

    router = RoutingMiddleware(app, balancer=BoundedLoadBalancer(["elsewhere:1"]), paths=["/u/{key}"])
    assert (await call(router, "GET", "/plain")).json() == {"served_by": "here", "path": "/plain"}
    await router({"type": "websocket", "path": "/u/1", "headers": []}, here_receive, here_send)
    assert seen == ["http", "websocket"]


async def here_receive() -> Message:
    return {"type": "websocket.disconnect"}


async def here_send(message: Message) -> None:
    raise AssertionError("nothing is sent")


# -- the lifespan and the client's life


async def test_the_lifespan_passes_through_and_closes_the_client() -> None:
    async with aiohttp_server(owner_app("owner")) as owner:
        events: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "lifespan":
                await here(scope, receive, send)
                return
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return

        router = RoutingMiddleware(app, balancer=BoundedLoadBalancer([owner]), paths=["/u/{key}"])
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        replies: list[str] = []

        async def receive() -> Message:
            if len(incoming) == 1:  # between startup and shutdown: the app serves
                answer = await call(router, "GET", "/u/1")
                assert answer.json()["served_by"] == "owner"
                assert router._session is not None
                assert not router._session.closed
            return incoming.pop(0)

        async def send(message: Message) -> None:
            replies.append(message["type"])

        await router({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    assert replies == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert router._session is None  # closed when the lifespan ended


# -- ownership from a running ring


async def test_ownership_from_a_ring_node() -> None:
    settings = Config(port=0, stabilize_interval=0.1, load_entrypoints=False)
    async with Node(settings) as first, Node(settings, join=first.address) as second:
        apps: dict[str, str] = {}
        async with (
            aiohttp_server(owner_app("first")) as first_app,
            aiohttp_server(owner_app("second")) as second_app,
        ):
            apps = {first.address: first_app, second.address: second_app}
            keys = [f"key-{i}" for i in range(40)]
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # until both nodes agree on every key's owner
                mine = [(await first.lookup(k)).owner.address for k in keys]
                theirs = [(await second.lookup(k)).owner.address for k in keys]
                if mine == theirs and len(set(mine)) == 2:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the two nodes never agreed"
                await asyncio.sleep(0.05)
            router = RoutingMiddleware(
                here,
                node=first,
                paths=["/items/{key}"],
                backend_url=lambda address: f"http://{apps[address]}",
            )
            try:
                assert router.local is None  # the node's address is local
                assert router.secret is None  # the node has no cluster secret
                for key, owner in zip(keys, mine, strict=True):
                    answer = await call(router, "GET", f"/items/{key}")
                    assert answer.status == 200
                    if owner == first.address:
                        assert answer.json() == {"served_by": "here", "path": f"/items/{key}"}
                    else:
                        assert answer.json() == {
                            "served_by": "second",
                            "path_qs": f"/items/{key}",
                            "hops": "1",
                        }
            finally:
                await router.aclose()


# -- interoperability with the aiohttp router

ODD_TARGETS = [
    "/users/k1/profile",
    "/users/a%20b/profile?q=a+b&r=%2F%3D%20&s=%C3%A9",
    "/users/%C3%A9t%C3%A9/x%2Fy?=&&a==b",
    "/users/k2/profile?%",
]


async def test_the_signed_path_is_the_one_aiohttp_sees() -> None:
    async with aiohttp_server(owner_app("owner")) as owner, aiohttp.ClientSession() as http:
        for target in ODD_TARGETS:
            async with http.get(URL(f"http://{owner}{target}", encoded=True)) as resp:
                assert (await resp.json())["path_qs"] == proof_path(target), target


async def test_an_aiohttp_router_serves_what_an_asgi_router_forwarded() -> None:
    dead = bound()  # never listening: a forward there is refused (502)
    sock = bound()
    me = f"127.0.0.1:{sock.getsockname()[1]}"

    def receiving(app: web.Application) -> None:
        lb = BoundedLoadBalancer([f"127.0.0.1:{dead.getsockname()[1]}"])
        setup_routing(app, balancer=lb, local=me, secret=SECRET)

    try:
        async with aiohttp_server(owner_app("aiohttp", receiving), sock):
            router = RoutingMiddleware(
                here, balancer=BoundedLoadBalancer([me]), secret=SECRET, paths=["/users/{key}/..."]
            )
            try:
                for target in ODD_TARGETS:
                    answer = await call(router, "GET", target)
                    assert answer.status == 200, answer.body
                    assert answer.json() == {
                        "served_by": "aiohttp",
                        "path_qs": proof_path(target),
                        "hops": "1",
                    }
                # a forward under another secret is not served: the aiohttp router sends it on (to the dead)
                other = RoutingMiddleware(
                    here, balancer=BoundedLoadBalancer([me]), secret="another", paths=["/users/{key}/..."]
                )
                try:
                    assert (await call(other, "GET", ODD_TARGETS[0])).status == 502
                finally:
                    await other.aclose()
            finally:
                await router.aclose()
    finally:
        dead.close()


async def test_errors_are_the_aiohttp_routers_byte_for_byte() -> None:
    """A malformed hop count (400), a loop (508), an owner that refuses connections (502)."""
    dead = bound()
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"

    def routing(app: web.Application) -> None:
        setup_routing(app, balancer=BoundedLoadBalancer([dead_address]), local="me", max_hops=2)

    router = RoutingMiddleware(
        here, balancer=BoundedLoadBalancer([dead_address]), local="me", paths=["/{key}"], max_hops=2
    )
    cases = [[(HOPS_HEADER, "1e3")], [(HOPS_HEADER, "2")]]
    try:
        async with (
            aiohttp_server(owner_app("aiohttp", routing)) as aiohttp_router,
            aiohttp.ClientSession() as http,
        ):
            for headers in cases:
                async with http.get(f"http://{aiohttp_router}/k", headers=headers) as resp:
                    expected = (resp.status, resp.content_type, await resp.read())
                answer = await call(router, "GET", "/k", headers)
                assert (answer.status, answer.header("content-type"), answer.body) == expected
            async with http.get(f"http://{aiohttp_router}/k") as resp:
                assert resp.status == 502
                aiohttp_error = (await resp.json())["error"]
            answer = await call(router, "GET", "/k")
            assert answer.status == 502
            error = answer.json()["error"]
            prefix = f"the owner {dead_address} cannot be reached: "
            assert error["type"] == aiohttp_error["type"] == "BadGateway"
            assert error["message"].startswith(prefix)
            assert aiohttp_error["message"].startswith(prefix)
    finally:
        await router.aclose()
        dead.close()


async def test_an_answer_that_breaks_after_its_head_raises() -> None:
    """The owner promises a megabyte and closes after 100 KB: the client must not get a body that looks
    whole, so the middleware raises (ASGI servers then close the client's connection)."""

    async def breaking(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        answer.content_length = 1 << 20
        await answer.prepare(request)
        await answer.write(b"x" * 100_000)
        assert request.transport is not None
        request.transport.close()
        return answer

    app = web.Application()
    app.router.add_get("/{key}", breaking)
    async with aiohttp_server(app) as owner:
        router = RoutingMiddleware(here, balancer=BoundedLoadBalancer([owner]), paths=["/{key}"])
        try:
            with pytest.raises(ForwardError, match=f"the answer from {owner} broke off"):
                await call(router, "GET", "/k")
        finally:
            await router.aclose()


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(
    "snippet", re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL), ids=lambda s: "readme"
)
def test_the_readme_example_runs(snippet: str, tmp_path: Path) -> None:
    """The package README's Python example builds its app as written, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr


async def test_a_request_the_owner_dropped_unanswered_is_sent_again_only_if_idempotent() -> None:
    """The owner closes every other connection without answering (as a backend does when its keep-alive
    timeout ends just as a request goes out): a GET is sent once more, a POST is not."""
    calls: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(request.method)
        if len(calls) % 2:
            assert request.transport is not None
            request.transport.close()
        return web.json_response({"served_by": "owner", "call": len(calls)})

    app = web.Application()
    app.router.add_route("*", "/{key}", flaky)
    async with aiohttp_server(app) as owner:
        router = RoutingMiddleware(here, balancer=BoundedLoadBalancer([owner]), paths=["/{key}"])
        try:
            answer = await call(router, "GET", "/k")
            assert (answer.status, answer.json()) == (200, {"served_by": "owner", "call": 2})
            answer = await call(router, "POST", "/k", body=b"once")
            assert answer.status == 502
            assert answer.json()["error"]["type"] == "BadGateway"
        finally:
            await router.aclose()
    assert calls == ["GET", "GET", "POST"]
