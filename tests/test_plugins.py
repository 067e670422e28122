"""The plugin manager, the registry of named factories, and every hook."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pluggy
import pytest
from helpers import SOLO, addresses, converge

from balancer import hookspecs
from balancer.config import Config
from balancer.errors import KeyNotFoundError, PeerUnreachableError, PluginError, TooLargeError
from balancer.hookspecs import (
    ReplicationFactory,
    ReplicationStrategy,
    Route,
    Storage,
    StorageFactory,
    Transport,
    TransportFactory,
    hookimpl,
)
from balancer.keyspace import KeySpace
from balancer.node import Node
from balancer.plugin import Registry, import_plugins, installed_plugins, plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.plugins.memory_storage import MemoryStorage
from balancer.plugins.replication import MultiRing, SuccessorList
from balancer.types import Member, NodeInfo


def test_builtin_plugins_are_registered_by_name(pm: pluggy.PluginManager) -> None:
    registry = Registry(pm)
    assert set(registry.transports.factories) == {"aiohttp", "local", "stream"}
    assert set(registry.storages.factories) == {"memory", "sqlite"}
    assert set(registry.replications.factories) == {"successor", "multi-ring", "groups"}
    assert isinstance(registry.storage(Config()), MemoryStorage)
    assert isinstance(registry.transport(Config(transport="local")), LocalTransport)


def test_unknown_names_list_what_exists(pm: pluggy.PluginManager) -> None:
    registry = Registry(pm)
    with pytest.raises(PluginError, match=r"no storage named 'redis'; available: memory, sqlite"):
        registry.storage(Config(storage="redis"))
    with pytest.raises(PluginError, match=r"available: aiohttp, local"):
        registry.transport(Config(transport="grpc"))
    with pytest.raises(PluginError, match=r"groups, multi-ring, successor"):
        registry.replication(Config(replication="ring-of-rings"))


def test_a_user_plugin_wins_over_a_builtin_of_the_same_name() -> None:
    class Mine(MemoryStorage):
        pass

    class Plugin:
        @hookimpl
        def balancer_register_storages(self, register: Callable[[str, StorageFactory], None]) -> None:
            def make(config: Config) -> Storage:
                return Mine()

            register("memory", make)

    registry = Registry(plugin_manager(load_entrypoints=False, plugins=[Plugin()]))
    assert type(registry.storage(Config())) is Mine


def test_a_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def balancer_register_storage(self, register: object) -> None:  # missing the final s
            raise AssertionError("never called")

    plugin = Typo()
    with pytest.raises(PluginError, match="balancer_register_storage") as info:
        plugin_manager(load_entrypoints=False, plugins=[plugin])
    assert info.value.plugin is plugin


async def test_a_plugin_transport_and_strategy_are_chosen_by_name(network: LocalNetwork) -> None:
    made: list[str] = []

    class Plugin:
        @hookimpl
        def balancer_register_transports(self, register: Callable[[str, TransportFactory], None]) -> None:
            def make(config: Config) -> Transport:
                made.append("transport")
                return LocalTransport(network)

            register("loopback", make)

        @hookimpl
        def balancer_register_replications(self, register: Callable[[str, ReplicationFactory], None]) -> None:
            class Everywhere(ReplicationStrategy):
                def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
                    made.append("positions")
                    return [0]

            register("at-zero", lambda config: Everywhere())

    pm = plugin_manager(load_entrypoints=False, plugins=[Plugin()])
    config = Config(transport="loopback", replication="at-zero", load_entrypoints=False, **SOLO)
    async with Node(config, pm=pm) as node:
        await node.put("k", b"v")
        assert await node.get("k") == b"v"
    assert made[0] == "transport"
    assert "positions" in made
    assert node.address in network.down or node.address not in network.servers


def test_replication_positions() -> None:
    space = KeySpace()
    assert SuccessorList().positions(b"k", 3, space) == [space.id(b"k")]
    spread = MultiRing().positions(b"k", 3, space)
    assert spread[0] == space.id(b"k")
    assert len(set(spread)) == 3


class Recorder:
    """Records every ring event it is told of."""

    def __init__(self) -> None:
        self.events: list[tuple[str, NodeInfo, object]] = []

    @hookimpl
    def balancer_node_joined(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.events.append(("joined", node, peer))

    @hookimpl
    def balancer_node_left(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.events.append(("left", node, peer))

    @hookimpl
    def balancer_node_failed(self, node: NodeInfo, peer: NodeInfo) -> None:
        self.events.append(("failed", node, peer))

    @hookimpl
    def balancer_range_moved(self, node: NodeInfo, target: NodeInfo, records: int) -> None:
        self.events.append(("moved", node, (target, records)))

    @hookimpl
    def balancer_membership_changed(self, node: NodeInfo, members: tuple[Member, ...]) -> None:
        self.events.append(("members", node, members))

    def members(self, node: NodeInfo) -> tuple[Member, ...]:
        """The last membership view ``node`` reported."""
        views = [e[2] for e in self.of("members") if e[1] == node]
        assert views, f"{node} reported no membership"
        return views[-1]  # type: ignore[return-value]

    def peers(self, kind: str) -> list[tuple[NodeInfo, NodeInfo]]:
        """(observer, peer) of every ``kind`` event (joined, left, failed)."""
        return [(node, peer) for _, node, peer in self.of(kind) if isinstance(peer, NodeInfo)]

    def of(self, kind: str) -> list[tuple[str, NodeInfo, object]]:
        return [e for e in self.events if e[0] == kind]


async def test_ring_events_reach_plugins(network: LocalNetwork) -> None:
    recorder = Recorder()
    pm = plugin_manager(load_entrypoints=False, plugins=[recorder])
    config = Config(transport="local", load_entrypoints=False, stabilize_interval=3600.0)
    nodes: list[Node] = []
    try:
        for _ in range(4):
            node = Node(
                config, join=nodes[0].address if nodes else None, pm=pm, transport=LocalTransport(network)
            )
            await node.start()
            nodes.append(node)
            await converge(nodes)
        joined = [(node.address, peer.address) for node, peer in recorder.peers("joined")]
        assert {n.address for n in nodes[1:]} <= {peer for _, peer in joined}  # every process that joined
        assert len(joined) == len(set(joined))  # heard of once per process, not once per vnode
        everyone = sorted(n.address for n in nodes)
        assert [m.address for m in recorder.members(nodes[0].info)] == everyone
        assert recorder.members(nodes[0].info) == nodes[0].members()
        for i in range(50):
            await nodes[0].put(f"k{i}", b"v")
        leaver, victim = nodes[1], nodes[2]
        await leaver.leave()
        assert any(
            node.address != leaver.address and peer.address == leaver.address
            for node, peer in recorder.peers("left")
        )
        moved = [payload for _, node, payload in recorder.of("moved") if node == leaver.info]
        assert moved or await leaver.storage.count() == 0
        network.kill(victim.address)
        alive = [nodes[0], nodes[3]]
        await converge(alive)
        assert any(peer.address == victim.address for _, peer in recorder.peers("failed"))
    finally:
        for node in nodes:
            await node.close()


def test_every_hook_has_a_test() -> None:
    hooks = {
        name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("balancer_")
    }
    text = "".join(path.read_text() for path in Path(__file__).parent.rglob("test_*.py"))
    untested = sorted(hook for hook in hooks if f"def {hook}(" not in text)
    assert not untested, f"hooks no test implements: {untested}"


async def test_plugins_add_http_routes_and_see_every_kv_operation() -> None:
    operations: list[tuple[str, bool]] = []
    outcomes: list[tuple[str, str, int, str]] = []

    class Metrics:
        @hookimpl
        def balancer_http_routes(self, node: Node, register: Callable[[Route], None]) -> None:
            async def count() -> tuple[int, str, bytes]:
                records = await node.storage.count()
                return 200, "text/plain; version=0.0.4; charset=utf-8", f"records {records}\n".encode()

            register(Route("GET", "/metrics", count))

        @hookimpl
        def balancer_kv_operation(self, node: NodeInfo, operation: str, seconds: float, ok: bool) -> None:
            assert seconds >= 0
            operations.append((operation, ok))

    class Outcomes:  # the newer arguments: a hookimpl takes the subset it wants
        @hookimpl
        def balancer_kv_operation(self, node: NodeInfo, operation: str, outcome: str, key_id: int) -> None:
            outcomes.append((operation, outcome, key_id, node.address))

    pm = plugin_manager(load_entrypoints=False, plugins=[Metrics(), Outcomes()])
    async with Node(Config(load_entrypoints=False, **SOLO), pm=pm) as node:
        await node.put("a", b"1")
        assert await node.get("a") == b"1"
        with pytest.raises(KeyNotFoundError):
            await node.get("missing")
        await node.delete("a")
        with pytest.raises(TooLargeError):
            await node.put("k" * 2000, b"1")
        coordinator = node.address
        space = node.space
        async with aiohttp.ClientSession() as http, http.get(f"http://{node.address}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert await resp.text() == "records 1\n"  # the tombstone of "a"
    assert operations == [("put", True), ("get", True), ("get", False), ("delete", True), ("put", False)]
    assert outcomes == [
        ("put", "ok", space.id(b"a"), coordinator),
        ("get", "ok", space.id(b"a"), coordinator),
        ("get", "not_found", space.id(b"missing"), coordinator),
        ("delete", "ok", space.id(b"a"), coordinator),
        ("put", "invalid", space.id(b"k" * 2000), coordinator),
    ]


async def test_seeds_are_tried_in_order_and_a_lone_first_node_can_create(network: LocalNetwork) -> None:
    config = Config(transport="local", load_entrypoints=False, **SOLO)
    pm = plugin_manager(load_entrypoints=False)
    async with Node(config, pm=pm, transport=LocalTransport(network)) as first:
        dead = "127.0.0.1:9"
        async with Node(
            config, join=[dead, first.address], pm=pm, transport=LocalTransport(network)
        ) as second:
            assert second.bootstrap == first.address
        # one pass over the seeds (waiting for them is tested in test_node_start.py)
        alone = Node(config.evolve(join_timeout=0), join=[dead], pm=pm, transport=LocalTransport(network))
        with pytest.raises(PeerUnreachableError):
            await alone.start()
        async with Node(
            config, join=[dead], create_if_alone=True, pm=pm, transport=LocalTransport(network)
        ) as new:
            assert new.bootstrap is None
            assert addresses(new.view().successors) == {new.address}


def test_an_async_hook_is_refused_naming_the_plugin_and_the_hook() -> None:
    class Eager:
        @hookimpl
        async def balancer_node_joined(self, node: object, peer: object) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginError, match=r"plugin 'Eager': hook balancer_node_joined is async def"):
        plugin_manager(load_entrypoints=False, plugins=[Eager()])


def test_an_async_factory_is_refused_by_name() -> None:
    class Deferred:
        @hookimpl
        def balancer_register_storages(self, register: Callable[[str, StorageFactory], None]) -> None:
            async def make(config: Config) -> Storage:
                raise AssertionError("never awaited")

            register("later", make)  # type: ignore[arg-type]

    registry = Registry(plugin_manager(load_entrypoints=False, plugins=[Deferred()]))
    with pytest.raises(PluginError, match="storage factory 'later' is async"):
        registry.storage(Config(storage="later"))


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution whose ``balancer`` entry point fails to import."""
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs libfoo, which is missing')\n")
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[balancer]\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_that_fails_to_import_is_named_and_can_be_left_out(broken_plugin: Path) -> None:
    with pytest.raises(PluginError) as info:
        plugin_manager()
    message = str(info.value)
    assert "\n" not in message
    assert "plugin 'broken' (package broken-plugin) failed to load: ImportError: needs libfoo" in message
    assert "--disable-plugin broken" in message
    others = [name for name in installed_plugins() if name != "broken"]  # whatever else is installed
    assert plugin_manager(disabled=["broken", *others]).get_plugin("broken") is None
    assert plugin_manager(load_entrypoints=False).get_plugin("broken") is None
    with pytest.raises(PluginError, match=r"no installed plugin named nope; installed: .*broken"):
        plugin_manager(disabled=["nope"])


