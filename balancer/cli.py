"""The ``balancer`` command line: ``node``, ``repl``, ``status`` and ``demo``.

The only module that prints; everything it does goes through the public API (:class:`Node`, :class:`Config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import aiohttp
import click
import orjson
import pluggy
from click.core import ParameterSource

from balancer.client import RemoteNode
from balancer.config import Config
from balancer.errors import BalancerError, KeyNotFoundError, PluginError
from balancer.plugin import Registry, import_plugins, installed_plugins, plugin_manager
from balancer.types import format_id

__all__ = ["main"]

_BANNER = "[balancer]"


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return value


def _addresses(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_address(ctx, param, value) or value for value in values)


def _extra(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--set PLUGIN.KEY=VALUE`` options as ``Config.extra``: ``{plugin: {key: value}}``."""
    extra: dict[str, dict[str, str]] = {}
    for value in values:
        name, eq, setting = value.partition("=")
        plugin, dot, key = name.strip().partition(".")
        if not (eq and dot and plugin and key):
            raise click.BadParameter(f"{value!r} is not PLUGIN.KEY=VALUE", ctx, param)
        extra.setdefault(plugin, {})[key] = setting
    return extra


def _plugins(config: Config, disabled: Sequence[str], modules: Sequence[str] = ()) -> pluggy.PluginManager:
    """The plugin manager a node runs with; a usage error if ``config`` names a plugin that is missing."""
    try:
        extra = import_plugins(modules)
        pm = plugin_manager(load_entrypoints=config.load_entrypoints, disabled=disabled, plugins=extra)
    except BalancerError as exc:  # a broken plugin: one line naming it, never a traceback
        raise click.ClickException(str(exc)) from exc
    try:
        Registry(pm).check(config)
    except BalancerError as exc:
        raise click.UsageError(str(exc)) from exc
    return pm


def _seconds(flag: str, default: float, text: str, *, zero_ok: bool = False) -> Callable[..., Any]:
    """An option that is a duration in seconds: positive (or, with ``zero_ok``, not negative)."""
    return click.option(
        flag,
        type=click.FloatRange(min=0, min_open=not zero_ok),
        default=default,
        show_default=True,
        help=text,
    )


