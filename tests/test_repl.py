"""The REPL: every command and every error path, driven through its input stream."""

from __future__ import annotations

import io
import re

import click
import pluggy
from helpers import SOLO, RingFactory

from balancer.hookspecs import hookimpl
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.repl import OUT, PROMPT, Session, pass_session, run_repl


async def drive(nodes: list[Node], pm: pluggy.PluginManager, script: str) -> list[str]:
    """Run the REPL on nodes[0] over ``script``; returns the answers, one per OUT line."""
    written: list[str] = []
    await run_repl(nodes[0], pm, source=io.StringIO(script), write=written.append)
    text = "".join(written)
    assert text.startswith(PROMPT)
    return [line.removeprefix(OUT) for line in text.replace(PROMPT, "").splitlines() if line.startswith(OUT)]


async def test_every_command(make_ring: RingFactory, pm: pluggy.PluginManager) -> None:
    nodes = await make_ring(3)
    script = "\n".join(
        [
            "put greeting hello   wide world",
            "get greeting",
            "put solo 1",
            "delete solo",
            "get solo",
            "delete solo",
            "dump all",
            "status",
            "ring",
            "neighbours",
            "help",
            "",
            "exit",
            "get never-reached",
        ]
    )
    out = await drive(nodes, pm, script)
    assert out[0] == "stored: hello   wide world"
    assert out[1] == "value: hello   wide world"
    assert out[2:6] == ["stored: 1", "deleted: solo", "not found: solo", "not found: solo"]
    dumps = [line for line in out if re.fullmatch(r"\d+ records here \(\d+ tombstones\)", line)]
    assert len(dumps) == 1
    assert any(line.startswith("predecessor") for line in out)
    assert any("self" in line for line in out)  # neighbours
    assert "3 processes, 96 vnodes, settled" in out  # ring: every member, surveyed
    rows = [line.split() for line in out if line.startswith(tuple(n.address for n in nodes))]
    assert sorted(row[0] for row in rows) == sorted(n.address for n in nodes)
    assert all(row[1:3] == ["up", "32"] and row[-1].endswith("%") for row in rows)
    assert "get KEY: print the value stored under KEY." in out
    assert "never-reached" not in "".join(out)
    assert nodes[0].stopped  # exit leaves the ring
    assert await nodes[1].get("greeting") == b"hello   wide world"


async def test_error_paths_answer_with_usage(make_ring: RingFactory, pm: pluggy.PluginManager) -> None:
    nodes = await make_ring(2, max_value_bytes=4)
    script = "\n".join(
        ["get", "put onlykey", "put", "delete", "dump", "dump some", "frobnicate x", "put k toolong", "leave"]
    )
    out = await drive(nodes, pm, script)
    assert out[:6] == [
        "usage: get KEY",
        "usage: put KEY VALUE",
        "usage: put KEY VALUE",
        "usage: delete KEY",
        "usage: dump all",
        "usage: dump all",
    ]
    assert out[6] == "unknown command: frobnicate (try help)"
    assert out[7].startswith("error: value is 7 bytes")
    assert out[8] == "left the ring"
    assert nodes[0].stopped


async def test_end_of_input_leaves_gracefully(make_ring: RingFactory, pm: pluggy.PluginManager) -> None:
    nodes = await make_ring(3)
    await nodes[0].put("kept", b"yes")
    await drive(nodes, pm, "get kept\n")
    assert nodes[0].stopped
    assert await nodes[1].get("kept") == b"yes"


async def test_a_plugin_adds_a_repl_command(make_ring: RingFactory) -> None:
    class Count:
        @hookimpl
        def balancer_repl_commands(self, cli: click.Group) -> None:
            @cli.command()
            @click.argument("prefix")
            @pass_session
            async def count(session: Session, prefix: str) -> None:
                """count PREFIX: how many local keys start with PREFIX."""
                records = await session.node.local_records()
                session.say(f"count: {sum(r.key.startswith(prefix.encode()) for r in records)}")

            @cli.command()
            def boom() -> None:
                """boom: a broken command."""
                raise RuntimeError("kaput")

    pm = plugin_manager(load_entrypoints=False, plugins=[Count()])
    (node,) = await make_ring(1, **SOLO)
    await node.put("a1", b"x")
    await node.put("a2", b"x")
    await node.put("b1", b"x")
    out = await drive([node], pm, "count a\nboom\ncount\nhelp\n")
    assert out[0] == "count: 2"
    assert out[1] == "error: RuntimeError: kaput"
    assert out[2] == "usage: count PREFIX"
    assert "count PREFIX: how many local keys start with PREFIX." in out
