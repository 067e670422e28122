"""The wire layer: every RPC field is checked against its declaration, ranges included, before any
handler runs; a refused request changes nothing, and no clock is dragged ahead by a record."""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec
import pytest
from helpers import RingFactory

from balancer import wire
from balancer.errors import BadRequestError, ClockSkewError
from balancer.kv import HybridClock

LIMITS = wire.Limits(bits=64, max_key_bytes=16, max_value_bytes=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _record(version: list[Any], key: bytes = b"k", value: bytes | None = b"v") -> dict[str, Any]:
    return {"key": _b64(key), "value": None if value is None else _b64(value), "version": version}


@pytest.mark.parametrize(
    ("schema", "payload", "complaint"),
    [
        (wire.Store, {"records": [_record([(1 << 64) - 1, 0])]}, "<= 9223372036854775807"),
        (wire.Store, {"records": [_record([-1, 0])]}, ">= 0"),
        (wire.Store, {"records": [_record([1, 1 << 64])]}, "outside the 64-bit ring"),
        (wire.Store, {"records": [_record([True, 0])]}, "got `bool`"),
        (wire.Store, {"records": [_record([1, 0], key=b"")]}, "key must be 1 to 16 bytes"),
        (wire.Store, {"records": [_record([1, 0], key=b"k" * 17)]}, "key must be 1 to 16 bytes"),
        (wire.Store, {"records": [_record([1, 0], value=b"v" * 33)]}, "over the limit of 32 bytes"),
        (wire.Store, {"records": [{"key": "!!", "value": None, "version": [1, 1]}]}, "base64"),
        (wire.Store, {"records": [{**_record([1, 0]), "extra": 1}]}, "unknown field"),
        (wire.Store, {"records": "nope"}, "Expected `array`"),
        (wire.Store, {}, "missing required field `records`"),
        (wire.ReadMany, {"keys": [5]}, "Expected `bytes`, got `int`"),
        (wire.ReadMany, {"keys": ["a2V5"] * (wire.MAX_BATCH + 1)}, "length <= 4096"),
        (wire.Digests, {"node": [1, "127.0.0.1:1"], "digests": {"x1": [1, "ab"]}}, "matching regex"),
        (wire.Digests, {"node": [1, "127.0.0.1:1"], "digests": {"1": [1, 2]}}, "Expected `str`"),
        (wire.Compare, {"node": [1, "127.0.0.1:1"], "bucket": 64, "entries": []}, "<= 63"),
        (wire.Compare, {"node": [1, "127.0.0.1:1"], "bucket": 1, "entries": [["a2V5", 1]]}, "length 3"),
        (wire.Compare, {"node": [1, "a:1"], "bucket": 1, "entries": [["a2V5", 1, 1 << 64]]}, "writer id"),
        (wire.FindStep, {"id": 1 << 64}, "outside the 64-bit ring"),
        (wire.FindStep, {"id": "12"}, "Expected `int`"),
        (wire.Notify, {"node": [1, "no port"]}, "matching regex"),
        (wire.Notify, {"node": [1 << 64, "127.0.0.1:1"]}, "outside the 64-bit ring"),
        (wire.Join, {"node": [1, "127.0.0.1:1"], "settings": {"bits": [64]}}, "Expected `int | str`"),
        (wire.Leaving, {"node": [1, "127.0.0.1:1"], "successors": [[2, "x:1"]] * 65}, "length <= 64"),
        (wire.StoreAnswer, {"each": [[True, None], [False, [1, 1 << 64]]]}, "writer id"),
        (wire.ReadMany, {"keys": [_b64(b"k" * 17)]}, "key must be 1 to 16 bytes"),
        (wire.ReadMany, {"keys": [""]}, "key must be 1 to 16 bytes"),
        (
            wire.Compare,
            {"node": [1, "a:1"], "bucket": 1, "entries": [[_b64(b"k" * 17), 1, 1]]},
            "key must be",
        ),
        (wire.CompareAnswer, {"want": [_b64(b"k" * 17)], "records": []}, "key must be 1 to 16 bytes"),
        (wire.ReadManyAnswer, {"records": [None, _record([1, 0], key=b"")]}, "key must be 1 to 16 bytes"),
    ],
)
def test_malformed_fields_are_refused_with_the_field_named(
    schema: type[msgspec.Struct], payload: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(BadRequestError, match=complaint.replace("(", r"\(").replace("`", ".")):
        wire.decode(schema, payload, LIMITS)


def test_well_formed_messages_decode_to_values() -> None:
    store = wire.decode(wire.Store, {"records": [_record([7, 9]), _record([8, 9], value=None)]}, LIMITS)
    assert [r.record().value for r in store.records] == [b"v", None]
    assert store.records[0].record().version.timestamp == 7
    digests = wire.decode(wire.Digests, {"node": [3, "127.0.0.1:9"], "digests": {"63": [2, "ff"]}}, LIMITS)
    assert digests.node.value().address == "127.0.0.1:9"
    assert digests.digests == {"63": (2, "ff")}


def test_the_clock_is_never_dragged_beyond_the_skew() -> None:
    wall = [1000.0]
    clock = HybridClock(lambda: wall[0], max_skew=60)
    clock.observe((1 << 63) - 1)  # a forged record's timestamp
    assert HybridClock.seconds(clock.now()) <= 1060.001
    fresh = HybridClock(lambda: wall[0], max_skew=60)
    fresh.observe((1030 * 1000) << 16)  # a peer 30 s ahead: within the skew, adopted
    assert HybridClock.seconds(fresh.now()) == pytest.approx(1030, abs=0.01)


async def test_a_poison_record_is_refused_and_changes_nothing(make_ring: RingFactory) -> None:
    nodes = await make_ring(3)
    await nodes[0].put("k", b"before")
    store = nodes[1].kv.handlers()["kv.store"]
    clocks = [node.kv.clock.now() for node in nodes]
    with pytest.raises(BadRequestError):
        await store({"records": [_record([(1 << 64) - 1, 0], key=b"k", value=b"poison")]})
    far = int((time.time() + 3600) * 1000) << 16  # in range, but an hour ahead of every clock
    with pytest.raises(ClockSkewError, match="ahead of this node's clock"):
        await store({"records": [_record([1, 0], key=b"other"), _record([far, 0], key=b"k")]})
    assert await nodes[1].storage.get(b"other") is None  # nothing of the refused batch was stored
    for node, before in zip(nodes, clocks, strict=True):
        assert HybridClock.seconds(node.kv.clock.now()) - HybridClock.seconds(before) < 5
    await nodes[2].put("k", b"after")  # the key can still be written and deleted
    assert await nodes[0].get("k") == b"after"
    await nodes[1].delete("k")


async def test_records_pulled_from_a_peer_beyond_the_skew_are_not_stored(make_ring: RingFactory) -> None:
    nodes = await make_ring(2, replicas=2, write_quorum=1, read_quorum=1)
    far = int((time.time() + 3600) * 1000) << 16
    # planted directly in a peer's storage, as a node with a wrong clock would have stamped it
    from balancer.types import Record, Version

    await nodes[0].storage.put(Record(b"future", b"x", Version(far, nodes[0].info.id)))
    for node in nodes:
        await node.kv.maintain()
    for node in nodes:
        await node.kv.maintain()
    assert await nodes[1].storage.get(b"future") is None
    assert HybridClock.seconds(nodes[1].kv.clock.now()) < time.time() + 120


async def test_a_future_record_already_stored_is_never_read_nor_spread(make_ring: RingFactory) -> None:
    from balancer.types import Record, Version

    nodes = await make_ring(3)
    await nodes[0].put("k", b"now")
    far = int((time.time() + 3600) * 1000) << 16
    # stored before the skew check existed, on one replica
    await nodes[2].storage.put(Record(b"k", b"future", Version(far, nodes[2].info.id)))
    for node in nodes:
        assert await node.get("k") == b"now"
    for node in nodes:
        await node.kv.drain()
    for node in nodes[:2]:
        held = await node.storage.get(b"k")
        assert held is not None
        assert held.value == b"now"  # no repair spread the future record
        assert HybridClock.seconds(node.kv.clock.now()) < time.time() + 120
    await nodes[0].put("k", b"later")  # the key stays writable where it is not poisoned
    assert await nodes[1].get("k") == b"later"
