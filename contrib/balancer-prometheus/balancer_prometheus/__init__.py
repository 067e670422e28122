"""Prometheus metrics for balancer: every node serves ``GET /metrics`` in the text exposition format.

Installed, the package registers itself through the ``balancer`` entry-point group, so every node started
with entry points loaded (the CLI's default) serves its own metrics. In Python, register an exporter
explicitly::

    from balancer.plugin import plugin_manager
    from balancer_prometheus import PrometheusExporter

    pm = plugin_manager(plugins=[PrometheusExporter()])
    async with Node(config, pm=pm) as node:
        ...                                  # GET http://<node.address>/metrics

Several nodes may share one plugin manager (and so one exporter) in one process: the exporter keeps the
counts of each node apart, keyed by the node, and labels every sample with the node's address.

pluggy calls hooks synchronously: the event hooks only add to in-memory counts, and the ring state and
record count are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

import itertools
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    "OPERATIONS",
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

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of Prometheus' text exposition format, version 0.0.4."""

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

RING_EVENTS = ("joined", "left", "failed")
"""The ring events counted, by the name of their hook (``balancer_node_<event>``)."""

METRICS_PATH = "/metrics"
"""Where every node serves its metrics."""


@dataclass(slots=True)
class _Histogram:
    """Observations counted into fixed buckets, the way Prometheus' histograms count them."""

    bounds: tuple[float, ...]
    counts: list[int]
    """Per bucket, not cumulative; one more than ``bounds``: the last counts values above every bound."""
    total: float = 0.0
    count: int = 0

    @classmethod
    def over(cls, bounds: tuple[float, ...]) -> _Histogram:
        return cls(bounds, [0] * (len(bounds) + 1))

    def observe(self, value: float) -> None:
        # bucket i counts values <= bounds[i] (Prometheus' "le"); bisect_left finds the first such i
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> Iterator[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` for every bucket, ending with ``+Inf``."""
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            yield bound, running


@dataclass(slots=True)
class NodeMetrics:
    """What one node has observed since the exporter first heard of it; counts only ever grow."""

    buckets: tuple[float, ...]
    operations: dict[tuple[str, bool], int] = field(default_factory=dict)
    """Client operations by ``(operation, ok)``."""
    latency: dict[str, _Histogram] = field(default_factory=dict)
    """Seconds each client operation took, by operation."""
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RING_EVENTS, 0))
    """Ring events by kind (``joined``, ``left``, ``failed``)."""
    handed_off: int = 0
    """Records handed to other nodes, summed over targets (a record pushed to two heirs counts twice)."""

    def __post_init__(self) -> None:
        for operation in OPERATIONS:
            self._start(operation)

    def _start(self, operation: str) -> None:
        if operation not in self.latency:
            self.latency[operation] = _Histogram.over(self.buckets)
            for ok in (True, False):
                self.operations[(operation, ok)] = 0

    def observe(self, operation: str, seconds: float, ok: bool) -> None:
        """Count one client operation that took ``seconds``."""
        self._start(operation)
        self.operations[(operation, ok)] += 1
        self.latency[operation].observe(seconds)


class PrometheusExporter:
    """A balancer plugin that counts each node's operations and ring events and serves them as
    ``GET /metrics`` on that node; register an instance with the plugin manager.

    :param buckets: upper bounds, in seconds, of the latency histogram's buckets; finite, positive and
        strictly increasing (``+Inf`` is always added). Raises ``ValueError`` otherwise.

    Counts are kept per node (by :class:`~balancer.types.NodeInfo`) for as long as the exporter lives,
    a few kilobytes per node it ever heard of.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not all(math.isfinite(b) and b > 0 for b in bounds) or any(
            low >= high for low, high in itertools.pairwise(bounds)
        ):
            raise ValueError(f"buckets must be finite, positive and strictly increasing, got {buckets!r}")
        self.buckets = bounds
        self._nodes: dict[NodeInfo, NodeMetrics] = {}

    def metrics(self, node: NodeInfo) -> NodeMetrics:
        """The counts of ``node`` (new, all zero, the first time it is asked for)."""
        found = self._nodes.get(node)
        if found is None:
            found = self._nodes[node] = NodeMetrics(self.buckets)
        return found

    def render(self, view: RingView, records: int) -> str:
        """The exposition text of the node whose ring view is ``view`` and that stores ``records``."""
        return _render(view, records, self.metrics(view.node))

    async def exposition(self, node: Node) -> str:
        """The exposition text of a started ``node``; raises :class:`~balancer.errors.RingError` before."""
        view = node.view()
        return self.render(view, await node.storage.count())

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
                text = await self.exposition(node)
            except RingError:  # a scrape in the instant between serving and joining
                return 503, "text/plain; charset=utf-8", b"the node has not joined a ring yet\n"
            return 200, CONTENT_TYPE, text.encode()

        register(Route("GET", METRICS_PATH, scrape))

    @hookimpl
    def balancer_kv_operation(self, node: NodeInfo, operation: str, seconds: float, ok: bool) -> None:
        """Count a client operation and its latency."""
        self.metrics(node).observe(operation, seconds, ok)

    @hookimpl
    def balancer_node_joined(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a new neighbour."""
        self.metrics(node).events["joined"] += 1

    @hookimpl
    def balancer_node_left(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a neighbour's graceful leave."""
        self.metrics(node).events["left"] += 1

    @hookimpl
    def balancer_node_failed(self, node: NodeInfo, peer: NodeInfo) -> None:
        """Count a peer that stopped answering."""
        self.metrics(node).events["failed"] += 1

    @hookimpl
    def balancer_range_moved(self, node: NodeInfo, target: NodeInfo, records: int) -> None:
        """Count records handed to ``target``."""
        self.metrics(node).handed_off += records


# -- the text exposition format -------------------------------------------------------------------

_Labels = dict[str, str]
_Sample = tuple[str, _Labels, float]
"""A sample: the suffix after the family's name (``""``, ``"_bucket"``, ...), labels, and the value."""


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> list[str]:
    escaped_help = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {escaped_help}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        pairs = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels.items())
        lines.append(f"{name}{suffix}{{{pairs}}} {_number(value)}")
    return lines


def _members(view: RingView) -> int:
    """Processes this node knows (one per address: a process may hold several ring ids)."""
    known = {view.node, *view.successors, *view.fingers}
    if view.predecessor is not None:
        known.add(view.predecessor)
    return len({node.address for node in known})


def _render(view: RingView, records: int, metrics: NodeMetrics) -> str:
    me: _Labels = {"node": view.node.address}
    histogram: list[_Sample] = []
    for operation, latency in metrics.latency.items():
        labels = {**me, "operation": operation}
        for bound, count in latency.cumulative():
            histogram.append(("_bucket", {**labels, "le": _number(bound)}, count))
        histogram.append(("_sum", labels, latency.total))
        histogram.append(("_count", labels, latency.count))
    lines = [
        *_family(
            "balancer_node_info",
            "gauge",
            "This node: its address and its id on the ring (hexadecimal); always 1.",
            [("", {**me, "id": format_id(view.node.id)}, 1)],
        ),
        *_family(
            "balancer_kv_operations_total",
            "counter",
            "Client key-value operations this node served, by operation and outcome "
            "(error includes a missing key).",
            [
                ("", {**me, "operation": operation, "outcome": "ok" if ok else "error"}, count)
                for (operation, ok), count in metrics.operations.items()
            ],
        ),
        *_family(
            "balancer_kv_operation_duration_seconds",
            "histogram",
            "Seconds a client key-value operation took on this node, whatever its outcome.",
            histogram,
        ),
        *_family(
            "balancer_records",
            "gauge",
            "Records this node stores, its replicas and tombstones included.",
            [("", me, records)],
        ),
        *_family(
            "balancer_ring_members",
            "gauge",
            "Ring processes this node knows: itself, its predecessor, successors and fingers.",
            [("", me, _members(view))],
        ),
        *_family(
            "balancer_successor_list_length",
            "gauge",
            "Other processes in this node's successor list (0 when alone).",
            [("", me, len({s.address for s in view.successors} - {view.node.address}))],
        ),
        *_family(
            "balancer_ring_events_total",
            "counter",
            "Ring events this node observed: a neighbour joined, left gracefully, or failed.",
            [("", {**me, "event": event}, count) for event, count in metrics.events.items()],
        ),
        *_family(
            "balancer_records_handed_off_total",
            "counter",
            "Records this node handed to other nodes that confirmed them, summed over targets.",
            [("", me, metrics.handed_off)],
        ),
    ]
    return "\n".join(lines) + "\n"


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
