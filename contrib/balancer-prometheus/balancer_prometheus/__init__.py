"""Prometheus metrics for balancer: every node serves ``GET /metrics`` in Prometheus' text format.

Installed, the package registers itself through the ``balancer`` entry-point group, so every node started
with entry points loaded (the CLI's default) serves its own metrics. In Python, register an exporter
explicitly::

    from balancer.plugin import plugin_manager
    from balancer_prometheus import PrometheusExporter

    pm = plugin_manager(plugins=[PrometheusExporter()])
    async with Node(config, pm=pm) as node:
        ...                                  # GET http://<node.address>/metrics

The counts live in counters and a histogram of ``prometheus_client``, Prometheus' Python client, in a
:class:`~prometheus_client.CollectorRegistry` of the exporter's own (never the client's global default
registry, so two exporters in one process never collide), and the body is what
:func:`prometheus_client.generate_latest` writes.

Several nodes may share one plugin manager (and so one exporter) in one process: every series carries a
``node`` label, the node's address, which keeps the counts of each node apart, and a node's ``/metrics``
shows its own series only.

pluggy calls hooks synchronously: the event hooks only add to in-memory counts, and the ring state and
record count are read when ``/metrics`` is scraped (by a collector made for that one scrape).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from balancer.errors import RingError
from balancer.hookspecs import Route, hookimpl
from balancer.types import NodeInfo, RingView, format_id

if TYPE_CHECKING:
    from balancer.node import Node

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "EXPORTER",
    "METRICS_PATH",
    "NODE_LABEL",
    "OPERATIONS",
    "OUTCOMES",
    "RING_EVENTS",
    "NodeMetrics",
    "PrometheusExporter",
    "balancer_http_routes",
    "balancer_kv_operation",
    "balancer_node_failed",
    "balancer_node_joined",
    "balancer_node_left",
    "balancer_range_moved",
]

__version__ = "0.1.0"

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The content type of the body: the text format 0.0.4, which every Prometheus server reads. The body
:func:`~prometheus_client.generate_latest` writes is that format, as every metric name here is a classic
one; ``CONTENT_TYPE_LATEST`` (version 1.0.0) would turn away older scrapers for no gain."""

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the latency histogram's buckets: from 100 µs, where an operation a node
answers from its own memory lands, to 10 s, several RPC timeouts (1 s by default) on a troubled ring."""

OPERATIONS = ("get", "put", "delete")
"""The client operations ``balancer_kv_operation`` reports; each is exported from zero on."""

OUTCOMES = ("ok", "not_found", "quorum", "refused", "invalid", "error")
"""The outcomes ``balancer_kv_operation`` reports; each operation's count of each is exported from zero."""

RING_EVENTS = ("joined", "left", "failed")
"""The ring events counted, by the name of their hook (``balancer_node_<event>``)."""

METRICS_PATH = "/metrics"
"""Where every node serves its metrics."""

NODE_LABEL = "node"
"""The label every series carries: the address of the node it belongs to."""


@dataclass(frozen=True, slots=True)
class _Families:
    """The metric families the hooks count into, registered in one exporter's registry."""

    operations: Counter
    latency: Histogram
    events: Counter
    handed_off: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry, buckets: tuple[float, ...]) -> _Families:
        return cls(
            operations=Counter(
                "balancer_kv_operations_total",
                "Client key-value operations this node coordinated, by operation and outcome (ok, "
                "not_found, quorum, refused, invalid, error).",
                (NODE_LABEL, "operation", "outcome"),
                registry=registry,
            ),
            latency=Histogram(
                "balancer_kv_operation_duration_seconds",
                "Seconds a client key-value operation took on this node, whatever its outcome.",
                (NODE_LABEL, "operation"),
                registry=registry,
                buckets=buckets,
            ),
            events=Counter(
                "balancer_ring_events_total",
                "Ring events this node observed: a neighbour joined, left gracefully, or failed.",
                (NODE_LABEL, "event"),
                registry=registry,
            ),
            handed_off=Counter(
                "balancer_records_handed_off_total",
                "Records this node handed to other nodes that confirmed them, summed over targets.",
                (NODE_LABEL,),
                registry=registry,
            ),
        )


