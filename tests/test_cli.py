"""The command line through click's CliRunner: help, usage errors, unreachable peers."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from balancer.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("node", "repl", "status", "demo"):
        assert command in result.output
    node_help = CliRunner().invoke(main, ["node", "--help"]).output
    for flag in ("--port", "--address", "--ring", "--join", "--cli"):
        assert flag in node_help


def test_node_needs_ring_or_join() -> None:
    neither = CliRunner().invoke(main, ["node", "--port", "0"])
    assert neither.exit_code == 2
    assert "give --ring (create a ring) or --join HOST:PORT" in neither.output


def test_bad_addresses_are_usage_errors() -> None:
    for bad in ("nonsense", "host:", ":80", "host:99999", "host:port"):
        result = CliRunner().invoke(main, ["node", "--join", bad])
        assert result.exit_code == 2, bad
        assert "expected HOST:PORT" in result.output
    assert CliRunner().invoke(main, ["status", "nope"]).exit_code == 2


def test_bad_settings_are_usage_errors() -> None:
    result = CliRunner().invoke(main, ["node", "--ring", "--rpc-timeout", "-1"])
    assert result.exit_code == 2
    assert "'--rpc-timeout': -1.0 is not in the range x>0" in result.output
    inconsistent = CliRunner().invoke(main, ["node", "--ring", "--replicas", "3", "--write-quorum", "4"])
    assert inconsistent.exit_code == 2
    assert "write_quorum must be in [1, replicas=3]" in inconsistent.output
    unknown = CliRunner().invoke(main, ["node", "--ring", "--storage", "cassandra", "--no-plugins"])
    assert unknown.exit_code == 2
    assert "no storage named 'cassandra'; available: memory, sqlite" in unknown.output
    strategy = CliRunner().invoke(main, ["node", "--ring", "--replication", "rack", "--no-plugins"])
    assert strategy.exit_code == 2
    assert "no replication strategy named 'rack'; available: groups, multi-ring, successor" in strategy.output
    setting = CliRunner().invoke(
        main, ["node", "--ring", "--replication", "groups", "--set", "groups.size=x", "--no-plugins"]
    )
    assert setting.exit_code == 2
    assert "groups.size must be a whole number, got 'x'" in setting.output
    malformed = CliRunner().invoke(main, ["node", "--ring", "--set", "size=4"])
    assert malformed.exit_code == 2
    assert "'size=4' is not PLUGIN.KEY=VALUE" in malformed.output


def test_unreachable_peers_are_clean_errors() -> None:
    port = free_port()
    status = CliRunner().invoke(main, ["status", f"127.0.0.1:{port}", "--timeout", "1"])
    assert status.exit_code == 1
    assert f"cannot reach 127.0.0.1:{port}" in status.output
    once = ["--join-timeout", "0", "--no-plugins"]  # one pass: no waiting for seeds to come up
    join = CliRunner().invoke(main, ["node", "--join", f"127.0.0.1:{port}", *once])
    assert join.exit_code == 1
    assert f"Error: 127.0.0.1:{port}" in join.output
    assert "Traceback" not in join.output
    seeds = CliRunner().invoke(
        main, ["node", "--join", f"127.0.0.1:{port}", "--join", f"127.0.0.1:{port + 1}", *once]
    )
    assert seeds.exit_code == 1
    assert "no seed answered" in seeds.output


def test_joining_the_own_address_is_a_usage_error() -> None:
    port = free_port()
    for own in ([f"127.0.0.1:{port}"], ["127.0.0.1:1", f"127.0.0.1:{port}"]):
        args = ["node", "--port", str(port), *(a for seed in own for a in ("--join", seed))]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert f"--join 127.0.0.1:{port} is this node's own address" in result.output
    advertised = CliRunner().invoke(
        main, ["node", "--address", "127.0.0.2", "--port", "9", "--join", "127.0.0.2:9"]
    )
    assert advertised.exit_code == 2
    assert "own address" in advertised.output


def test_fsync_needs_a_data_dir() -> None:
    result = CliRunner().invoke(main, ["node", "--ring", "--fsync"])
    assert result.exit_code == 2
    assert "--fsync syncs the database to disk: it needs --data-dir" in result.output


WARNING = "is visible to every local user in ps"


def test_a_secret_typed_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    dead = ["--join", f"127.0.0.1:{free_port()}", "--join-timeout", "0", "--no-plugins"]
    typed = CliRunner().invoke(main, ["node", "--cluster-secret", "s3", "--api-token", "t0", *dead])
    assert typed.exit_code == 1  # the seed is down; the warnings came first
    lines = [line for line in typed.stderr.splitlines() if WARNING in line]
    assert lines == [
        "[balancer] warning: --cluster-secret is visible to every local user in ps; "
        "use --cluster-secret-file or BALANCER_CLUSTER_SECRET",
        "[balancer] warning: --api-token is visible to every local user in ps; "
        "use --api-token-file or BALANCER_API_TOKEN",
    ]
    assert "s3" not in typed.output

    environment = CliRunner(env={"BALANCER_CLUSTER_SECRET": "s3", "BALANCER_API_TOKEN": "t0"})
    quiet = environment.invoke(main, ["node", *dead])
    assert quiet.exit_code == 1
    assert WARNING not in quiet.output

    secret, token = tmp_path / "secret", tmp_path / "token"
    secret.write_text("s3\n")
    token.write_text("t0\n")
    files = CliRunner().invoke(
        main, ["node", "--cluster-secret-file", str(secret), "--api-token-file", str(token), *dead]
    )
    assert files.exit_code == 1
    assert WARNING not in files.output

    status = CliRunner().invoke(main, ["status", dead[1], "--api-token", "t0", "--timeout", "1"])
    assert status.exit_code == 1
    assert "warning: --api-token is visible" in status.stderr


def test_secret_files_must_hold_a_secret_and_come_alone(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for option in ("--cluster-secret-file", "--api-token-file"):
        result = CliRunner().invoke(main, ["node", "--ring", option, str(empty)])
        assert result.exit_code == 2
        assert f"{option} {empty} is empty" in result.output
    both = CliRunner().invoke(main, ["node", "--ring", "--api-token", "t", "--api-token-file", str(empty)])
    assert both.exit_code == 2
    assert "give --api-token or --api-token-file, not both" in both.output


def test_the_log_goes_to_a_file_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    dead = ["--join", f"127.0.0.1:{free_port()}", "--join-timeout", "0", "--no-plugins"]
    command = [sys.executable, "-m", "balancer", "-vv", "--log-file", str(log), "node", *dead]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "DEBUG balancer.node" in log.read_text()  # the seed that refused, at debug level
    assert "DEBUG" not in done.stderr + done.stdout
