"""Every RPC's request and answer, declared once, and decoded once against those declarations.

A payload that crosses the wire reaches a handler only after :func:`decode` has checked its shape, types
and ranges: integers that do not fit (a version timestamp beyond 2**63 - 1, a node id beyond the ring's
2**bits), keys and values over their limits, lists longer than a message may carry, base64 that is not.
Anything else is refused with :class:`~balancer.errors.BadRequestError` (HTTP 400) before any state
changes. Answers from peers are decoded the same way, so a confused or hostile peer cannot hand a node
values it would not accept in a request.

Static limits live in the declarations (msgspec ``Meta``); those that depend on a node's settings (id
bits, key and value sizes) in :class:`Limits`, applied by :func:`decode` to every node, version and
record found in the message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct

from balancer.errors import BadRequestError
from balancer.types import NodeInfo, Record, Version

__all__ = [
    "MAX_BATCH",
    "MAX_SUCCESSORS",
    "Batch",
    "BatchAnswer",
    "Compare",
    "CompareAnswer",
    "Described",
    "Digests",
    "DigestsAnswer",
    "Empty",
    "FindStep",
    "FindStepAnswer",
    "Join",
    "JoinAnswer",
    "Leaving",
    "Limits",
    "Message",
    "Notify",
    "Ping",
    "Place",
    "Placed",
    "ReadMany",
    "ReadManyAnswer",
    "State",
    "Store",
    "StoreAnswer",
    "Targeted",
    "WireNode",
    "WireRecord",
    "WireVersion",
    "decode",
    "serve",
]

MAX_BATCH = 4096
"""Most keys or records one message may carry."""
MAX_SUCCESSORS = 64
"""Most nodes a successor list or a list of closer nodes may name."""

_U63 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
_Id = Annotated[int, Meta(ge=0)]  # below 2**bits: checked against Limits
_Address = Annotated[str, Meta(min_length=3, max_length=300, pattern=r"^[^\s/@?#]+:[0-9]{1,5}$")]
_Bucket = Annotated[int, Meta(ge=0, lt=64)]
_Nodes = Annotated[list["WireNode"], Meta(max_length=4 * MAX_SUCCESSORS)]

T = TypeVar("T", bound=Struct)


@dataclass(frozen=True, slots=True)
class Limits:
    """The ranges that depend on a node's settings."""

    bits: int = 64
    max_key_bytes: int = 1024
    max_value_bytes: int = 1 << 20


# -- values -------------------------------------------------------------------------------------------


class WireNode(Struct, array_like=True, frozen=True):
    """A ring member on the wire: ``[id, "host:port"]``."""

    id: _Id
    address: _Address

    def value(self) -> NodeInfo:
        """As a :class:`NodeInfo`."""
        return NodeInfo(self.id, self.address)


class WireVersion(Struct, array_like=True, frozen=True):
    """A version on the wire: ``[timestamp, writer id]``."""

    timestamp: _U63
    node: _Id

    def value(self) -> Version:
        """As a :class:`Version`."""
        return Version(self.timestamp, self.node)


class WireRecord(Struct, frozen=True, forbid_unknown_fields=True):
    """A record on the wire: base64 key and value (``null`` for a tombstone), and its version."""

    key: bytes
    value: bytes | None
    version: WireVersion

    def record(self) -> Record:
        """As a :class:`Record`."""
        return Record(self.key, self.value, self.version.value())


# -- requests and answers, by method ------------------------------------------------------------------


class Message(Struct, frozen=True):
    """A request or an answer. Nodes, versions and records inside it are range-checked wherever they
    are; a message with ids or keys that are bare integers or bytes names them in :meth:`bare`."""

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """What its bare ids are ("the id", for error messages), those ids, and its bare keys: the ones
        that are not parts of nodes, versions or records."""
        return "an id", (), ()


class Empty(Message, frozen=True):
    """A request or answer with no fields (``chord.notify``'s answer, ...)."""


class Targeted(Message, frozen=True, kw_only=True):
    """A request for one virtual node of the receiving process (``chord.state``, ``chord.ping``):
    ``to`` is its id; without it, the process's first one."""

    to: _Id | None = None

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The id of the virtual node addressed."""
        return "the target id", () if self.to is None else (self.to,), ()


class Ping(Message, frozen=True):
    """``chord.ping``'s answer: the id of the node that answered."""

    id: _Id

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The id of the node that answered."""
        return "the id", (self.id,), ()


class State(Message, frozen=True):
    """``chord.state``'s answer: the node's predecessor and successor list, and whether that list
    skipped no id (then, if it is short of r processes, it is the whole ring in order)."""

    successors: Annotated[list[WireNode], Meta(max_length=MAX_SUCCESSORS)]
    predecessor: WireNode | None = None
    contiguous: bool = False


class Notify(Targeted, frozen=True):
    """``chord.notify``: ``node`` thinks it might be the receiver's predecessor."""

    node: WireNode