class NodeMetrics:
    """One node's series in its exporter's registry, the ones the hooks add to.

    Every series is labelled with the node's address and created, at zero, when the exporter first hears
    of the node, so that ``rate()`` works from the first scrape; counts only ever grow. The children are
    looked up once, here, so that a hook costs a dictionary look-up and an increment.
    """

    __slots__ = ("_families", "address", "events", "handed_off", "latency", "operations")

    def __init__(self, families: _Families, address: str) -> None:
        self._families = families
        self.address = address
        """The node's address, the value of its ``node`` label."""
        self.operations: dict[tuple[str, str], Counter] = {}
        """Client operations by ``(operation, outcome)``."""
        self.latency: dict[str, Histogram] = {}
        """Seconds each client operation took, by operation."""
        self.events: dict[str, Counter] = {
            event: families.events.labels(address, event) for event in RING_EVENTS
        }
        """Ring events by kind (``joined``, ``left``, ``failed``)."""
        self.handed_off: Counter = families.handed_off.labels(address)
        """Records handed to other nodes, summed over targets (a record pushed to two heirs counts twice)."""
        for operation in OPERATIONS:
            self._latency(operation)

    def _latency(self, operation: str) -> Histogram:
        """The histogram of ``operation``, its series (and every outcome's count) created the first time."""
        found = self.latency.get(operation)
        if found is None:
            for outcome in OUTCOMES:
                self.operations[(operation, outcome)] = self._families.operations.labels(
                    self.address, operation, outcome
                )
            found = self.latency[operation] = self._families.latency.labels(self.address, operation)
        return found

    def observe(self, operation: str, seconds: float, outcome: str) -> None:
        """Count one client operation that took ``seconds`` and ended with ``outcome``."""
        self._latency(operation).observe(seconds)
        self.operations[(operation, outcome if outcome in OUTCOMES else "error")].inc()


