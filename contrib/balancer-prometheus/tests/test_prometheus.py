"""balancer-prometheus: the exposition text, real nodes scraped over HTTP, and discovery by entry point.

Run from the repository root (its pytest settings apply: asyncio_mode=auto, warnings are errors) after
``pip install -e contrib/balancer-prometheus``.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import aiohttp
import balancer_prometheus
import prometheus_client
import pytest
from balancer_prometheus import CONTENT_TYPE, DEFAULT_BUCKETS, OPERATIONS, OUTCOMES, PrometheusExporter

from balancer.config import Config
from balancer.errors import KeyNotFoundError
from balancer.node import Node
from balancer.plugin import ENTRY_POINT_GROUP, plugin_manager
from balancer.types import NodeInfo, RingView, format_id

SOLO = Config(load_entrypoints=False, replicas=1, write_quorum=1, read_quorum=1)
"""A ring of one node can only acknowledge writes on one replica."""

FAMILIES = {
    "balancer_node_info",
    "balancer_kv_operations_total",
    "balancer_kv_operation_duration_seconds",
    "balancer_records",
    "balancer_ring_members",
    "balancer_successor_list_length",
    "balancer_ring_events_total",
    "balancer_records_handed_off_total",
}
"""Every metric family a node exports, and nothing else."""

# -- a strict reader of the text format, so the tests check the exporter against the format itself --

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass
class Family:
    """One metric family as read back: its type, help text and samples."""

    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match, f"malformed labels at {text[position:]!r}"
        assert match.group(1) not in labels, f"label {match.group(1)} repeated"
        labels[match.group(1)] = _unescape(match.group(2))
        position = match.end()
    return labels


def parse(text: str) -> dict[str, Family]:
    """Every family in ``text``; asserts HELP and TYPE come first and each sample belongs to a family."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert name not in helps, f"HELP of {name} twice"
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert kind in _SUFFIXES, f"unknown type {kind!r}"
            assert name in helps, f"TYPE of {name} before its HELP"
            assert name not in families, f"TYPE of {name} twice"
            families[name] = Family(kind, helps[name])
        else:
            match = _SAMPLE.match(line)
            assert match, f"malformed sample line {line!r}"
            name, labels, value = match.group(1), _labels(match.group(2) or ""), float(match.group(3))
            owners = [
                (base, fam)
                for base, fam in families.items()
                for suffix in _SUFFIXES[fam.kind]
                if name == base + suffix
            ]
            assert len(owners) == 1, f"sample {name} belongs to no declared family"
            base, family = owners[0]
            if family.kind == "counter":
                assert base.endswith("_total")
                assert value >= 0
            family.samples.append((name[len(base) :], labels, value))
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for suffix, have, v in families[name].samples if not suffix and labels.items() <= have.items()]
    assert len(found) == 1, f"{len(found)} samples of {name} match {labels}"
    return found[0]


def check_histogram(family: Family, bounds: tuple[float, ...]) -> dict[tuple[tuple[str, str], ...], int]:
    """Assert that every series of ``family`` is a well-formed histogram; returns each series' count."""
    assert family.kind == "histogram"
    series: dict[tuple[tuple[str, str], ...], dict[str, list[tuple[str, float]]]] = {}
    for suffix, sample_labels, number in family.samples:
        labels = dict(sample_labels)
        le = labels.pop("le", None)
        assert (le is not None) == (suffix == "_bucket")
        series.setdefault(tuple(sorted(labels.items())), {}).setdefault(suffix, []).append((le or "", number))
    counts = {}
    for key, parts in series.items():
        buckets = parts["_bucket"]
        assert [float(le) for le, _ in buckets] == [*bounds, math.inf], "bucket bounds out of order"
        assert buckets[-1][0] == "+Inf"
        cumulative = [n for _, n in buckets]
        assert cumulative == sorted(cumulative), f"buckets of {key} are not cumulative"
        ((_, count),) = parts["_count"]
        ((_, total),) = parts["_sum"]
        assert cumulative[-1] == count, "the +Inf bucket must equal _count"
        assert total >= 0
        assert (total > 0) == (count > 0)
        counts[key] = int(count)
    return counts


