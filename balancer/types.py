"""Small value types shared by every layer: ring members, versions, records, lookup answers."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Handler", "Lookup", "Member", "NodeInfo", "Payload", "Record", "RingView", "Version", "format_id"]

Payload = dict[str, Any]
"""An RPC's body or answer: JSON-safe data (the transport encodes it; :mod:`balancer.wire` validates it)."""
Handler = Callable[[Payload], Awaitable[Payload]]
"""An RPC handler: JSON-safe payload in, JSON-safe result out, or a BalancerError raised."""


def format_id(ident: int, bits: int = 64) -> str:
    """A ring id as every output shows it: lower-case hex, zero-padded to ``ceil(bits / 4)`` digits.

    So a 64-bit id always prints as 16 digits, and ids sort and line up the same as text as they do as
    numbers, in ``/status``, the REPL, ``balancer status``, logs and the CLI banner alike.
    """
    return f"{ident:0{(bits + 3) // 4}x}"


@dataclass(frozen=True, slots=True, order=True)
class NodeInfo:
    """A ring member: its id on the identifier circle and the address (``host:port``) it serves on."""

    id: int
    address: str

    def to_wire(self) -> list[Any]:
        """The JSON form, ``[id, address]``."""
        return [self.id, self.address]

    @classmethod
    def from_wire(cls, data: Any) -> NodeInfo:
        """Parse :meth:`to_wire`'s form; raises ``ValueError`` on anything else."""
        if not (isinstance(data, list) and len(data) == 2):
            raise ValueError(f"a node is [id, address], got {data!r}")
        node_id, address = data
        if not isinstance(node_id, int) or node_id < 0 or not isinstance(address, str) or not address:
            raise ValueError(f"a node is [id >= 0, 'host:port'], got {data!r}")
        return cls(node_id, address)

    def __str__(self) -> str:
        # a node does not know the ring's id size; ids of the default 64 bits print as everywhere else
        return f"{self.address} ({format_id(self.id)})"


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A write's version: a hybrid logical clock timestamp, then the writer's node id as tie-break.

    Versions are totally ordered, so replicas that keep the greatest converge (last writer wins).
    """

    timestamp: int
    node: int

    def to_wire(self) -> list[int]:
        """The JSON form, ``[timestamp, node]``."""
        return [self.timestamp, self.node]

    @classmethod
    def from_wire(cls, data: Any) -> Version:
        """Parse :meth:`to_wire`'s form; raises ``ValueError`` on anything else."""
        if not (isinstance(data, list) and len(data) == 2 and all(type(x) is int and x >= 0 for x in data)):
            raise ValueError(f"a version is [timestamp, node], got {data!r}")
        return cls(data[0], data[1])


@dataclass(frozen=True, slots=True)
class Record:
    """A stored key: its bytes, its value (``None`` for a tombstone) and the version that wrote it."""

    key: bytes
    value: bytes | None
    version: Version

    @property
    def deleted(self) -> bool:
        """Whether this record is a tombstone."""
        return self.value is None

    def to_wire(self) -> dict[str, Any]:
        """The JSON form; bytes travel as base64."""
        return {
            "key": base64.b64encode(self.key).decode(),
            "value": None if self.value is None else base64.b64encode(self.value).decode(),
            "version": self.version.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: Any) -> Record:
        """Parse :meth:`to_wire`'s form; raises ``ValueError`` on anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"a record is an object, got {type(data).__name__}")
        try:
            key = base64.b64decode(data["key"], validate=True)
            raw = data["value"]
            value = None if raw is None else base64.b64decode(raw, validate=True)
            return cls(key, value, Version.from_wire(data["version"]))
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"malformed record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to a lookup: the node that owns the id, its successors, and the RPCs it took."""

    owner: NodeInfo
    hops: int
    successors: tuple[NodeInfo, ...] = ()
    path: tuple[str, ...] = ()
    """The processes that answered the lookup's messages, in order (one per hop)."""


@dataclass(frozen=True, slots=True)
class RingView:
    """One node's view of the ring: itself, its predecessor, successor list and distinct fingers."""

    node: NodeInfo
    predecessor: NodeInfo | None
    successors: tuple[NodeInfo, ...]
    fingers: tuple[NodeInfo, ...]


@dataclass(frozen=True, slots=True)
class Member:
    """One process of the ring as a node sees it: its address, its virtual nodes and how it is doing.

    ``state`` is ``"up"`` (answers), ``"suspect"`` (missed calls but is not declared failed),
    ``"down"`` (declared failed; listed until it answers again) or ``"leaving"`` (handing its keys off).
    ``share`` is the fraction of the key space its virtual nodes own (0 to 1) and ``records`` the records
    it stores; either is ``None`` when this view does not know it. ``fenced`` is whether it said it is
    fenced for its clock (too far from the ring's: it serves no reads or writes; see
    :mod:`balancer.skew`).
    """

    address: str
    ids: tuple[int, ...] = ()
    weight: float = 1.0
    state: str = "up"
    records: int | None = None
    share: float | None = None
    fenced: bool = False

    @property
    def live(self) -> bool:
        """Whether requests may be sent to it (up or only suspected)."""
        return self.state in ("up", "suspect")