class PrometheusExporter:
    """A balancer plugin that counts each node's operations and ring events and serves them as
    ``GET /metrics`` on that node; register an instance with the plugin manager.

    :param buckets: upper bounds, in seconds, of the latency histogram's buckets; at least one, finite,
        positive and strictly increasing (``+Inf`` is always added). Raises ``ValueError`` otherwise.

    The counts live in :attr:`registry`, this exporter's own, keyed by node address (the ``node`` label)
    for as long as the exporter lives: some 20 KiB per node it ever heard of.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if (
            not bounds
            or not all(math.isfinite(b) and b > 0 for b in bounds)
            or any(low >= high for low, high in itertools.pairwise(bounds))
        ):
            raise ValueError(
                f"buckets must be one or more finite, positive, strictly increasing bounds, got {buckets!r}"
            )
        self.buckets = bounds
        self.registry = CollectorRegistry()
        """The counts of every node this exporter heard of (not the ring gauges, which exist per scrape);
        prometheus_client's global default registry is left alone."""
        self._families = _Families.register(self.registry, bounds)
        self._nodes: dict[str, NodeMetrics] = {}

    def metrics(self, node: NodeInfo) -> NodeMetrics:
        """The series of ``node`` (created, all zero, the first time it is asked for), by its address."""
        found = self._nodes.get(node.address)
        if found is None:
            found = self._nodes[node.address] = NodeMetrics(self._families, node.address)
        return found

    def generate(self, view: RingView, records: int) -> bytes:
        """The body of a scrape of the node whose ring view is ``view`` and that stores ``records``: its
        ring state and its own series, as :func:`prometheus_client.generate_latest` writes them."""
        self.metrics(view.node)  # its counts are exported, at zero, from its first scrape on
        return generate_latest(_Scrape(self.registry, _RingState(view, records)))

    def render(self, view: RingView, records: int) -> str:
        """:meth:`generate`, as text."""
        return self.generate(view, records).decode()

    async def exposition(self, node: Node) -> str:
        """The exposition text of a started ``node``; raises :class:`~balancer.errors.RingError` before."""
        return (await self._scrape(node)).decode()

    async def _scrape(self, node: Node) -> bytes:
        view = node.view()
        return self.generate(view, await node.storage.count())

    # -- hooks ------------------------------------------------------------------------------------

    @hookimpl
    def balancer_http_routes(self, node: Node, register: Callable[[Route], None]) -> None:
        """Serve ``GET /metrics`` on ``node``, unless another plugin already does."""
        if any(route.path == METRICS_PATH for route in node.routes()):
            # two exporters (this package's entry point and an explicit one, say) would clash in the router
            log.warning("another plugin already serves %s; this exporter's is left out", METRICS_PATH)
            return

        async def scrape() -> tuple[int, str, bytes]:
            try:
                body = await self._scrape(node)
            except RingError:  # a scrape in the instant between serving and joining
                return 503, "text/plain; charset=utf-8", b"the node has not joined a ring yet\n"
            return 200, CONTENT_TYPE, body

        register(Route("GET", METRICS_PATH, scrape))

    @hookimpl
    def balancer_kv_operation(self, node: NodeInfo, operation: str, seconds: float, outcome: str) -> None:
        """Count a client operation, its outcome and its latency."""
        self.metrics(node).observe(operation, seconds, outcome)

    @hookimpl
    def balancer_node_joined(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a new neighbour."""
        self.metrics(node).events["joined"].inc()

    @hookimpl
    def balancer_node_left(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a neighbour's graceful leave."""
        self.metrics(node).events["left"].inc()

    @hookimpl
    def balancer_node_failed(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a peer that stopped answering."""
        self.metrics(node).events["failed"].inc()

    @hookimpl
    def balancer_range_moved(self, node: NodeInfo, target: NodeInfo, records: int) -> None:
        """Count records handed to ``target``."""
        self.metrics(node).handed_off.inc(records)


# -- what one scrape collects ---------------------------------------------------------------------


def _members(view: RingView) -> int:
    """Processes this node knows (one per address: a process may hold several ring ids)."""
    known = {view.node, *view.successors, *view.fingers}
    if view.predecessor is not None:
        known.add(view.predecessor)
    return len({node.address for node in known})


def _gauge(name: str, documentation: str, address: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=(NODE_LABEL,))
    gauge.add_metric((address,), value)
    return gauge


class _RingState(Collector):
    """The gauges of one node's ring view and record count, as read for one scrape."""

    def __init__(self, view: RingView, records: int) -> None:
        self.view = view
        self.records = records

    def collect(self) -> Iterator[Metric]:
        view, address = self.view, self.view.node.address
        info = GaugeMetricFamily(
            "balancer_node_info",
            "This node: its address and its id on the ring (hexadecimal); always 1.",
            labels=(NODE_LABEL, "id"),
        )
        info.add_metric((address, format_id(view.node.id)), 1)
        yield info
        yield _gauge(
            "balancer_records",
            "Records this node stores, its replicas and tombstones included.",
            address,
            self.records,
        )
        yield _gauge(
            "balancer_ring_members",
            "Ring processes this node knows: itself, its predecessor, successors and fingers.",
            address,
            _members(view),
        )
        yield _gauge(
            "balancer_successor_list_length",
            "Other processes in this node's successor list (0 when alone).",
            address,
            len({s.address for s in view.successors} - {address}),
        )


class _Scrape(Collector):
    """One scrape of one node: its ring state, then its own series of the exporter's registry.

    The series of other nodes sharing the exporter are left out, and so are the ``_created`` samples
    prometheus_client keeps for OpenMetrics (the creation time of each series): the text format would
    carry them as one more gauge family per counter and histogram.
    """

    def __init__(self, registry: CollectorRegistry, ring: _RingState) -> None:
        self.registry = registry
        self.ring = ring

    def collect(self) -> Iterator[Metric]:
        yield from self.ring.collect()
        address = self.ring.view.node.address
        for family in self.registry.collect():
            created = family.name + "_created"
            own = Metric(family.name, family.documentation, family.type, family.unit)
            own.samples = [
                s for s in family.samples if s.labels.get(NODE_LABEL) == address and s.name != created
            ]
            if own.samples:
                yield own


# -- the module as a plugin -----------------------------------------------------------------------

EXPORTER = PrometheusExporter()
"""The exporter behind this module's hooks: the one the ``balancer`` entry point registers."""

# The entry point names this module, and pluggy finds hooks among a plugin's attributes: bound methods
# of EXPORTER are hookimpls too, so the module is a plugin without a second copy of every hook.
balancer_http_routes = EXPORTER.balancer_http_routes
balancer_kv_operation = EXPORTER.balancer_kv_operation
balancer_node_joined = EXPORTER.balancer_node_joined
balancer_node_left = EXPORTER.balancer_node_left
balancer_node_failed = EXPORTER.balancer_node_failed
balancer_range_moved = EXPORTER.balancer_range_moved
