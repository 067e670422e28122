"""The ring page, a default plugin: every node serves ``GET /ui``, one HTML page with no external assets
that draws the ring from this node's API (``/ring`` every two seconds, ``/lookup/<key>`` on demand).

The page holds no data itself, so it is served without the API token; the page asks for the token and
sends it with each request for data, which the node checks as for any client.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import TYPE_CHECKING

from balancer.hookspecs import Route, hookimpl

if TYPE_CHECKING:
    from balancer.node import Node

__all__ = ["PAGE", "balancer_http_routes"]

PAGE = "/ui"
"""Where every node serves the ring page."""


@hookimpl(trylast=True)
def balancer_http_routes(node: Node, register: Callable[[Route], None]) -> None:
    """Serve the ring page at ``/ui``."""
    body = files("balancer.plugins").joinpath("ui.html").read_bytes()

    async def page() -> tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", body

    register(Route("GET", PAGE, page, public=True))
