"""Real node processes with wrong clocks: a joiner far off is refused at join, and a member whose clock
drifts away is fenced, says so, and costs no acknowledged write (N = 3, W = 2, R = 2)."""

from __future__ import annotations

import asyncio
import functools
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from processes import Cluster, Proc, kill9, ring_correct, ring_view, status, until


async def _ring(cluster: Cluster, http: aiohttp.ClientSession, size: int, *extra: str) -> list[Proc]:
    first = cluster.start(extra=extra)
    await until(lambda: _answers(http, first), what="the first node answering")
    for _ in range(size - 1):
        cluster.start(join=first.address, extra=extra)
    addresses = [p.address for p in cluster.procs]
    await until(lambda: ring_correct(http, addresses), timeout=60, what=f"{size}-node ring convergence")
    return list(cluster.procs)


async def _answers(http: aiohttp.ClientSession, proc: Proc) -> bool:
    return await status(http, proc.address) is not None


async def _exited(proc: Proc) -> bool:
    return proc.process.poll() is not None


@pytest.mark.parametrize("transport", ["stream", "aiohttp"])
async def test_a_joiner_whose_clock_is_far_off_is_refused_with_one_line(
    cluster: Cluster, transport: str
) -> None:
    async with aiohttp.ClientSession() as http:
        procs = await _ring(cluster, http, 3, "--transport", transport)
        for offset, side in (("120", "ahead of"), ("-120", "behind")):
            extra = ("--transport", transport, "--clock-offset", offset)
            joiner = cluster.start(join=procs[1].address, extra=extra)
            gave_up = functools.partial(_exited, joiner)
            await until(gave_up, timeout=60, what=f"the {offset} s joiner giving up")
            assert joiner.process.returncode != 0
            said = [line for line in joiner.output().splitlines() if "clock is" in line]
            assert len(said) == 1, joiner.output()
            assert f"s {side} the ring's" in said[0]
            assert "Traceback" not in joiner.output()
        near = cluster.start(join=procs[2].address, extra=("--transport", transport, "--clock-offset", "30"))
        everyone = [*(p.address for p in procs), near.address]
        await until(lambda: ring_correct(http, everyone), timeout=60, what="the +30 s joiner in the ring")
        answer = await status(http, near.address)
        assert answer is not None
        assert answer["clock"]["fenced"] is False
        assert answer["clock"]["peers"] >= 1  # measured over this transport
        assert 25 < answer["clock"]["ahead"] < 35


@dataclass
class Attempt:
    index: int
    value: str | None  # None: a delete
    acknowledged: bool


async def test_a_drifting_clock_is_fenced_and_loses_no_acknowledged_write(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as http:
        procs = await _ring(cluster, http, 4)
        started = time.monotonic()
        # gains 12 s a second: past the fence's bound (48 s) after 4 s, past what replicas accept (60 s)
        # after 5 s, 120 s ahead after 10 s
        drifter = cluster.start(join=procs[0].address, extra=("--clock-drift", "12"))
        members = [*procs, drifter]
        await until(lambda: _answers(http, drifter), what="the drifting node answering")
        history: dict[str, list[Attempt]] = {}
        stop = asyncio.Event()

        async def writer(number: int) -> None:
            rng = random.Random(number)
            keys = [f"w{number}k{k}" for k in range(4)]  # one writer per key
            while not stop.is_set():
                key = rng.choice(keys)
                attempts = history.setdefault(key, [])
                node = rng.choice(members).address
                delete = bool(attempts) and rng.random() < 0.1
                value = None if delete else f"{key}#{len(attempts)}"
                attempt = Attempt(len(attempts), value, False)
                attempts.append(attempt)
                try:
                    timeout = aiohttp.ClientTimeout(total=5)
                    if delete:
                        request = http.delete(f"http://{node}/kv/{key}", timeout=timeout)
                    else:
                        request = http.put(f"http://{node}/kv/{key}", data=value, timeout=timeout)
                    async with request as resp:
                        attempt.acknowledged = resp.status in (200, 404) if delete else resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    pass  # no answer: its outcome is unknown, so either outcome is allowed below
                await asyncio.sleep(rng.random() * 0.01)

        writers = [asyncio.create_task(writer(n)) for n in range(8)]

        async def fenced() -> bool:
            answer = await status(http, drifter.address)
            return answer is not None and answer["clock"]["fenced"] is True

        await until(fenced, timeout=60, what="the drifting node fenced")
        fenced_after = time.monotonic() - started
        async with http.put(f"http://{drifter.address}/kv/probe", data=b"x") as resp:
            assert resp.status == 503
            error = orjson.loads(await resp.read())["error"]
        assert error["type"] == "ClockFencedError"
        assert "ahead of the ring's" in error["message"]
        assert error["ahead"] > 40  # its measured offset, as a number too
        assert error["bound"] == 48
        told = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "balancer", "put", drifter.address, "probe", "x"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert told.returncode == 1
        assert told.stderr.startswith("error: this node's clock is"), told.stderr  # typed, one line
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "balancer", "status", procs[1].address, "--ring"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert f"{drifter.address}" in shown.stdout
        assert "clock fenced" in next(line for line in shown.stdout.splitlines() if drifter.address in line)
        view = await ring_view(http, procs[0].address)
        assert view is not None
        flagged = [m["address"] for m in view["members"] if m["fenced"]]
        assert flagged == [drifter.address]

        async def more_acknowledged() -> bool:
            return sum(a.acknowledged for attempts in history.values() for a in attempts) >= 600

        await until(more_acknowledged, timeout=60, what="600 acknowledged writes")
        stop.set()
        await asyncio.gather(*writers)
        kill9(drifter)
        rest = [p.address for p in procs]
        await until(lambda: ring_correct(http, rest), timeout=60, what="convergence without the drifter")

        wrong: list[str] = []
        for key, attempts in history.items():
            acked = [a.index for a in attempts if a.acknowledged]
            allowed = {a.value for a in attempts if a.index >= (acked[-1] if acked else 0)}
            if not acked:
                allowed.add(None)
            for address in rest:
                async with http.get(f"http://{address}/kv/{key}") as resp:
                    found = (await resp.read()).decode() if resp.status == 200 else None
                    if resp.status not in (200, 404) or found not in allowed:
                        wrong.append(f"{key} via {address}: {resp.status} {found!r}, allowed {allowed}")
        assert not wrong, f"{len(wrong)} reads wrong (fenced after {fenced_after:.1f} s): {wrong[:10]}"
        warnings = [line for line in drifter.output().splitlines() if "fenced:" in line]
        assert len(warnings) == 1, warnings  # said once, not once per request
