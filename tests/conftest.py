"""Shared fixtures: a plugin manager with only the built-in plugins, rings on the local transport, and
clusters of real node processes, and TLS material (a test CA and a certificate it signed)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pluggy
import pytest
import uvloop
from helpers import QUIET, RingFactory, converge, stranger
from hypothesis import HealthCheck, settings
from processes import Cluster

from balancer.config import Config
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport

# Property tests check invariants, not speed: on a busy shared machine an example may take seconds, so
# neither a per-example deadline nor the too-slow health check may fail them.
settings.register_profile("balancer", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("balancer")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests of a module that sets ``BOTH_LOOPS`` run on asyncio's loop and on uvloop's (their transports
    differ); every other test on asyncio's alone."""
    if getattr(getattr(item, "module", None), "BOTH_LOOPS", False):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def pm() -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins only (entry points are not loaded under test)."""
    return plugin_manager(load_entrypoints=False)


@pytest.fixture
def network() -> LocalNetwork:
    """A fresh in-process network."""
    return LocalNetwork()


@pytest.fixture
async def make_ring(network: LocalNetwork, pm: pluggy.PluginManager) -> AsyncIterator[RingFactory]:
    """``await make_ring(n, seed=..., **config)``: n nodes joined one by one through random members,
    stabilized after each join, converged at the end. Every node is closed at teardown.
    """
    made: list[Node] = []

    async def build(count: int, *, seed: int = 1, **settings: object) -> list[Node]:
        config = Config(transport="local", load_entrypoints=False, **{**QUIET, **settings})  # type: ignore[arg-type]
        rng = random.Random(seed)
        nodes: list[Node] = []
        for _ in range(count):
            join = rng.choice(nodes).address if nodes else None
            node = Node(config, join=join, pm=pm, transport=LocalTransport(network))
            await node.start()
            made.append(node)
            nodes.append(node)
            for _ in range(2):
                for member in nodes:
                    await member.ring.stabilize()
        await converge(nodes)
        return nodes

    yield build
    for node in made:
        await node.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real node processes on 127.0.0.1; every process started is killed at teardown."""
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
async def stranger_address() -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 that is not a balancer node (see ``helpers.stranger``)."""
    async with stranger() as address:
        yield address


# -- TLS material ------------------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    """A test CA and one node certificate it signed (for 127.0.0.1, good for server and client use)."""

    ca: str
    cert: str
    key: str


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a node certificate signed by it, made with the openssl command (EC keys: quick)."""
    folder = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=balancer test CA", "-keyout", ca_key, "-out", ca)
    key, request, cert = folder / "node.key", folder / "node.csr", folder / "node.pem"
    openssl("req", *ec, "-subj", "/CN=node", "-keyout", key, "-out", request)
    extensions = folder / "node.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(
        "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
        "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return Pki(str(ca), str(cert), str(key))
