"""Helpers for tests with real balancer node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

FAST = [
    "--stabilize-interval",
    "0.2",
    "--rpc-timeout",
    "0.5",
    "--anti-entropy-interval",
    "0.5",
    "--no-plugins",
]


_OPEN_FILES = (
    "import os, resource, sys\n"
    "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def with_open_files(limit: int, command: list[str]) -> list[str]:
    """``command`` (a Python command line) run with a soft open-file limit of ``limit`` (the hard one
    stays): a fresh interpreter sets it and execs the command, in place, so the pid is the node's. Not
    a ``preexec_fn``: Python code between fork and exec can hang in a child of a process whose other
    threads hold locks (gRPC's do, once a test has used it)."""
    return [sys.executable, "-c", _OPEN_FILES, str(limit), *command[1:]]


def free_port() -> int:
    """A port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, what: str = "the condition"
) -> None:
    """Poll ``check`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout} s")


@dataclass
class Proc:
    """One node process."""

    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Node processes started by a test, with an HTTP client to talk to them."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        *,
        join: str | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
        open_files: int | None = None,
    ) -> Proc:
        """Start ``balancer node`` creating a ring (``join=None``) or joining ``join``, on ``port`` or a
        free one; with ``open_files``, under that soft open-file limit (:func:`with_open_files`)."""
        port = port or free_port()
        address = f"127.0.0.1:{port}"
        where = ["--join", join] if join else ["--ring"]
        log = self.tmp / f"node-{port}.log"
        command = [sys.executable, "-m", "balancer", "-v", "node", "--port", str(port), *where, *FAST, *extra]
        if open_files is not None:
            command = with_open_files(open_files, command)
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        proc = Proc(address, process, log)
        self.procs.append(proc)
        return proc

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.process.poll() is None]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                proc.process.kill()
        for proc in self.procs:
            proc.process.wait(timeout=10)


async def _json(
    session: aiohttp.ClientSession, address: str, path: str, timeout: float
) -> dict[str, Any] | None:
    """A node's JSON object at ``path``, or None if it does not answer with one."""
    try:
        async with session.get(
            f"http://{address}{path}", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                return None
            data = orjson.loads(await resp.read())
            return data if isinstance(data, dict) else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def status(session: aiohttp.ClientSession, address: str) -> dict[str, Any] | None:
    """A node's /status, or None if it does not answer."""
    return await _json(session, address, "/status", 1)


async def ring_view(session: aiohttp.ClientSession, address: str) -> dict[str, Any] | None:
    """A node's ``GET /ring`` (every member, as it surveys them now), or None if it does not answer."""
    return await _json(session, address, "/ring", 5)


async def ring_correct(session: aiohttp.ClientSession, addresses: list[str]) -> bool:
    """Whether the ring of ``addresses`` has settled: the first one's survey finds exactly these processes
    up (others only as down) and every vnode's successor list and predecessor exact, so that every node
    computes the same replica sets."""
    view = await ring_view(session, addresses[0])
    if view is None or not view["settled"]:
        return False
    up = {m["address"] for m in view["members"] if m["state"] != "down"}
    return up == set(addresses) and all(m["state"] == "up" for m in view["members"] if m["address"] in up)


def terminate(proc: Proc) -> int:
    """SIGTERM, then wait for the exit status."""
    proc.process.send_signal(signal.SIGTERM)
    return proc.process.wait(timeout=20)


def kill9(proc: Proc) -> None:
    """kill -9 the process."""
    os.kill(proc.process.pid, signal.SIGKILL)
    proc.process.wait(timeout=10)
