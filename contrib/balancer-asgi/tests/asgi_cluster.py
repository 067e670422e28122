"""Clusters of uvicorn backend processes on 127.0.0.1 for the tests (``asgi_apps.py`` is what they run).

Each backend's listening socket is bound and listening in the test process before the backends start, and
handed down to it, so every backend knows every address from the start and no port can be taken between
choosing it and serving on it. A dead backend is a bound socket that never listens: connecting to it is
refused, and its port stays ours for the cluster's life.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from balancer import BoundedLoadBalancer

HERE = Path(__file__).resolve().parent
APPS = HERE / "asgi_apps.py"
SECRET = "shared by the test backends only"
SLOW_TIMEOUT = 1.0
"""The ``/slow`` router's timeout; the slow owner takes ten times as long."""
READY_SECONDS = 90.0
"""How long a cluster may take to start on a busy machine."""


@dataclass
class Cluster:
    """Three backend processes and the address of a dead one, all in every backend's balancer."""

    backends: list[str]
    """The live backends' addresses."""
    dead: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _dead_socket: socket.socket | None = None

    @property
    def names(self) -> list[str]:
        """What every backend's main balancer is made of: the live backends and the dead one."""
        return [*self.backends, self.dead]

    def owner(self, key: str) -> str:
        """Where the backends send ``key`` while no request is in flight."""
        return BoundedLoadBalancer(self.names).peek(key)

    def keys(self, owner: str, count: int, prefix: str = "k") -> list[str]:
        """``count`` keys that ``owner`` owns."""
        found = []
        for i in range(100_000):
            if self.owner(f"{prefix}{i}") == owner:
                found.append(f"{prefix}{i}")
                if len(found) == count:
                    return found
        raise AssertionError(f"fewer than {count} keys for {owner}")

    def output(self) -> str:
        """What the backends wrote, for failure messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in self.logs)

    def stop(self) -> None:
        """Stop every backend (SIGTERM, then SIGKILL after a deadline) and free the dead port."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        if self._dead_socket is not None:
            self._dead_socket.close()


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _ready(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def start(kind: str, http: str, logs: Path) -> Cluster:
    """Three ``kind`` backends (``fastapi`` or ``starlette``) served by uvicorn with parser ``http``,
    answering ``/health`` when this returns."""
    sockets = [_listening() for _ in range(3)]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    backends = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    cluster = Cluster(backends, f"127.0.0.1:{dead.getsockname()[1]}", _dead_socket=dead)
    try:
        for me, sock in zip(backends, sockets, strict=True):
            settings = {
                "me": me,
                "backends": cluster.names,
                "dead": cluster.dead,
                "secret": SECRET,
                "slow_timeout": SLOW_TIMEOUT,
            }
            log = logs / f"{kind}-{me.replace(':', '-')}.log"
            cluster.logs.append(log)
            with log.open("wb") as out:
                cluster.processes.append(
                    subprocess.Popen(
                        [sys.executable, str(APPS), str(sock.fileno()), kind, http, json.dumps(settings)],
                        pass_fds=[sock.fileno()],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=HERE,
                    )
                )
        for sock in sockets:
            sock.close()  # the backends hold their own copies
        deadline = time.monotonic() + READY_SECONDS
        waiting = list(backends)
        while waiting:
            if any(p.poll() is not None for p in cluster.processes):
                raise AssertionError(f"a backend exited while starting:\n{cluster.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{waiting} not serving after {READY_SECONDS} s:\n{cluster.output()}")
            waiting = [b for b in waiting if not _ready(b)]
            if waiting:
                time.sleep(0.05)  # the poll's interval: each round asks every backend not yet serving
    except BaseException:
        for sock in sockets:
            sock.close()
        cluster.stop()
        raise
    return cluster