class FindStep(Message, frozen=True):
    """``chord.find_step``: one hop of an iterative lookup of ``id``."""

    id: _Id

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The id looked up."""
        return "the id", (self.id,), ()


class FindStepAnswer(Message, frozen=True):
    """``chord.find_step``'s answer: the owner and its successors (``done``), or closer nodes to ask."""

    done: bool
    successors: Annotated[list[WireNode], Meta(max_length=MAX_SUCCESSORS + 1)]
    closer: _Nodes = []
    after: _Id | None = None
    """With ``done``: every id in ``(after, owner]`` has the same owner (what the caller may cache).
    Without: the id of the vnode whose successor list ``successors`` is."""

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """Where the owner's range starts."""
        return "the range start", () if self.after is None else (self.after,), ()


class Join(Message, frozen=True):
    """``chord.join``: ``node`` asks where it belongs; ``settings`` must equal the ring's."""

    node: WireNode
    settings: Annotated[dict[str, int | Annotated[str, Meta(max_length=64)]], Meta(max_length=32)]


class JoinAnswer(Message, frozen=True):
    """``chord.join``'s answer: the joiner's successor, then the nodes after it."""

    successors: Annotated[list[WireNode], Meta(max_length=MAX_SUCCESSORS + 1)]
    hops: Annotated[int, Meta(ge=0, le=1 << 16)] = 0


class Leaving(Targeted, frozen=True):
    """``chord.leaving``: ``node`` leaves gracefully, naming its predecessor and successors."""

    node: WireNode
    successors: Annotated[list[WireNode], Meta(max_length=MAX_SUCCESSORS)] = []
    predecessor: WireNode | None = None


class Batch(Message, frozen=True):
    """``chord.batch``: maintenance calls (``chord.state``, ``chord.notify``, ``chord.ping``) for vnodes
    of one process, made in the same turn, as ``[method, payload]`` pairs; each payload is decoded by
    its own method's schema."""

    calls: Annotated[
        list[tuple[Annotated[str, Meta(max_length=32)], dict[str, Any]]], Meta(min_length=1, max_length=1024)
    ]


class BatchAnswer(Message, frozen=True):
    """``chord.batch``'s answer: per call, ``{"ok": answer}`` or ``{"error": [type, message]}``."""

    results: Annotated[list[dict[str, Any]], Meta(max_length=1024)]


class Described(Message, frozen=True):
    """``ring.describe``'s answer: one process as it describes itself.

    ``vnodes`` pairs each of its ids with the ids of that vnode's successor list; ``neighbours`` are the
    other processes it points to (where a survey of the ring goes next).
    """

    address: _Address
    vnodes: Annotated[
        list[tuple[_Id, Annotated[list[_Id], Meta(max_length=MAX_SUCCESSORS)]]],
        Meta(min_length=1, max_length=4096),
    ]
    neighbours: Annotated[list[_Address], Meta(max_length=4096)] = []
    weight: Annotated[float, Meta(gt=0, le=64)] = 1.0
    leaving: bool = False
    records: Annotated[int, Meta(ge=0)] = 0
    ahead: Annotated[float, Meta(ge=-1e7, le=1e7)] = 0.0
    """Seconds its clock is ahead of its ring's as it measured them (negative: behind)."""
    ahead_error: Annotated[float, Meta(ge=0, le=1e7)] = 0.0
    """The error bound of ``ahead``, in seconds."""
    fenced: bool = False
    """Whether it is fenced for its clock (see :mod:`balancer.skew`)."""

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The ids of the vnodes and of their successors."""
        return "a vnode id", (i for v, after in self.vnodes for i in (v, *after)), ()


class Place(Message, frozen=True):
    """``ring.place``: where should the ``count`` ids of the process at ``address`` go?"""

    address: _Address
    weight: Annotated[float, Meta(gt=0, le=64)]
    count: Annotated[int, Meta(ge=1, le=4096)]


class Placed(Message, frozen=True):
    """``ring.place``'s answer: the ids to join with."""

    ids: Annotated[list[_Id], Meta(min_length=1, max_length=4096)]

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The ids placed."""
        return "an id", self.ids, ()


class ReadMany(Message, frozen=True):
    """``kv.read_many``: the records held for these keys."""

    keys: Annotated[list[bytes], Meta(max_length=MAX_BATCH)]

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The keys asked for."""
        return "an id", (), self.keys


class ReadManyAnswer(Message, frozen=True):
    """``kv.read_many``'s answer: one record (or ``null``) per key, in order, and whether the node has
    settled (synced with every replica it shares keys with since it last saw the ring change); an
    unsettled node's answer may miss writes, so the reader widens its quorum."""

    records: Annotated[list[WireRecord | None], Meta(max_length=MAX_BATCH)]
    settled: bool = True


