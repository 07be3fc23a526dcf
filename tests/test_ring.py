"""The hash ring: data contract (golden vectors), balance, movement, weights, immutability, errors."""

from __future__ import annotations

import bisect
import random
import threading
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sa_shardkit import errors
from sa_shardkit.ring import HashRing, key_bytes, key_hash

FOUR = ["shard-1", "shard-2", "shard-3", "shard-4"]

# The data contract. If one of these changes, rows already placed would be looked for on the wrong
# shard: never edit these values to make a test pass.
GOLDEN_HASHES = [
    ("alice", 5593767425381308080),
    ("bob", 1442208253991303397),
    ("", 3244421341483603138),
    ("ü-ñ", 11095845431925176114),
    (0, 1838281907459330133),
    (42, 1303733993043075473),
    (-7, 13012659984592985912),
    (2**63, 13003770122998655116),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), 2953113683150770408),
    (b"\x00\x01", 15448577912996533335),
]
GOLDEN_FOUR = [
    "shard-4",
    "shard-2",
    "shard-1",
    "shard-1",
    "shard-3",
    "shard-3",
    "shard-2",
    "shard-2",
    "shard-4",
    "shard-1",
]
GOLDEN_FIVE = [
    "shard-4",
    "shard-2",
    "shard-5",
    "shard-1",
    "shard-3",
    "shard-3",
    "shard-5",
    "shard-2",
    "shard-4",
    "shard-1",
]
GOLDEN_WEIGHTED = ["b", "a", "b", "b", "b", "a", "a", "a", "a", "b"]


def test_key_hashes_are_pinned() -> None:
    assert [key_hash(k) for k, _ in GOLDEN_HASHES] == [h for _, h in GOLDEN_HASHES]


def test_shard_placement_is_pinned_for_a_fixed_ring() -> None:
    ring = HashRing(FOUR)
    assert [ring.get_shard(k) for k, _ in GOLDEN_HASHES] == GOLDEN_FOUR
    assert [ring.add_shard("shard-5").get_shard(k) for k, _ in GOLDEN_HASHES] == GOLDEN_FIVE
    weighted = HashRing(["a", "b"], vnodes=64, weights={"b": 2})
    assert [weighted.get_shard(k) for k, _ in GOLDEN_HASHES] == GOLDEN_WEIGHTED


def test_canonical_key_bytes() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert key_bytes("abc") == b"abc"
    assert key_bytes(-12) == b"-12"
    assert key_bytes(u) == b"12345678-1234-5678-1234-567812345678"
    ring = HashRing(FOUR)
    assert ring.get_shard(5) == ring.get_shard("5")
    assert ring.get_shard(u) == ring.get_shard(str(u))


@pytest.mark.parametrize("bad", [None, True, 1.5, object()])
def test_bad_keys_raise_invalid_shard_key(bad: object) -> None:
    with pytest.raises(errors.InvalidShardKeyError):
        HashRing(FOUR).get_shard(bad)  # type: ignore[arg-type]


def test_bad_rings_raise_specific_errors() -> None:
    with pytest.raises(errors.EmptyRingError):
        HashRing([])
    with pytest.raises(errors.DuplicateShardError, match="shard-1"):
        HashRing(["shard-1", "shard-1"])
    with pytest.raises(errors.UnknownShardError, match="shard-9"):
        HashRing(FOUR).remove_shard("shard-9")
    with pytest.raises(errors.DuplicateShardError):
        HashRing(FOUR).add_shard("shard-1")
    for weight in (0, -1, float("nan"), float("inf")):
        with pytest.raises(errors.InvalidWeightError, match="shard-2"):
            HashRing(FOUR, weights={"shard-2": weight})
    with pytest.raises(errors.EmptyRingError):
        HashRing(["only"]).remove_shard("only")


def test_equal_members_make_equal_rings_and_identical_json() -> None:
    a = HashRing(FOUR, weights={"shard-2": 2})
    b = HashRing(list(reversed(FOUR)), weights={"shard-2": 2.0})
    assert a == b and hash(a) == hash(b)
    assert a.to_json() == b.to_json()
    assert HashRing.from_json(a.to_json()) == a
    assert HashRing.from_dict(a.to_dict()).get_shard("x") == a.get_shard("x")
    assert a != HashRing(FOUR)


def test_changes_return_new_rings() -> None:
    ring = HashRing(FOUR)
    bigger = ring.add_shard("shard-5")
    assert ring.shard_ids == tuple(FOUR)
    assert "shard-5" in bigger and "shard-5" not in ring
    assert bigger.remove_shard("shard-5") == ring


def _random_keys(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(n)]


def test_four_equal_shards_are_balanced_within_5_percent_over_a_million_keys() -> None:
    ring = HashRing(FOUR)
    counts = Counter(map(ring.get_shard, _random_keys(1_000_000)))
    assert max(counts.values()) <= 1.05 * 1_000_000 / 4


