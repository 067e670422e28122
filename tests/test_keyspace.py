"""Tests for balancer.keyspace: stable salted hashing and circular intervals."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.keyspace import KeySpace, hash_key, in_interval, to_bytes

SIZE = 16


def brute_interval(x: int, a: int, b: int, lc: bool, rc: bool) -> bool:
    """Walk the ring from a to b clockwise, the slow obvious way."""
    members = set()
    i = a
    while True:
        members.add(i)
        i = (i + 1) % SIZE
        if i == b:
            members.add(b)
            break
    if not lc:
        members.discard(a)
    if not rc:
        members.discard(b)
    if a == b:  # equal ends: the whole circle, less a when both ends are open
        members = set(range(SIZE))
        if not lc and not rc:
            members.discard(a)
    return x in members


@given(
    st.integers(0, SIZE - 1),
    st.integers(0, SIZE - 1),
    st.integers(0, SIZE - 1),
    st.booleans(),
    st.booleans(),
)
def test_interval_matches_brute_force(x: int, a: int, b: int, lc: bool, rc: bool) -> None:
    got = in_interval(x, a, b, SIZE, left_closed=lc, right_closed=rc)
    assert got == brute_interval(x, a, b, lc, rc)


def test_interval_edge_cases() -> None:
    # plain, wrapping, and equal ends
    assert in_interval(5, 3, 7, SIZE)
    assert not in_interval(3, 3, 7, SIZE)
    assert in_interval(3, 3, 7, SIZE, left_closed=True)
    assert not in_interval(7, 3, 7, SIZE)
    assert in_interval(7, 3, 7, SIZE, right_closed=True)
    assert in_interval(1, 14, 2, SIZE)
    assert in_interval(15, 14, 2, SIZE)
    assert not in_interval(8, 14, 2, SIZE)
    assert not in_interval(4, 4, 4, SIZE)
    assert in_interval(4, 4, 4, SIZE, right_closed=True)
    assert in_interval(9, 4, 4, SIZE)
    # adjacent ends leave an empty open interval
    assert not any(in_interval(x, 4, 5, SIZE) for x in range(SIZE))


def test_hash_is_stable_and_salted() -> None:
    # Fixed values: a change of hash function would silently move every key of every deployed ring.
    assert hash_key("balancer") == hash_key(b"balancer")
    assert hash_key("balancer") == 0x3E61FE17D5A23CA3
    expected = int.from_bytes(hashlib.blake2b(b"balancer", digest_size=8).digest(), "big")
    assert hash_key("balancer") == expected
    assert hash_key("balancer", salt=1) != hash_key("balancer")
    assert hash_key("balancer", salt=0) == hash_key("balancer")
    assert 0 <= hash_key("x", bits=7) < 128
    assert 2**150 < hash_key("x", bits=160) < 2**160  # the top bits are used, not dropped


def test_hash_spreads_evenly() -> None:
    buckets = [0] * 16
    for i in range(16_000):
        buckets[hash_key(f"k{i}") >> 60] += 1
    assert max(buckets) < 1.1 * 1000
    assert min(buckets) > 0.9 * 1000


def test_keyspace_finger_start_has_no_overflow() -> None:
    space = KeySpace(64)
    top = space.size - 1
    assert space.finger_start(top, 0) == 0
    assert space.finger_start(top, 63) == (top + (1 << 63)) % space.size
    assert all(0 <= space.finger_start(top, i) < space.size for i in range(64))
    assert space.distance(top, 0) == 1
    assert space.contains(0, top, 1)
    with pytest.raises(ValueError, match="finger index"):
        space.finger_start(0, 64)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        to_bytes(12)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        hash_key("k", bits=0)
    with pytest.raises(ValueError, match="salt"):
        hash_key("k", salt=-1)
    with pytest.raises(ValueError, match="bits"):
        KeySpace(1000)