class Store(Message, frozen=True):
    """``kv.store``: keep each record unless a greater version is held."""

    records: Annotated[list[WireRecord], Meta(max_length=MAX_BATCH)]


class StoreAnswer(Message, frozen=True):
    """``kv.store``'s answer: per record, whether it was kept and the greater version that beat it."""

    each: Annotated[list[tuple[bool, WireVersion | None]], Meta(max_length=MAX_BATCH)]


class Digests(Message, frozen=True):
    """``kv.digests``: per bucket of shared records, ``[count, hex digest]``."""

    node: WireNode
    digests: Annotated[
        dict[Annotated[str, Meta(pattern=r"^[0-9]{1,2}$")], tuple[_U63, Annotated[str, Meta(max_length=32)]]],
        Meta(max_length=64),
    ]


class DigestsAnswer(Message, frozen=True):
    """``kv.digests``'s answer: the buckets whose digests differ, and whether the answering node's
    digests were made at its current view of the ring (if not, what it would send may be incomplete)."""

    differ: Annotated[list[_Bucket], Meta(max_length=64)]
    current: bool = True


class Compare(Message, frozen=True):
    """``kv.compare``: the keys and versions the caller holds in one bucket."""

    node: WireNode
    bucket: _Bucket
    entries: Annotated[list[tuple[bytes, _U63, _Id]], Meta(max_length=1 << 20)]

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The writers and the keys of the entries."""
        return "a writer id", (w for _, _, w in self.entries), (k for k, _, _ in self.entries)


class CompareAnswer(Message, frozen=True):
    """``kv.compare``'s answer: keys the receiver wants, and its newer records."""

    want: Annotated[list[bytes], Meta(max_length=1 << 20)]
    records: Annotated[list[WireRecord], Meta(max_length=1 << 20)]

    def bare(self) -> tuple[str, Iterable[int], Iterable[bytes]]:
        """The keys wanted."""
        return "an id", (), self.want


# -- decoding -----------------------------------------------------------------------------------------


def _check_records(records: Iterable[WireRecord | None], limits: Limits, size: int) -> None:
    """The ranges of a batch of records, in one loop: the hot path of every read and write."""
    max_key, max_value = limits.max_key_bytes, limits.max_value_bytes
    for record in records:
        if record is None:
            continue
        if not 0 < len(record.key) <= max_key:
            raise BadRequestError(f"a record's key must be 1 to {max_key} bytes")
        if record.value is not None and len(record.value) > max_value:
            raise BadRequestError(f"a record's value is over the limit of {max_value} bytes")
        if record.version.node >= size:
            raise BadRequestError(f"writer id {record.version.node} is outside the {limits.bits}-bit ring")


def _check(value: Any, limits: Limits, size: int) -> None:
    """Apply the setting-dependent ranges to every node, version and record inside ``value``."""
    if isinstance(value, WireNode):
        if value.id >= size:
            raise BadRequestError(f"node id {value.id} is outside the {limits.bits}-bit ring")
    elif isinstance(value, WireVersion):
        if value.node >= size:
            raise BadRequestError(f"writer id {value.node} is outside the {limits.bits}-bit ring")
    elif isinstance(value, WireRecord):
        _check_records((value,), limits, size)
    elif isinstance(value, Struct):
        for name in value.__struct_fields__:
            _check(getattr(value, name), limits, size)
    elif isinstance(value, tuple):  # a fixed shape: items of different kinds
        for item in value:
            if item is not None and not isinstance(item, int | bytes | str):
                _check(item, limits, size)
    elif isinstance(value, list) and value:  # one kind of item (records may be None)
        first = value[0]
        if first is None or isinstance(first, WireRecord):
            _check_records(value, limits, size)
        elif not isinstance(first, int | bytes | str):
            for item in value:
                _check(item, limits, size)


def decode(schema: type[T], payload: Any, limits: Limits) -> T:
    """``payload`` as a ``schema`` message; raises :class:`BadRequestError` naming the first bad field."""
    try:
        message = msgspec.convert(payload, schema)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"malformed {schema.__name__}: {exc}") from None
    size = 1 << limits.bits
    _check(message, limits, size)
    if isinstance(message, Message):
        what, ids, keys = message.bare()
        if any(ident >= size for ident in ids):
            raise BadRequestError(f"{what} is outside the {limits.bits}-bit ring")
        if any(not 0 < len(key) <= limits.max_key_bytes for key in keys):
            raise BadRequestError(f"a key must be 1 to {limits.max_key_bytes} bytes")
    return message


def serve(
    schema: type[T], handler: Callable[[T], Awaitable[dict[str, Any]]], limits: Limits
) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """An RPC handler that decodes its payload as ``schema`` before ``handler`` sees it."""

    async def decoded(payload: dict[str, Any]) -> dict[str, Any]:
        return await handler(decode(schema, payload, limits))

    decoded.__name__ = getattr(handler, "__name__", "handler")
    return decoded
