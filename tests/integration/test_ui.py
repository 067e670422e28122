"""The ring page (``/ui``) in a real headless browser (Debian's chromium, driven by playwright), on a
ring of real node processes behind an API token: it lists the members, marks a killed one down, and
shows a typed key's owner as the ring's lookup answers it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from processes import Cluster, kill9, until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - CI installs it (.ci/run)
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or async_playwright is None,
    reason="needs chromium and playwright (.ci/run installs both: apt chromium, pip playwright)",
)

TOKEN = "ui-test-token"
SECURED = ("--api-token", TOKEN)
# chromium as root in a container, and kept off the network (this machine has none beyond loopback)
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def get(http: aiohttp.ClientSession, address: str, path: str) -> Any:
    """A node's JSON answer at ``path`` (with the token), or None."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with http.get(
            f"http://{address}{path}", headers=headers, timeout=aiohttp.ClientTimeout(5)
        ) as r:
            return orjson.loads(await r.read()) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    assert async_playwright is not None
    assert CHROMIUM is not None
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def rows(page: Page) -> dict[str, str]:
    """The members the page lists now, with their states."""
    found: dict[str, str] = await page.eval_on_selector_all(
        "tr[data-member]", "rows => Object.fromEntries(rows.map(r => [r.dataset.member, r.dataset.state]))"
    )
    return found


async def test_the_ring_page_lists_members_marks_a_dead_one_and_finds_a_key(
    cluster: Cluster, page: Page
) -> None:
    first = cluster.start(extra=SECURED)
    async with aiohttp.ClientSession() as http:
        await until(lambda: _answers(http, first.address), what="the first node answering")
        for _ in range(2):
            cluster.start(join=first.address, extra=SECURED)
        addresses = sorted(p.address for p in cluster.procs)

        async def formed() -> bool:  # settled too: until then a key's replica set may still be changing
            view = await get(http, first.address, "/ring")
            listed = view is not None and sorted(m["address"] for m in view["members"]) == addresses
            return listed and bool(view["settled"])

        await until(formed, what="the ring of three forming and settling", timeout=60)

        await page.goto(f"http://{first.address}/ui")
        await page.wait_for_selector("#auth", state="visible")  # the data needs the token
        await page.fill("#token", TOKEN)
        await page.click("#auth button")

        async def listed() -> bool:
            return sorted((await rows(page)).items()) == [(a, "up") for a in addresses]

        await until(listed, what="the page listing three members up", timeout=30)
        assert await page.locator("svg [data-vnode]").count() == 3 * 32  # every vnode drawn

        await page.fill("#key", "user:42")
        await page.click("#lookup button")
        await page.wait_for_selector("#answer-owner")
        lookup = await get(http, cluster.procs[2].address, "/lookup/user%3A42")  # another node's answer
        assert lookup is not None
        owner = (await page.inner_text("#answer-owner")).removeprefix("owner: ")
        assert owner == lookup["owner"]["address"]
        replicas = (await page.inner_text("#answer-replicas")).removeprefix("replicas: ").split(", ")
        assert sorted(replicas) == addresses  # N = 3 on a ring of three
        assert await page.locator("svg [data-key]").count() == 1

        victim = cluster.procs[1]
        kill9(victim)

        async def marked_down() -> bool:
            return (await rows(page)).get(victim.address) == "down"

        await until(marked_down, what="the page marking the killed node down", timeout=30)
        assert "Error" not in await page.inner_text("#error")


async def _answers(http: aiohttp.ClientSession, address: str) -> bool:
    return await get(http, address, "/status") is not None