def _node_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``node`` and ``repl``."""
    options = [
        click.option(
            "--port",
            type=click.IntRange(0, 65535),
            default=0,
            show_default=True,
            help="Port to listen on (0 picks a free one).",
        ),
        click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on."),
        click.option("--address", help="Host name other nodes reach this one at (default: --host)."),
        click.option("--ring", is_flag=True, help="Create a new ring."),
        click.option(
            "--join",
            metavar="HOST:PORT",
            multiple=True,
            callback=_addresses,
            help="Join the ring of this node; repeat to name several seeds, tried in order. Seeds that do "
            "not answer yet are waited for (--join-timeout), unless --ring is given too.",
        ),
        click.option(
            "--successors",
            type=click.IntRange(1, 64),
            default=8,
            show_default=True,
            help="Length of the successor list.",
        ),
        _seconds("--stabilize-interval", 0.5, "Seconds between stabilization rounds."),
        _seconds(
            "--rpc-timeout",
            1.0,
            "Shortest timeout of a call between nodes; each peer's follows its round-trips.",
        ),
        click.option(
            "--transport",
            default="stream",
            show_default=True,
            help="Transport: stream, aiohttp, or a plugin's (balancer plugins lists them).",
        ),
        click.option(
            "--storage",
            help="Storage: memory, sqlite, or a plugin's (default: sqlite with --data-dir, else memory).",
        ),
        click.option(
            "--data-dir", type=click.Path(file_okay=False), help="Keep records on disk here (sqlite)."
        ),
        click.option(
            "--replicas",
            type=click.IntRange(1, 16),
            default=3,
            show_default=True,
            help="Replication factor N.",
        ),
        click.option(
            "--write-quorum",
            type=click.IntRange(1, 16),
            default=2,
            show_default=True,
            help="W: replicas that must store a write before it is acknowledged.",
        ),
        click.option(
            "--read-quorum",
            type=click.IntRange(1, 16),
            default=2,
            show_default=True,
            help="R: replicas a read asks; R + W > N gives read-your-writes.",
        ),
        click.option(
            "--vnodes",
            type=click.IntRange(1, 256),
            default=32,
            show_default=True,
            help="Virtual nodes: ring ids this process holds at weight 1 (more spread a failure wider).",
        ),
        click.option(
            "--weight",
            type=click.FloatRange(0, 64, min_open=True),
            default=1.0,
            show_default=True,
            help="Relative size of this machine: round(vnodes * weight) ids and that share of the keys.",
        ),
        click.option(
            "--replication",
            default="successor",
            show_default=True,
            help="Where replicas go: successor, multi-ring (N independent places), groups (replication "
            "groups), or a plugin's. A ring setting: every member must use the same.",
        ),
        _seconds("--anti-entropy-interval", 5.0, "Seconds between replica maintenance passes."),
        _seconds("--tombstone-grace", 86400.0, "Seconds a delete's tombstone is kept."),
        click.option(
            "--cluster-secret",
            envvar="BALANCER_CLUSTER_SECRET",
            help="Shared secret that signs inter-node RPCs. Visible in ps: prefer --cluster-secret-file or "
            "BALANCER_CLUSTER_SECRET.",
        ),
        click.option(
            "--cluster-secret-file", type=click.File("r"), help="Read the cluster secret from this file."
        ),
        click.option(
            "--api-token",
            envvar="BALANCER_API_TOKEN",
            help="Bearer token the /kv and /status API requires (also signs RPCs if no cluster secret). "
            "Visible in ps: prefer --api-token-file or BALANCER_API_TOKEN.",
        ),
        click.option("--api-token-file", type=click.File("r"), help="Read the API token from this file."),
        click.option(
            "--tls-cert",
            type=click.Path(dir_okay=False, exists=True),
            help="Serve TLS with this certificate.",
        ),
        click.option(
            "--tls-key", type=click.Path(dir_okay=False, exists=True), help="Private key of --tls-cert."
        ),
        click.option(
            "--tls-ca",
            type=click.Path(dir_okay=False, exists=True),
            help="Verify peers against this CA, call them over TLS, and require their client certificates.",
        ),
        click.option(
            "--max-value-bytes",
            type=click.IntRange(0),
            default=1 << 20,
            show_default=True,
            help="Largest value accepted.",
        ),
        _seconds(
            "--max-clock-skew",
            60.0,
            "Seconds a peer's clock may be ahead; records stamped further ahead are refused.",
        ),
        _seconds(
            "--partition-memory",
            600.0,
            "Seconds a failed member still counts: a node that sees no majority up answers 503.",
        ),
        click.option(
            "--clock-offset",
            type=float,
            default=0.0,
            hidden=True,
            help="For fault tests only: seconds added to this node's wall clock.",
        ),
        click.option(
            "--clock-drift",
            type=float,
            default=0.0,
            hidden=True,
            help="For fault tests only: seconds per second this node's wall clock gains from its start.",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(16, 1 << 20),
            default=1024,
            show_default=True,
            help="Most connections served at once (a share is kept for ring RPCs).",
        ),
        _seconds("--idle-timeout", 30.0, "Seconds an idle keep-alive connection is kept open."),
        _seconds("--header-timeout", 10.0, "Seconds a new connection has to send its request head."),
        click.option(
            "--fsync",
            is_flag=True,
            help="Sync every write to disk (survives power loss; slower). Needs --data-dir.",
        ),
        _seconds(
            "--join-timeout",
            30.0,
            "Seconds to keep retrying --join seeds that do not answer yet.",
            zero_ok=True,
        ),
        click.option("--no-plugins", is_flag=True, help="Do not load third-party plugins (entry points)."),
        click.option(
            "--disable-plugin",
            "disabled",
            metavar="NAME",
            multiple=True,
            help="Do not load this third-party plugin (repeatable).",
        ),
        click.option(
            "--plugin",
            "modules",
            metavar="MODULE",
            multiple=True,
            help="Also load the plugin in this importable module, an installed package or not (repeatable).",
        ),
        click.option(
            "--set",
            "extra",
            metavar="PLUGIN.KEY=VALUE",
            multiple=True,
            callback=_extra,
            help="A plugin's setting, passed to it in Config.extra (repeatable), e.g. --set groups.size=4.",
        ),
        click.option(
            "--loop",
            type=click.Choice(["auto", "asyncio", "uvloop"]),
            default="auto",
            show_default=True,
            help="Event loop: uvloop is faster (pip install 'balancer[fast]'); auto uses it when installed.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _config(**opts: Any) -> Config:
    if not opts["ring"] and not opts["join"]:
        raise click.UsageError(
            "give --ring (create a ring) or --join HOST:PORT (or both: join if a seed answers)"
        )
    own = f"{opts['address'] or opts['host']}:{opts['port']}"
    if opts["port"] and own in opts["join"]:
        raise click.UsageError(f"--join {own} is this node's own address; give another member of the ring")
    if opts["fsync"] and not opts["data_dir"]:
        raise click.UsageError("--fsync syncs the database to disk: it needs --data-dir")
    secret = _secret("cluster_secret", opts["cluster_secret"], opts["cluster_secret_file"])
    token = _secret("api_token", opts["api_token"], opts["api_token_file"])
    storage = opts["storage"] or ("sqlite" if opts["data_dir"] else "memory")
    try:
        return Config(
            host=opts["host"],
            port=opts["port"],
            address=opts["address"],
            successors=opts["successors"],
            stabilize_interval=opts["stabilize_interval"],
            fix_fingers_interval=max(1.0, 2 * opts["stabilize_interval"]),
            check_predecessor_interval=max(1.0, 2 * opts["stabilize_interval"]),
            rpc_timeout=opts["rpc_timeout"],
            transport=opts["transport"],
            storage=storage,
            data_dir=opts["data_dir"],
            replicas=opts["replicas"],
            write_quorum=opts["write_quorum"],
            read_quorum=opts["read_quorum"],
            replication=opts["replication"],
            vnodes=opts["vnodes"],
            weight=opts["weight"],
            anti_entropy_interval=opts["anti_entropy_interval"],
            tombstone_grace=opts["tombstone_grace"],
            cluster_secret=secret,
            api_token=token,
            tls_cert=opts["tls_cert"],
            tls_key=opts["tls_key"],
            tls_ca=opts["tls_ca"],
            max_value_bytes=opts["max_value_bytes"],
            max_clock_skew=opts["max_clock_skew"],
            clock_offset=opts["clock_offset"],
            clock_drift=opts["clock_drift"],
            partition_memory=opts["partition_memory"],
            max_connections=opts["max_connections"],
            idle_timeout=opts["idle_timeout"],
            header_timeout=opts["header_timeout"],
            fsync=opts["fsync"],
            join_timeout=opts["join_timeout"],
            load_entrypoints=not opts["no_plugins"],
            extra=opts["extra"],
        )
    except BalancerError as exc:
        raise click.UsageError(str(exc)) from exc


def _how(opts: dict[str, Any]) -> dict[str, Any]:
    """How to start a node, from the options of ``node`` and ``repl``: the arguments of ``_start``."""
    return {
        "create_if_alone": opts["ring"],
        "loop": opts["loop"],
        "disabled": opts["disabled"],
        "modules": opts["modules"],
    }


def _say(text: str, *, err: bool = False) -> None:
    click.echo(f"{_BANNER} {text}", err=err)


def _secret(name: str, value: str | None, file: TextIO | None) -> str | None:
    """The secret option ``name`` from its ``-file`` option or its value; warns when the value was typed
    on the command line, where every local user can read it (``ps``, ``/proc/PID/cmdline``)."""
    flag = "--" + name.replace("_", "-")
    typed = click.get_current_context().get_parameter_source(name) is ParameterSource.COMMANDLINE
    if file is not None:
        if typed:
            raise click.UsageError(f"give {flag} or {flag}-file, not both")
        text = file.read().strip()
        if not text:  # an empty secret would silently mean none: an unsigned ring, an open API
            raise click.UsageError(f"{flag}-file {file.name} is empty")
        return text
    if typed and value:
        env = f"BALANCER_{name.upper()}"
        _say(f"warning: {flag} is visible to every local user in ps; use {flag}-file or {env}", err=True)
    return value or None


async def _run(
    config: Config, pm: pluggy.PluginManager, join: Sequence[str], repl: bool, create_if_alone: bool
) -> None:
    """Run one node until SIGINT/SIGTERM (or the REPL ends), then leave the ring gracefully."""
    from balancer.node import Node  # here: the client commands start faster without it

    node = Node(config, join=join, create_if_alone=create_if_alone, pm=pm)

    def waiting(seeds: list[str], attempt: int, attempts: int) -> None:
        _say(f"waiting for {', '.join(seeds)} ({attempt}/{attempts})")

    await node.start(on_join_wait=waiting)
    _say(
        f"node {node.address} id {format_id(node.info.id, config.bits)} "
        + (f"joined via {node.bootstrap}" if node.bootstrap else "created a ring")
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if repl:
            session = pm.hook.balancer_repl(node=node, pm=pm, stop=stop)
            if session is None:
                raise PluginError("no plugin offers a REPL (the built-in one is balancer.plugins.repl)")
            _say("type help for the commands")
            await session
        else:
            await stop.wait()
    finally:
        if not node.stopped:
            await node.leave()
        _say(f"node {node.address} left the ring")


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run a node on: uvloop's if asked for (or ``auto`` and installed), else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise click.UsageError("--loop uvloop needs uvloop: pip install 'balancer[fast]'") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _start(
    config: Config,
    join: Sequence[str],
    repl: bool,
    *,
    create_if_alone: bool = False,
    loop: str = "auto",
    disabled: Sequence[str] = (),
    modules: Sequence[str] = (),
) -> None:
    pm = _plugins(config, disabled, modules)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
            runner.run(_run(config, pm, join, repl, create_if_alone))
    except BalancerError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # the port is taken, the interface does not exist
        raise click.ClickException(
            f"cannot serve on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from exc


@click.group()
@click.version_option(package_name="balancer")
@click.option(
    "-v", "--verbose", count=True, help="Log more: -v info, -vv debug and every HTTP request served."
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, writable=True),
    help="Append the log to this file instead of standard error.",
)
def main(verbose: int, log_file: str | None) -> None:
    """balancer: a fault-tolerant Chord ring and key-value store, with bounded-load balancing."""
    level = logging.WARNING - 10 * min(verbose, 2)
    target: dict[str, Any] = {"filename": log_file} if log_file else {}
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", **target)
    # one line per HTTP request served (aiohttp's access log) only at -vv: at -v it would drown the rest
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


@main.command()
@_node_options
@click.option("--cli", "with_cli", is_flag=True, help="Open the REPL on this node.")
def node(with_cli: bool, **opts: Any) -> None:
    """Run a ring node; with --cli, also the REPL. SIGINT/SIGTERM leave the ring gracefully."""
    _start(_config(**opts), opts["join"], with_cli, **_how(opts))


@main.command()
@_node_options
def repl(**opts: Any) -> None:
    """Run a ring node with the REPL (as ``node --cli``)."""
    _start(_config(**opts), opts["join"], True, **_how(opts))


@main.command()
@click.option("--no-plugins", is_flag=True, help="Do not load third-party plugins (entry points).")
@click.option("--disable-plugin", "disabled", metavar="NAME", multiple=True, help="Do not load this plugin.")
@click.option("--plugin", "modules", metavar="MODULE", multiple=True, help="Also load this plugin module.")
def plugins(no_plugins: bool, disabled: tuple[str, ...], modules: tuple[str, ...]) -> None:
    """List the installed plugins and the transports, storages and replication strategies on offer."""
    try:
        extra = import_plugins(modules)
        registry = Registry(plugin_manager(load_entrypoints=not no_plugins, disabled=disabled, plugins=extra))
    except BalancerError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, package in sorted(installed_plugins().items()):
        state = "not loaded" if no_plugins or name in disabled else "loaded"
        click.echo(f"plugin {name} ({package}): {state}")
    for kind, named in (
        ("transports", registry.transports),
        ("storages", registry.storages),
        ("replication", registry.replications),
    ):
        click.echo(f"{kind}: {', '.join(sorted(named.factories))}")


async def _fetch_status(
    address: str, timeout: float, token: str | None = None, ca: str | None = None, path: str = "/status"
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    scheme, context = ("https", ssl.create_default_context(cafile=ca)) if ca else ("http", None)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(f"{scheme}://{address}{path}", headers=headers, ssl=context or True) as response,
    ):
        body = await response.read()
        if response.status != 200:
            raise click.ClickException(
                f"{address} answered {response.status}: {body[:200].decode(errors='replace')}"
            )
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise click.ClickException(f"{address} answered something that is not a status")
        return data


@main.command()
@click.argument("address", callback=_address)
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@click.option("--ring", "whole_ring", is_flag=True, help="Every member of the ring, not this node's view.")
@click.option(
    "--api-token",
    envvar="BALANCER_API_TOKEN",
    help="Bearer token, if the node requires one (prefer --api-token-file or BALANCER_API_TOKEN).",
)
@click.option("--api-token-file", type=click.File("r"), help="Read the bearer token from this file.")
@click.option(
    "--tls-ca", type=click.Path(dir_okay=False, exists=True), help="Use https, verifying against this CA."
)
def status(
    address: str,
    timeout: float,
    as_json: bool,
    whole_ring: bool,
    api_token: str | None,
    api_token_file: TextIO | None,
    tls_ca: str | None,
) -> None:
    """Print the view of the node at ADDRESS (HOST:PORT) as a table; with --ring, every member of its
    ring (state, vnodes, weight, records, share of the keys), as the node surveys it now."""
    from balancer.repl import format_members, format_status

    token = _secret("api_token", api_token, api_token_file)
    path = "/ring" if whole_ring else "/status"
    try:
        data = asyncio.run(_fetch_status(address, timeout, token, tls_ca, path))
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot reach {address}: {exc or type(exc).__name__}") from exc
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(format_members(data) if whole_ring else format_status(data))


def _client_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the commands that reach a ring from outside it (cli, get, put, delete)."""
    options = [
        click.option(
            "--api-token",
            envvar="BALANCER_API_TOKEN",
            help="Bearer token, if the ring requires one (prefer --api-token-file or BALANCER_API_TOKEN).",
        ),
        click.option("--api-token-file", type=click.File("r"), help="Read the bearer token from this file."),
        click.option(
            "--tls-ca",
            type=click.Path(dir_okay=False, exists=True),
            help="Use https, verifying the node against this CA.",
        ),
        click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per request."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(address: str, opts: dict[str, Any]) -> RemoteNode:
    token = _secret("api_token", opts["api_token"], opts["api_token_file"])
    return RemoteNode(address, token=token, ca=opts["tls_ca"], timeout=opts["timeout"])


def _one_shot(work: Callable[[], Any]) -> Any:
    """Run one client operation: its error on stderr and exit status 1, never a traceback."""
    try:
        return asyncio.run(work())
    except KeyNotFoundError as exc:
        click.echo(f"not found: {exc.args[0] if exc.args else ''}", err=True)
    except BalancerError as exc:
        click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@main.command(name="cli")
@click.argument("address", callback=_address)
@_client_options
def client_repl(address: str, **opts: Any) -> None:
    """The REPL on the ring of the node at ADDRESS (HOST:PORT), over its HTTP API, without joining:
    get, put, delete, status, ring, help, exit (dump and leave need a member: balancer repl)."""

    async def run() -> None:
        async with _client(address, opts) as ring:
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            pm = plugin_manager(load_entrypoints=False)
            _say(f"connected to {address} as a client (not a ring member); type help for the commands")
            session = pm.hook.balancer_repl(node=ring, pm=pm, stop=stop)
            await session

    _one_shot(run)
    sys.exit(0)


@main.command(name="get")
@click.argument("address", callback=_address)
@click.argument("key")
@_client_options
def get_command(address: str, key: str, **opts: Any) -> None:
    """Print the value of KEY, read through the node at ADDRESS (exit status 1 if it has none)."""

    async def run() -> bytes:
        async with _client(address, opts) as ring:
            return await ring.get(key)

    value: bytes = _one_shot(run)
    sys.stdout.buffer.write(value + (b"\n" if sys.stdout.isatty() else b""))
    sys.stdout.flush()


@main.command(name="put")
@click.argument("address", callback=_address)
@click.argument("key")
@click.argument("value")
@_client_options
def put_command(address: str, key: str, value: str, **opts: Any) -> None:
    """Store VALUE under KEY through the node at ADDRESS; VALUE - reads it from standard input."""
    data = sys.stdin.buffer.read() if value == "-" else value.encode()

    async def run() -> None:
        async with _client(address, opts) as ring:
            await ring.put(key, data)

    _one_shot(run)


@main.command(name="delete")
@click.argument("address", callback=_address)
@click.argument("key")
@_client_options
def delete_command(address: str, key: str, **opts: Any) -> None:
    """Delete KEY through the node at ADDRESS (exit status 1 if it has no value)."""

    async def run() -> None:
        async with _client(address, opts) as ring:
            await ring.delete(key)

    _one_shot(run)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_ready(address: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise click.ClickException(f"the node on {address} exited with status {process.returncode}")
        with contextlib.suppress(click.ClickException, aiohttp.ClientError, OSError, TimeoutError):
            asyncio.run(_fetch_status(address, 0.5))
            return
        time.sleep(0.05)  # polling a child process's port, with a deadline
    raise click.ClickException(f"the node on {address} did not answer in time")


@main.command()
@click.option(
    "--nodes", type=click.IntRange(1, 32), default=3, show_default=True, help="Ring size, this node included."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to use.")
@click.option("--keep-logs", is_flag=True, help="Keep the nodes' log folder when the demo ends.")
@click.option("--no-plugins", is_flag=True, help="Do not load third-party plugins (entry points).")
def demo(nodes: int, host: str, keep_logs: bool, no_plugins: bool) -> None:
    """Start a local ring of separate node processes and open the REPL on one of them.

    Leaving the REPL (exit, leave, Ctrl-D) stops every node, each leaving the ring gracefully. The
    nodes' logs go to a temporary folder, removed at the end unless --keep-logs.
    """
    logs = tempfile.mkdtemp(prefix="balancer-demo-")
    children: list[subprocess.Popen[bytes]] = []
    first = None
    # a majority write quorum and R + W > N, on as many replicas as the ring has nodes (at most 3)
    replicas = min(3, nodes)
    write_quorum = replicas // 2 + 1
    read_quorum = replicas - write_quorum + 1
    quorums = [
        "--replicas",
        str(replicas),
        "--write-quorum",
        str(write_quorum),
        "--read-quorum",
        str(read_quorum),
    ]
    try:
        for _ in range(nodes - 1):
            port = _free_port(host)
            address = f"{host}:{port}"
            where = ["--ring"] if first is None else ["--join", first]
            command = [sys.executable, "-m", "balancer", "-v", "node", "--host", host, "--port", str(port)]
            command += [*where, *quorums, *(["--no-plugins"] if no_plugins else [])]
            with open(os.path.join(logs, f"node-{port}.log"), "wb") as log:
                children.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            _wait_ready(address, children[-1], time.monotonic() + 20)
            first = first or address
            _say(f"started node {address} (pid {children[-1].pid})")
        _say(
            f"node logs are in {logs}"
            + ("" if keep_logs else " (removed at the end; --keep-logs keeps them)")
        )
        config = Config(
            host=host,
            port=_free_port(host),
            replicas=replicas,
            write_quorum=write_quorum,
            read_quorum=read_quorum,
            load_entrypoints=not no_plugins,
        )
        _start(config, [first] if first else [], True)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if children:
            _say(f"stopped {len(children)} node processes")
        if keep_logs:
            _say(f"node logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
