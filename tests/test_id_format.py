"""Node ids print the same everywhere: zero-padded hex of ceil(bits / 4) digits."""

from __future__ import annotations

import logging

import pluggy
import pytest
from helpers import QUIET, SOLO, converge

from balancer.config import Config
from balancer.node import Node
from balancer.plugins.local_transport import LocalNetwork, LocalTransport
from balancer.repl import format_ring, format_status
from balancer.types import NodeInfo, format_id


def test_format_id_pads_to_the_width_of_the_id_space() -> None:
    assert format_id(0xABC) == "0000000000000abc"
    assert format_id(0) == "0" * 16
    assert format_id((1 << 64) - 1) == "f" * 16
    assert format_id(5, bits=8) == "05"
    assert format_id(1, bits=10) == "001"  # 10 bits take 3 hex digits
    assert format_id(1 << 159, bits=160) == "8" + "0" * 39
    assert str(NodeInfo(0xABC, "127.0.0.1:1")) == "127.0.0.1:1 (0000000000000abc)"


async def test_a_small_id_prints_padded_in_every_view(
    network: LocalNetwork, pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(transport="local", load_entrypoints=False, vnodes=1).evolve(**QUIET, **SOLO)
    padded = "0000000000000abc"
    caplog.set_level(logging.INFO, logger="balancer.node")
    first = Node(config.evolve(node_id=0xABC), pm=pm, transport=LocalTransport(network))
    async with (
        first,
        Node(
            config.evolve(node_id=0x1F), join=first.address, pm=pm, transport=LocalTransport(network)
        ) as second,
    ):
        await converge([first, second])
        status = await first.status()
        assert status["id"] == padded
        assert status["fingers"] == [{"id": "000000000000001f", "address": second.address}]
        assert f"id {padded}" in format_status(status)  # the REPL's status and `balancer status`
        assert format_ring(first).startswith(f"{padded}  {first.address}")
        assert str(first.info).endswith(f"({padded})")
        assert any(padded in message for message in caplog.messages)  # "... created a ring"
    wide = Node(config.evolve(bits=80, node_id=0xABC), pm=pm, transport=LocalTransport(network))
    async with wide:
        assert (await wide.status())["id"] == "00000000000000000abc"  # 80 bits: 20 digits


def test_format_status_pads_an_unpadded_id_from_an_older_node() -> None:
    old = {"id": "abc", "address": "127.0.0.1:1", "settings": {"bits": 64}, "records": 0}
    assert "id 0000000000000abc" in format_status(old)
    assert "id nonsense" in format_status({**old, "id": "nonsense"})