def test_a_plugin_module_is_loaded_by_name_or_named_when_it_fails(tmp_path: Path) -> None:
    (tmp_path / "named_plugin.py").write_text(
        "from balancer.hookspecs import hookimpl\n"
        "@hookimpl\n"
        "def balancer_register_storages(register):\n"
        "    from balancer.plugins.memory_storage import MemoryStorage\n"
        "    register('named', lambda config: MemoryStorage())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = {"env": env, "capture_output": True, "text": True, "timeout": 60}
    balancer = [sys.executable, "-m", "balancer"]
    bad = [*balancer, "node", "--ring", "--no-plugins", "--plugin", "no_such_module"]
    failed = subprocess.run(bad, **run)  # type: ignore[call-overload]
    assert failed.returncode == 1
    assert failed.stderr.strip() == (
        "Error: plugin module 'no_such_module' failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module'"
    )
    only = ["--no-plugins", "--plugin", "named_plugin"]
    listed = subprocess.run([*balancer, "plugins", *only], **run)  # type: ignore[call-overload]
    assert listed.returncode == 0, listed.stderr
    assert "storages: memory, named, sqlite" in listed.stdout
    assert import_plugins(["json"])[0].__name__ == "json"  # type: ignore[attr-defined]


def test_the_cli_names_a_broken_plugin_in_one_line(broken_plugin: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(broken_plugin)}
    balancer = [sys.executable, "-m", "balancer"]
    failed = subprocess.run(
        [*balancer, "node", "--ring"], env=env, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()  # one line, whatever else is installed
    assert line.startswith("Error: ")
    assert (
        "plugin 'broken' (package broken-plugin) failed to load: ImportError: needs libfoo, which is missing"
        in line
    )
    assert line.endswith("(or --no-plugins)")
    assert "--disable-plugin broken" in line
    listed = subprocess.run(
        [*balancer, "plugins", "--disable-plugin", "broken"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "plugin broken (broken-plugin): not loaded" in listed.stdout
    assert "replication: groups, multi-ring, successor" in listed.stdout


def test_the_core_loads_without_the_plugin_system_or_the_repl() -> None:
    probe = (
        "import sys\n"
        "import balancer.ring, balancer.chord\n"
        "assert 'pluggy' not in sys.modules, 'the ring protocol imports pluggy'\n"
        "from balancer.plugin import plugin_manager\n"
        "plugin_manager(load_entrypoints=False)\n"
        "assert 'click' not in sys.modules, 'a plugin imports the REPL'\n"
        "assert 'balancer.node' not in sys.modules, 'a plugin imports the node'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_plugin_replaces_the_repl_and_the_cli_runs_it(tmp_path: Path) -> None:
    (tmp_path / "quiet_repl.py").write_text(
        "from balancer.hookspecs import hookimpl\n"
        "\n"
        "async def session(node, stop):\n"
        "    await node.put('greeting', b'hello')\n"
        "    print('custom repl on', node.address, (await node.get('greeting')).decode(), flush=True)\n"
        "\n"
        "@hookimpl\n"
        "def balancer_repl(node, pm, stop):\n"
        "    return session(node, stop)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    solo = ["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"]
    # the plugin by module name, and no others: whatever else is installed does not matter here
    command = [
        sys.executable,
        "-m",
        "balancer",
        "repl",
        "--ring",
        *solo,
        "--no-plugins",
        "--plugin",
        "quiet_repl",
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    assert "custom repl on 127.0.0.1:" in done.stdout
    assert done.stdout.split("custom repl on ")[1].split()[1] == "hello"
    assert "left the ring" in done.stdout
    assert "CMD->" not in done.stdout  # the built-in REPL never started