def test_adding_a_fifth_shard_moves_about_a_fifth_of_keys_and_only_to_it() -> None:
    ring = HashRing(FOUR)
    bigger = ring.add_shard("shard-5")
    keys = _random_keys(200_000)
    moved = [(ring.get_shard(k), bigger.get_shard(k)) for k in keys]
    changed = [(a, b) for a, b in moved if a != b]
    assert all(b == "shard-5" for _, b in changed)
    assert 0.18 <= len(changed) / len(keys) <= 0.22


def test_weight_two_shard_gets_twice_the_keys() -> None:
    ring = HashRing(FOUR, weights={"shard-4": 2})
    counts = Counter(map(ring.get_shard, _random_keys(200_000)))
    mean_other = sum(counts[s] for s in FOUR[:3]) / 3
    assert counts["shard-4"] / mean_other == pytest.approx(2.0, rel=0.05)


@settings(max_examples=25, deadline=None)
@given(
    members=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True),
    new=st.text(min_size=1, max_size=12),
    keys=st.lists(st.one_of(st.text(), st.integers(), st.uuids()), min_size=1, max_size=50),
)
def test_adding_a_shard_only_moves_keys_to_the_new_shard(
    members: list[str], new: str, keys: list[object]
) -> None:
    if new in members:
        return
    ring = HashRing(members, vnodes=64)
    bigger = ring.add_shard(new)
    for key in keys:
        before, after = ring.get_shard(key), bigger.get_shard(key)  # type: ignore[arg-type]
        assert after == before or after == new


@settings(max_examples=25, deadline=None)
@given(
    members=st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique=True),
    keys=st.lists(st.one_of(st.text(), st.integers(), st.uuids()), min_size=1, max_size=50),
)
def test_removing_a_shard_only_moves_its_own_keys(members: list[str], keys: list[object]) -> None:
    ring = HashRing(members, vnodes=64)
    smaller = ring.remove_shard(members[0])
    for key in keys:
        before = ring.get_shard(key)  # type: ignore[arg-type]
        if before != members[0]:
            assert smaller.get_shard(key) == before  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True))
def test_shares_add_up_to_one_and_segments_cover_the_ring(members: list[str]) -> None:
    ring = HashRing(members, vnodes=32)
    assert sum(ring.shares().values()) == pytest.approx(1.0)
    for key in ["a", "b", "c", 1, 2, 3]:
        point = key_hash(key)
        owners = [s.shard_id for s in ring.segments() if s.contains(point)]
        assert owners == [ring.get_shard(key)]  # type: ignore[arg-type]


def test_lookups_never_fail_while_rings_are_swapped_in_other_threads() -> None:
    holder = {"ring": HashRing(FOUR, vnodes=256)}
    failures: list[BaseException] = []
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def reader() -> None:
        keys = _random_keys(2000, seed=threading.get_ident() % 1000)
        while not stop.is_set():
            for key in keys:
                try:
                    answers[holder["ring"].get_shard(key)] += 1
                except BaseException as error:  # noqa: BLE001 - collected and asserted
                    failures.append(error)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(5, 45):
        ring = holder["ring"]
        holder["ring"] = ring.add_shard(f"shard-{i}") if i % 2 else ring.remove_shard(ring.shard_ids[-1])
    stop.set()
    for t in threads:
        t.join()
    assert not failures
    assert sum(answers.values()) > 0


def _owner_by_bisection(ring: HashRing, point: int) -> str:
    """The contract's rule itself: the first point strictly greater than ``point``, wrapping."""
    points = sorted(key_hash(f"{s}#{i}") for s in ring.shard_ids for i in range(ring.vnodes))
    owner = {key_hash(f"{s}#{i}"): s for s in ring.shard_ids for i in range(ring.vnodes)}
    index = bisect.bisect_right(points, point)
    return owner[points[index % len(points)]]


@settings(max_examples=60, deadline=None)
@given(
    shards=st.integers(min_value=1, max_value=6),
    vnodes=st.sampled_from([1, 2, 3, 17, 64]),
    keys=st.lists(st.one_of(st.integers(), st.text(max_size=8)), min_size=1, max_size=40),
)
def test_the_point_index_answers_what_the_bisection_of_the_points_answers(
    shards: int, vnodes: int, keys: list[object]
) -> None:
    ring = HashRing([f"s{i}" for i in range(shards)], vnodes=vnodes)
    points = sorted(key_hash(f"s{i}#{j}") for i in range(shards) for j in range(vnodes))
    # the keys given, and the ring's own points and their neighbours (the edges of a bucket's scan)
    for key in keys:
        assert ring.get_shard(key) == _owner_by_bisection(ring, key_hash(key)), key
    for point in points:
        for probe in (point - 1, point, point + 1):
            if 0 <= probe < 2**64:
                assert ring.shard_for_point(probe) == _owner_by_bisection(ring, probe)
    for edge in (0, 2**64 - 1):
        assert ring.shard_for_point(edge) == _owner_by_bisection(ring, edge)