# -- helpers -------------------------------------------------------------------------------------


async def scrape(http: aiohttp.ClientSession, node: Node) -> dict[str, Family]:
    """GET the node's /metrics and parse it."""
    async with http.get(f"http://{node.address}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        text = await response.text()
    families = parse(text)
    for family in families.values():
        for _, labels, _ in family.samples:
            assert labels["node"] == node.address, "a sample of another node"
    return families


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll ``check`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{check.__name__} did not hold within {timeout} s"
        await asyncio.sleep(0.05)


# -- the text, from hooks called directly --------------------------------------------------------


def test_the_exposition_counts_every_hook_per_node() -> None:
    exporter = PrometheusExporter(buckets=(0.01, 0.1))
    me, other = NodeInfo(0xAB, "10.0.0.1:9001"), NodeInfo(0xCD, "10.0.0.2:9001")
    third = NodeInfo(0xEF, "10.0.0.3:9001")
    exporter.balancer_kv_operation(node=me, operation="get", seconds=0.005, outcome="ok")
    exporter.balancer_kv_operation(node=me, operation="get", seconds=0.01, outcome="not_found")
    exporter.balancer_kv_operation(node=me, operation="get", seconds=3.0, outcome="ok")
    exporter.balancer_kv_operation(node=other, operation="put", seconds=0.5, outcome="ok")
    exporter.balancer_node_joined(node=me, peer=other)
    exporter.balancer_node_joined(node=me, peer=third)
    exporter.balancer_node_left(node=me, peer=third)
    exporter.balancer_node_failed(node=me, peer=other)
    exporter.balancer_range_moved(node=me, target=other, records=7)
    exporter.balancer_range_moved(node=me, target=third, records=7)
    view = RingView(me, predecessor=third, successors=(other, third), fingers=(other,))

    text = exporter.render(view, records=12)
    families = parse(text)
    assert value(families, "balancer_node_info", id="00000000000000ab") == 1
    assert value(families, "balancer_kv_operations_total", operation="get", outcome="ok") == 2
    assert value(families, "balancer_kv_operations_total", operation="get", outcome="not_found") == 1
    assert value(families, "balancer_kv_operations_total", operation="put", outcome="ok") == 0  # other's
    assert value(families, "balancer_records") == 12
    assert value(families, "balancer_ring_members") == 3
    assert value(families, "balancer_successor_list_length") == 2
    assert value(families, "balancer_ring_events_total", event="joined") == 2
    assert value(families, "balancer_ring_events_total", event="left") == 1
    assert value(families, "balancer_ring_events_total", event="failed") == 1
    assert value(families, "balancer_records_handed_off_total") == 14
    counts = check_histogram(families["balancer_kv_operation_duration_seconds"], (0.01, 0.1))
    assert counts[(("node", me.address), ("operation", "get"))] == 3
    assert counts[(("node", me.address), ("operation", "delete"))] == 0
    # le is inclusive: 0.005 and 0.01 fall in the 0.01 bucket, 3.0 only in +Inf
    samples = families["balancer_kv_operation_duration_seconds"].samples
    get = {"node": "10.0.0.1:9001", "operation": "get"}
    assert ("_bucket", {**get, "le": "0.01"}, 2) in samples
    assert ("_bucket", {**get, "le": "+Inf"}, 3) in samples
    assert ("_sum", get, 3.015) in samples
    # the eight families, only this node's samples, and no OpenMetrics _created series
    assert set(families) == FAMILIES
    assert {labels["node"] for family in families.values() for _, labels, _ in family.samples} == {me.address}

    theirs = parse(exporter.render(RingView(other, None, (other,), ()), records=0))
    assert value(theirs, "balancer_kv_operations_total", operation="put", outcome="ok") == 1
    assert value(theirs, "balancer_ring_events_total", event="joined") == 0
    assert value(theirs, "balancer_ring_members") == 1


def test_each_exporter_counts_in_a_registry_of_its_own() -> None:
    first, second = PrometheusExporter(), PrometheusExporter()
    me = NodeInfo(0xAB, "10.0.0.1:9001")
    first.balancer_kv_operation(node=me, operation="put", seconds=0.001, outcome="ok")
    first.balancer_kv_operation(node=me, operation="put", seconds=0.001, outcome="ok")
    second.balancer_kv_operation(node=me, operation="put", seconds=0.001, outcome="ok")
    series = ("balancer_kv_operations_total", {"node": me.address, "operation": "put", "outcome": "ok"})
    assert first.registry.get_sample_value(*series) == 2
    assert second.registry.get_sample_value(*series) == 1
    assert prometheus_client.REGISTRY.get_sample_value(*series) is None
    view = RingView(me, None, (me,), ())
    assert value(parse(first.render(view, records=0)), series[0], **series[1]) == 2
    assert value(parse(second.render(view, records=0)), series[0], **series[1]) == 1


def test_label_values_are_escaped() -> None:
    odd = NodeInfo(1, 'a"b\\c\nd:1')
    families = parse(PrometheusExporter().render(RingView(odd, None, (odd,), ()), records=0))
    assert value(families, "balancer_records", node=odd.address) == 0


@pytest.mark.parametrize("buckets", [(), (0.1, 0.1), (1.0, 0.5), (0.0, 1.0), (1.0, math.inf)])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        PrometheusExporter(buckets=buckets)


# -- real nodes, scraped over HTTP ---------------------------------------------------------------


async def test_a_node_serves_its_metrics() -> None:
    pm = plugin_manager(load_entrypoints=False, plugins=[PrometheusExporter()])
    node = Node(SOLO, pm=pm)
    try:
        await node.start()
        await node.put("a", b"1")
        await node.put("b", b"2")
        await node.put("a", b"3")
        assert await node.get("a") == b"3"
        assert await node.get("b") == b"2"
        with pytest.raises(KeyNotFoundError):
            await node.get("missing")
        async with aiohttp.ClientSession() as http:
            families = await scrape(http, node)
            again = await scrape(http, node)
    finally:
        await node.close()

    expected = {(operation, outcome): 0 for operation in OPERATIONS for outcome in OUTCOMES}
    expected |= {("get", "ok"): 2, ("get", "not_found"): 1, ("put", "ok"): 3}
    for (operation, outcome), count in expected.items():
        got = value(families, "balancer_kv_operations_total", operation=operation, outcome=outcome)
        assert got == count, (operation, outcome)
    counts = check_histogram(families["balancer_kv_operation_duration_seconds"], DEFAULT_BUCKETS)
    assert counts == {
        (("node", node.address), ("operation", "get")): 3,
        (("node", node.address), ("operation", "put")): 3,
        (("node", node.address), ("operation", "delete")): 0,
    }
    assert value(families, "balancer_node_info", id=format_id(node.info.id)) == 1
    assert value(families, "balancer_records") == 2
    assert value(families, "balancer_ring_members") == 1
    assert value(families, "balancer_successor_list_length") == 0
    for event in ("joined", "left", "failed"):
        assert value(families, "balancer_ring_events_total", event=event) == 0
    assert value(families, "balancer_records_handed_off_total") == 0
    # scraping is no client operation: it counts nothing
    assert again == families


async def test_a_ring_of_three_keeps_each_nodes_metrics_apart() -> None:
    exporter = PrometheusExporter()
    pm = plugin_manager(load_entrypoints=False, plugins=[exporter])
    config = Config(load_entrypoints=False)
    nodes: list[Node] = []
    try:
        for _ in range(3):
            node = Node(config, join=nodes[0].address if nodes else None, pm=pm)
            await node.start()
            nodes.append(node)
        first, second, third = nodes

        async def ring_formed() -> bool:
            """Every node lists the three, and names both others among its successors (the metric)."""

            def others(n: Node) -> set[str]:
                return {s.address for s in n.view().successors} - {n.address}

            return all(len(n.members()) == 3 and len(others(n)) == 2 for n in nodes)

        await eventually(ring_formed)
        keys = 20
        for i in range(keys):
            await second.put(f"k{i}", b"v")
        assert await third.get("k0") == b"v"

        async def every_replica_written() -> bool:
            return [await n.storage.count() for n in nodes] == [keys] * 3

        await eventually(every_replica_written)
        async with aiohttp.ClientSession() as http:
            scraped = [await scrape(http, n) for n in nodes]
            for node, families, later in zip(nodes, scraped, (2, 1, 0), strict=True):
                assert value(families, "balancer_records") == keys
                assert value(families, "balancer_ring_members") == 3
                assert value(families, "balancer_successor_list_length") == 2
                # once per process that joined after this one, or became a neighbour later (not per vnode)
                assert later <= value(families, "balancer_ring_events_total", event="joined") <= 2
                assert value(families, "balancer_ring_events_total", event="failed") == 0
                puts = keys if node is second else 0
                gets = 1 if node is third else 0
                assert value(families, "balancer_kv_operations_total", operation="put", outcome="ok") == puts
                assert value(families, "balancer_kv_operations_total", operation="get", outcome="ok") == gets
                check_histogram(families["balancer_kv_operation_duration_seconds"], DEFAULT_BUCKETS)

            # a graceful leave: the leaver hands its records to both heirs, both neighbours count a leave
            # (counted across the leave alone: on a busy machine a maintenance pass may have moved some
            # records while the ring was forming)
            before = value(
                parse(exporter.render(third.view(), records=0)), "balancer_records_handed_off_total"
            )
            await third.leave()
            for node in (first, second):
                assert value(await scrape(http, node), "balancer_ring_events_total", event="left") == 1
            # it no longer serves /metrics, but the exporter still holds its counts
            leaver = parse(exporter.render(third.view(), records=0))
            assert value(leaver, "balancer_records_handed_off_total") - before == 2 * keys

            # a crash: the survivor stops trusting the dead node and counts a failure
            await second.close()

            async def failure_seen() -> bool:
                families = await scrape(http, first)
                return value(families, "balancer_ring_events_total", event="failed") >= 1

            await eventually(failure_seen)

            async def alone() -> bool:
                return value(await scrape(http, first), "balancer_ring_members") == 1

            await eventually(alone)
    finally:
        for node in nodes:
            await node.close()


async def test_a_second_exporter_does_not_clash_with_the_first(caplog: pytest.LogCaptureFixture) -> None:
    first, second = PrometheusExporter(), PrometheusExporter()
    pm = plugin_manager(load_entrypoints=False, plugins=[first, second])
    async with Node(SOLO, pm=pm) as node, aiohttp.ClientSession() as http:
        await node.put("k", b"v")
        families = await scrape(http, node)
    assert [route.path for route in node.routes()].count("/metrics") == 1  # beside the ring page, /ui
    assert "already serves /metrics" in caplog.text
    assert value(families, "balancer_kv_operations_total", operation="put", outcome="ok") == 1


# -- discovery through the entry point -----------------------------------------------------------


async def test_the_installed_package_is_found_through_its_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names.get("prometheus") == "balancer_prometheus", (
        "not installed: pip install -e contrib/balancer-prometheus"
    )
    pm = plugin_manager(load_entrypoints=True)
    assert pm.get_plugin("prometheus") is balancer_prometheus
    # the node uses the plugin manager it is given; Config.load_entrypoints only matters without one
    async with Node(SOLO, pm=pm) as node, aiohttp.ClientSession() as http:
        await node.put("k", b"v")
        families = await scrape(http, node)
    assert value(families, "balancer_kv_operations_total", operation="put", outcome="ok") == 1
