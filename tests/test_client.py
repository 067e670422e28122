"""Reaching a ring from outside it: the HTTP client, the client REPL and the one-shot commands."""

from __future__ import annotations

import asyncio
import io
import sys

import pytest
from helpers import http_ring

from balancer.client import RemoteNode
from balancer.errors import KeyNotFoundError, NotMemberError, PeerUnreachableError, QuorumError
from balancer.hookspecs import RingMember
from balancer.plugin import plugin_manager
from balancer.repl import OUT, PROMPT, run_repl

THREE = {"replicas": 3, "write_quorum": 2, "read_quorum": 2}


async def test_a_client_reads_and_writes_through_any_node_without_joining() -> None:
    async with http_ring(3, **THREE) as nodes, RemoteNode(nodes[0].address) as ring:
        assert isinstance(ring, RingMember)
        await ring.put("a key/with?odd chars", b"\x00binary\xff")
        async with RemoteNode(nodes[2].address) as other:
            assert await other.get("a key/with?odd chars") == b"\x00binary\xff"
            assert other.settings["write_quorum"] == 2
        await ring.delete("a key/with?odd chars")
        with pytest.raises(KeyNotFoundError):
            await ring.get("a key/with?odd chars")
        with pytest.raises(NotMemberError):
            await ring.local_records()
        assert {m.address for m in nodes} == {m["address"] for m in (await ring.ring_view())["members"]}
        assert all(n.members() and len(n.members()) == 3 for n in nodes)  # nobody joined


async def test_a_failed_write_says_how_far_it_got() -> None:
    async with http_ring(1, **THREE) as nodes, RemoteNode(nodes[0].address) as ring:
        with pytest.raises(QuorumError) as info:
            await ring.put("k", b"v")
        # no other replica stored it, and this node's copy alone could not make the quorum: kept nowhere
        assert (info.value.operation, info.value.answered, info.value.needed) == ("write", 0, 2)
        assert await nodes[0].storage.get(b"k") is None


async def test_an_unreachable_node_is_a_typed_error(stranger_address: str) -> None:
    with pytest.raises(PeerUnreachableError):
        await RemoteNode("127.0.0.1:1").open()


async def drive(ring: RemoteNode, script: str) -> list[str]:
    written: list[str] = []
    await run_repl(
        ring, plugin_manager(load_entrypoints=False), source=io.StringIO(script), write=written.append
    )
    text = "".join(written).replace(PROMPT, "")
    return [line.removeprefix(OUT) for line in text.splitlines() if line.startswith(OUT)]


async def test_the_client_repl_quotes_helps_and_refuses_what_needs_a_member() -> None:
    async with http_ring(3, **THREE) as nodes, RemoteNode(nodes[1].address) as ring:
        script = [
            'put "my key" "a  value"',
            'get "my key"',
            "put plain it's the rest  of the line",
            "get plain",
            'put "quoted key" unquoted value',
            'get "quoted key"',
            "help get",
            "help nonesuch",
            "dump all",
            "leave",
            "quit",
            "get never-reached",
        ]
        out = await drive(ring, "\n".join(script))
        assert not ring.member
    assert out[:6] == [
        "stored: a  value",
        "value: a  value",
        "stored: it's the rest  of the line",
        "value: it's the rest  of the line",
        "stored: unquoted value",
        "value: unquoted value",
    ]
    assert out[6:9] == [
        "usage: get KEY",
        "print the value stored under KEY.",
        "unknown command: nonesuch (try help)",
    ]
    assert out[9].startswith("error: a client stores no records")
    assert out[10] == "this client is not a ring member: nothing to leave (exit closes it)"
    assert not any("never-reached" in line for line in out)


async def test_the_repl_warns_once_when_the_ring_is_too_small_and_says_a_write_was_not_acknowledged() -> None:
    async with http_ring(1, **THREE) as nodes, RemoteNode(nodes[0].address) as ring:
        out = await drive(ring, "put k v\nput k v\n")
    assert out == [
        "the ring has 1 member and a write needs 2: writes will fail until more nodes join",
        # its copy alone cannot make the quorum, so no copy is kept: nothing may appear later
        "error: write quorum not reached: 0 of 2 replicas answered",
        "error: write quorum not reached: 0 of 2 replicas answered",
    ]


async def run_cli(*args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "balancer",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, out, err


async def test_one_shot_commands_for_scripts() -> None:
    async with http_ring(3, **THREE) as nodes:
        first, second = nodes[0].address, nodes[1].address
        assert await run_cli("put", first, "greeting", "hello world") == (0, b"", b"")
        assert await run_cli("get", second, "greeting") == (0, b"hello world", b"")
        assert await run_cli("put", first, "blob", "-", stdin=b"\x00\x01 from stdin\n") == (0, b"", b"")
        assert await run_cli("get", second, "blob") == (0, b"\x00\x01 from stdin\n", b"")
        assert await run_cli("delete", second, "blob") == (0, b"", b"")
        assert await run_cli("get", first, "blob") == (1, b"", b"not found: blob\n")
        assert await run_cli("delete", first, "blob") == (1, b"", b"not found: blob\n")
    code, out, err = await run_cli("get", "127.0.0.1:1", "greeting")
    assert (code, out) == (1, b"")
    assert err.decode().startswith("error: 127.0.0.1:1: cannot connect: connection refused")
    assert b"Traceback" not in err
