"""Start-up checks against real node processes: an unusable data folder is refused at once with one
line, and seeds that are not up yet are waited for."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import aiohttp
import helpers
import pytest
from processes import Cluster, Proc, free_port, ring_correct, status, until

from balancer.keyspace import hash_key
from balancer.plugins.sqlite_storage import FILENAME
from balancer.types import format_id


async def exit_status(proc: Proc, timeout: float = 60.0) -> int:
    """The process's exit status; fails the test if it is still running after ``timeout`` seconds.

    Polls, so that servers on this test's event loop keep answering the node meanwhile.
    """

    async def exited() -> bool:
        return proc.process.poll() is not None

    await until(exited, timeout=timeout, what=f"the exit of the node on {proc.address}")
    return proc.process.wait()


def error_lines(proc: Proc) -> list[str]:
    """The lines the node printed as its error (click prefixes them with ``Error:``)."""
    return [line for line in proc.output().splitlines() if line.startswith("Error:")]


def unusable(tmp_path: Path, case: str) -> Path:
    """A data folder that cannot be used, of the kind ``case`` names."""
    plain = tmp_path / "plain"
    plain.write_text("a file, not a folder")
    if case == "under a file":
        return plain / "data"
    if case == "database is a folder":
        (tmp_path / "db" / FILENAME).mkdir(parents=True)
        return tmp_path / "db"
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / FILENAME).write_bytes(random.Random(11).randbytes(16384))
    return folder


@pytest.mark.parametrize("case", ["under a file", "database is a folder", "corrupt"])
async def test_an_unusable_data_dir_is_refused_with_one_line(
    cluster: Cluster, tmp_path: Path, case: str
) -> None:
    folder = unusable(tmp_path, case)
    node = cluster.start(extra=("--data-dir", str(folder)))
    assert await exit_status(node) == 1
    output = node.output()
    assert "Traceback" not in output, output
    lines = error_lines(node)
    assert len(lines) == 1, output
    assert lines[0].startswith(f"Error: cannot use {folder}"), output
    assert "created a ring" not in output  # it never served


async def _logged(proc: Proc, text: str) -> bool:
    return text in proc.output()


async def test_joiners_started_before_their_seed_wait_for_it(cluster: Cluster) -> None:
    """The three nodes of docs/security.md's secured cluster, started at once with ``&``, in the worst
    order: both joiners before the seed, one of them through the other."""
    seed_port = free_port()
    seed_address = f"127.0.0.1:{seed_port}"
    second = cluster.start(join=seed_address)
    third = cluster.start(join=second.address)  # a chain: second is not a ring member yet
    for joiner, seed in ((second, seed_address), (third, second.address)):
        line = f"[balancer] waiting for {seed} (2/"
        await until(lambda joiner=joiner, line=line: _logged(joiner, line), what=f"{joiner.address} waiting")  # type: ignore[misc]
    first = cluster.start(port=seed_port)
    addresses = [p.address for p in (first, second, third)]
    async with aiohttp.ClientSession() as http:
        await until(lambda: ring_correct(http, addresses), what="one ring of three")
    assert f"joined via {seed_address}" in second.output()
    assert f"joined via {second.address}" in third.output()
    assert all(p.process.poll() is None for p in (first, second, third))


async def test_a_node_that_may_create_the_ring_does_not_wait(cluster: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = cluster.start(extra=("--join", dead))  # --ring and --join: join if a seed answers, else create
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, node.address), what="the node")
    assert "created a ring" in node.output()
    assert "waiting for" not in node.output()


async def test_a_seed_that_is_not_a_balancer_node_gets_one_line(cluster: Cluster) -> None:
    async with helpers.stranger() as stranger:
        seed = cluster.start()
        async with aiohttp.ClientSession() as http:
            await until(lambda: _up(http, seed.address), what="the seed")
            joiner = cluster.start(join=stranger, extra=("--join", seed.address))
            await until(lambda: _up(http, joiner.address), what="the joiner")
        await until(lambda: _logged(joiner, f"joined via {seed.address}"), what="the join line")
        mentions = [line for line in joiner.output().splitlines() if stranger in line]
        assert len(mentions) == 1, joiner.output()
        assert "is it a balancer node?" in mentions[0]
        assert "<" not in joiner.output()

        alone = cluster.start(join=stranger)
        assert await exit_status(alone) == 1
        output = alone.output()
        size = len(helpers.STRANGER_PAGE.encode())
        assert error_lines(alone) == [
            f"Error: cannot join through {stranger}: HTTP 404 answer is not JSON ({size} bytes); "
            "is it a balancer node?"
        ], output
        for absent in ("<", "Traceback", "waiting for", "WARNING"):
            assert absent not in output


async def test_a_settings_refusal_is_final(cluster: Cluster) -> None:
    seed = cluster.start()
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, seed.address), what="the seed")
    other = cluster.start(join=seed.address, extra=("--replicas", "2"))
    assert await exit_status(other) == 1
    assert "waiting for" not in other.output()
    assert len(error_lines(other)) == 1, other.output()
    assert "settings" in error_lines(other)[0]


async def _up(http: aiohttp.ClientSession, address: str) -> bool:
    return await status(http, address) is not None


def port_with_a_small_id() -> int:
    """A free port whose node id (the hash of ``127.0.0.1:port``) has a leading zero hex digit."""
    for _ in range(1000):
        port = free_port()
        if hash_key(f"127.0.0.1:{port}") < 1 << 60:
            return port
    raise AssertionError("no free port with a small id in 1000 tries")


async def test_the_banner_status_and_status_command_print_the_same_id(cluster: Cluster) -> None:
    port = port_with_a_small_id()
    padded = format_id(hash_key(f"127.0.0.1:{port}"))
    assert padded.startswith("0")
    node = cluster.start(port=port)
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, node.address), what="the node")
        view = await status(http, node.address)
    assert view is not None
    assert view["id"] == padded
    assert f"[balancer] node {node.address} id {padded} created a ring" in node.output()
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balancer", "status", node.address, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        table, _ = await command.communicate()
    assert command.returncode == 0
    assert f"{node.address}  id {padded}" in table.decode()


def command_line(proc: Proc) -> bytes:
    """The process's arguments as ``ps`` shows them to every local user."""
    return Path(f"/proc/{proc.process.pid}/cmdline").read_bytes()


async def test_secrets_from_files_stay_out_of_ps(cluster: Cluster, tmp_path: Path) -> None:
    token = f"token-{random.Random(3).getrandbits(64):016x}"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "secret").write_text("cluster secret\n")
    files = ("--api-token-file", str(tmp_path / "token"), "--cluster-secret-file", str(tmp_path / "secret"))
    node = cluster.start(extra=files)
    typed = cluster.start(extra=("--api-token", token))
    async with aiohttp.ClientSession() as http:
        for proc in (node, typed):
            await until(lambda proc=proc: _answers(http, proc.address, token), what=f"{proc.address}")  # type: ignore[misc]
        async with http.get(f"http://{node.address}/status") as resp:
            assert resp.status == 401  # the token from the file is in force
    cmdline = command_line(node)
    assert token.encode() not in cmdline
    assert b"cluster secret" not in cmdline
    assert "visible to every local user" not in node.output()
    warnings = [line for line in typed.output().splitlines() if "visible to every local user" in line]
    assert warnings == [
        "[balancer] warning: --api-token is visible to every local user in ps; "
        "use --api-token-file or BALANCER_API_TOKEN"
    ]


async def _answers(http: aiohttp.ClientSession, address: str, token: str) -> bool:
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with http.get(f"http://{address}/status", headers=headers) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False
