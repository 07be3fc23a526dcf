"""Consistent hashing with virtual nodes and weights.

The data contract (never change it silently: rows are placed by it, golden-vector tests pin it):

* hash function: XXH3 64-bit, seed 0 (``xxhash.xxh3_64_intdigest``), an unsigned 64-bit integer;
* canonical key bytes (:func:`key_bytes`): ``str`` -> UTF-8; ``int`` -> its decimal text in ASCII
  (``-12`` -> ``b"-12"``); ``uuid.UUID`` -> its lowercase hyphenated text (``str(uuid)``) in ASCII;
  ``bytes`` as given. So ``5`` and ``"5"``, and a UUID and its text, live on the same shard;
* virtual-node labels: ``f"{shard_id}#{i}"`` in UTF-8 for ``i`` in ``range(round(vnodes * weight))``;
* a key belongs to the first virtual node whose point is strictly greater than the key's hash,
  wrapping around to the first point; equal points are ordered by shard id.

A :class:`HashRing` is immutable: changes return a new ring, so readers in other threads always see a
complete ring (swap the reference, never mutate in place).
"""

from __future__ import annotations

import json
import math
import uuid
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

from xxhash import xxh3_64_intdigest

from .errors import (
    DuplicateShardError,
    EmptyRingError,
    InvalidShardKeyError,
    InvalidWeightError,
    UnknownShardError,
)

ShardKey = str | int | uuid.UUID | bytes
"""Types a shard key may have."""

HASH_NAME = "xxh3_64"
DEFAULT_VNODES = 2048
"""Virtual nodes per unit of weight: 2048 keeps 4 equal shards within ~4% of the mean share."""

RING_SPACE = 1 << 64

_INDEX_BITS_MAX = 20
"""At most 2**20 buckets in a ring's point index (4 MiB): a 256-shard ring of 2048 vnodes each
still averages half a point per bucket."""


def key_bytes(key: object) -> bytes:
    """The canonical byte form of a shard key (see the module docstring)."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bool) or key is None:
        raise InvalidShardKeyError(f"shard key must not be {key!r}")
    if isinstance(key, int):
        return str(key).encode("ascii")
    if isinstance(key, uuid.UUID):
        return str(key).encode("ascii")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidShardKeyError(
        f"shard key {key!r} has type {type(key).__name__}; expected str, int, uuid.UUID or bytes"
    )


def key_hash(key: object) -> int:
    """The key's position on the ring: XXH3-64 of :func:`key_bytes`."""
    if type(key) is str:  # fast path for the common case
        return xxh3_64_intdigest(key.encode("utf-8"))
    return xxh3_64_intdigest(key_bytes(key))


def _vnode_point(shard_id: str, index: int) -> int:
    return xxh3_64_intdigest(f"{shard_id}#{index}".encode())


@lru_cache(maxsize=256)
def _shard_points(shard_id: str, count: int) -> dict[int, str]:
    """A shard's virtual-node points, hashed once per process: a ring that differs from the last
    one by a shard (every version bump of a move) then hashes only that shard's points."""
    return {_vnode_point(shard_id, i): shard_id for i in range(count)}


def _sorted_points(counts: Mapping[str, int]) -> list[tuple[int, str]]:
    """Every shard's points in ring order (ties, which 64-bit hashes make vanishingly rare, by id)."""
    owner: dict[int, str] = {}
    total = 0
    for shard_id, count in counts.items():
        points = _shard_points(shard_id, count)
        owner.update(points)
        total += len(points)
    if len(owner) != total:  # a point shared by two shards: order those by id, as always
        return sorted(
            (p, s) for shard_id, count in counts.items() for p, s in _shard_points(shard_id, count).items()
        )
    return [(p, owner[p]) for p in sorted(owner)]


def _point_index(points: list[int]) -> tuple[int, array[int]]:
    """``(shift, first)``: ``first[h >> shift]`` counts the points below the start of the bucket
    holding hash ``h``, so the point that owns ``h`` (``bisect_right(points, h)``) is found by
    stepping from there past the few points of that bucket. About two buckets per point."""
    bits = min(_INDEX_BITS_MAX, max(1, (2 * len(points) - 1).bit_length()))
    shift = 64 - bits
    counts = [0] * (1 << bits)
    for point in points:
        counts[point >> shift] += 1
    first = array("I", accumulate(counts, initial=0))
    first.pop()  # the total: no bucket starts there
    return shift, first


@dataclass(frozen=True)
class Segment:
    """A half-open arc ``(start, end]`` of the ring owned by one shard; ``start > end`` wraps."""

    start: int
    end: int
    shard_id: str

    def contains(self, point: int) -> bool:
        if self.start < self.end:
            return self.start < point <= self.end
        return point > self.start or point <= self.end


class HashRing:
    """An immutable consistent-hash ring mapping shard keys to shard ids."""

    __slots__ = (
        "_weights",
        "_vnodes",
        "_points",
        "_owners",
        "_wrapped_owners",
        "_size",
        "_probe",
        "_first",
        "_shift",
    )

    def __init__(
        self,
        shard_ids: Iterable[str],
        *,
        vnodes: int = DEFAULT_VNODES,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        ids = list(shard_ids)
        if not ids:
            raise EmptyRingError("a hash ring needs at least one shard")
        seen: set[str] = set()
        for shard_id in ids:
            if not isinstance(shard_id, str) or not shard_id:
                raise InvalidShardKeyError(f"shard id must be a non-empty str, got {shard_id!r}")
            if shard_id in seen:
                raise DuplicateShardError(f"shard id {shard_id!r} appears twice in the ring")
            seen.add(shard_id)
        if not isinstance(vnodes, int) or isinstance(vnodes, bool) or vnodes < 1:
            raise InvalidWeightError(f"vnodes must be a positive int, got {vnodes!r}")
        weights = dict(weights or {})
        for shard_id in weights:
            if shard_id not in seen:
                raise UnknownShardError(f"weight given for unknown shard {shard_id!r}")
        resolved: dict[str, float] = {}
        for shard_id in sorted(ids):
            weight = weights.get(shard_id, 1)
            _check_weight(shard_id, weight)
            # 2 and 2.0 are the same weight: store one form so equal rings serialize identically
            resolved[shard_id] = int(weight) if float(weight).is_integer() else float(weight)
        self._weights = resolved
        self._vnodes = vnodes
        pairs = _sorted_points({s: max(1, round(vnodes * w)) for s, w in resolved.items()})
        self._points = [p for p, _ in pairs]
        self._owners = [s for _, s in pairs]
        self._wrapped_owners = [*self._owners, self._owners[0]]  # index len(points) wraps to the first
        self._size = len(pairs)
        self._probe = [*self._points, RING_SPACE]  # a sentinel above every hash ends each scan
        self._shift, self._first = _point_index(self._points)

    # -- lookups -------------------------------------------------------------------------------

    def get_shard(self, key: ShardKey, _hash: Any = xxh3_64_intdigest) -> str:
        """The shard id that owns ``key``."""
        # Hot path: the hash bound as a default, and the point index instead of a bisection
        # (13 comparisons of 64-bit ints for 4 shards, 19 for 256; here about one)
        if type(key) is str:
            point = _hash(key.encode())
        elif type(key) is int:  # key_bytes' form of an int (not a bool: its type is bool)
            point = _hash(str(key).encode())
        else:
            point = _hash(key_bytes(key))
        probe = self._probe  # shard_for_point(point), without the call
        index = self._first[point >> self._shift]
        while probe[index] <= point:
            index += 1
        return self._wrapped_owners[index]  # type: ignore[no-any-return]

    def shard_for_point(self, point: int) -> str:
        """The shard owning a ring position (a value of :func:`key_hash`); get_shard's scan."""
        probe = self._probe
        index = self._first[point >> self._shift]
        while probe[index] <= point:
            index += 1
        return self._wrapped_owners[index]  # type: ignore[no-any-return]

    def segments(self) -> list[Segment]:
        """The ring as arcs, adjacent arcs of one shard merged, in ring order."""
        merged: list[Segment] = []
        prev = self._points[-1]
        for point, owner in zip(self._points, self._owners, strict=True):
            if merged and merged[-1].shard_id == owner:
                merged[-1] = Segment(merged[-1].start, point, owner)
            else:
                merged.append(Segment(prev, point, owner))
            prev = point
        if len(merged) > 1 and merged[0].shard_id == merged[-1].shard_id:
            merged[0] = Segment(merged[-1].start, merged[0].end, merged[0].shard_id)
            merged.pop()
        return merged

    def segment_ends(self) -> list[int]:
        """The ``end`` of every arc of :meth:`segments` (the points whose successor has another
        owner), without building the arcs."""
        owners = self._owners
        ends = [
            p
            for p, o, after in zip(self._points, owners, self._wrapped_owners[1:], strict=True)
            if o != after
        ]
        return ends or [self._points[-1]]

    def shares(self) -> dict[str, float]:
        """Each shard's fraction of the ring (the expected fraction of keys)."""
        share = dict.fromkeys(self._weights, 0.0)
        for segment in self.segments():
            share[segment.shard_id] += ((segment.end - segment.start) % RING_SPACE) / RING_SPACE
        if len(self._weights) == 1:
            return {s: 1.0 for s in share}
        return share

    # -- membership ----------------------------------------------------------------------------

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(self._weights)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def __contains__(self, shard_id: object) -> bool:
        return shard_id in self._weights

    def __len__(self) -> int:
        return len(self._weights)

    def add_shard(self, shard_id: str, weight: float = 1) -> HashRing:
        """A new ring with ``shard_id`` added; this ring is unchanged."""
        if shard_id in self._weights:
            raise DuplicateShardError(f"shard {shard_id!r} is already on the ring")
        _check_weight(shard_id, weight)
        return HashRing(
            [*self._weights, shard_id], vnodes=self._vnodes, weights={**self._weights, shard_id: weight}
        )

    def remove_shard(self, shard_id: str) -> HashRing:
        """A new ring without ``shard_id``; this ring is unchanged."""
        if shard_id not in self._weights:
            raise UnknownShardError(f"cannot remove unknown shard {shard_id!r}")
        rest = {s: w for s, w in self._weights.items() if s != shard_id}
        if not rest:
            raise EmptyRingError(f"removing {shard_id!r} would leave the ring empty")
        return HashRing(rest, vnodes=self._vnodes, weights=rest)

    def with_weight(self, shard_id: str, weight: float) -> HashRing:
        """A new ring with one shard's weight changed."""
        if shard_id not in self._weights:
            raise UnknownShardError(f"unknown shard {shard_id!r}")
        return HashRing(self._weights, vnodes=self._vnodes, weights={**self._weights, shard_id: weight})

    # -- identity and serialization ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; equal rings give equal dicts."""
        return {
            "hash": HASH_NAME,
            "vnodes": self._vnodes,
            "shards": [{"id": s, "weight": w} for s, w in self._weights.items()],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HashRing:
        hash_name = data.get("hash", HASH_NAME)
        if hash_name != HASH_NAME:
            raise InvalidShardKeyError(f"ring uses hash {hash_name!r}; this version knows {HASH_NAME!r}")
        shards = data["shards"]
        return cls(
            [s["id"] for s in shards],
            vnodes=int(data.get("vnodes", DEFAULT_VNODES)),
            weights={s["id"]: s.get("weight", 1) for s in shards},
        )

    @classmethod
    def from_json(cls, text: str) -> HashRing:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._vnodes == other._vnodes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self._vnodes, tuple(self._weights.items())))

    def __repr__(self) -> str:
        members = ", ".join(s if w == 1 else f"{s}(w={w:g})" for s, w in self._weights.items())
        return f"HashRing([{members}], vnodes={self._vnodes})"


@dataclass(frozen=True)
class MovedArc:
    """Keys whose ring position is in ``[start, end)`` (wrapping when ``start >= end``) move from
    ``source`` on one ring to ``target`` on another."""

    start: int
    end: int
    source: str
    target: str

    @property
    def share(self) -> float:
        """Fraction of the ring (and so, on average, of the keys) in this arc."""
        return ((self.end - self.start) % RING_SPACE) / RING_SPACE


def moved_arcs(old: HashRing, new: HashRing) -> list[MovedArc]:
    """The arcs whose owner differs between ``old`` and ``new``, adjacent arcs of one move merged.

    The one computation of "what a ring change moves": rebalance plans and ``shardkit ring`` use it.
    Memoized per pair of rings (they are immutable): it walks every vnode (25-100 ms at 5 x 2,048),
    and a move asks for it from every source mover and every parsed ring state.
    """
    return list(_moved_arcs(old, new))


@lru_cache(maxsize=32)
def _moved_arcs(old: HashRing, new: HashRing) -> tuple[MovedArc, ...]:
    bounds = sorted({*old.segment_ends(), *new.segment_ends()})
    old_points, old_owners = old._points, old._wrapped_owners
    new_points, new_owners = new._points, new._wrapped_owners
    arcs: list[MovedArc] = []
    run: tuple[int, str, str] | None = None  # (start, source, target) of the arc being extended
    for start in bounds:
        # every position in [start, end) has the same first vnode point above it in both rings
        source = old_owners[bisect_right(old_points, start)]
        target = new_owners[bisect_right(new_points, start)]
        if run is not None and (source == target or (run[1], run[2]) != (source, target)):
            arcs.append(MovedArc(run[0], start, run[1], run[2]))
            run = None
        if source != target and run is None:
            run = (start, source, target)
    if run is not None:
        arcs.append(MovedArc(run[0], bounds[0], run[1], run[2]))
    if len(arcs) > 1:
        first, last = arcs[0], arcs[-1]
        if last.end == first.start and (last.source, last.target) == (first.source, first.target):
            arcs[0] = MovedArc(last.start, first.end, first.source, first.target)
            arcs.pop()
    return tuple(arcs)


def share_by_move(arcs: Iterable[MovedArc]) -> dict[tuple[str, str], float]:
    """Ring share per ``(source, target)`` pair of some arcs."""
    shares: dict[tuple[str, str], float] = {}
    for arc in arcs:
        shares[arc.source, arc.target] = shares.get((arc.source, arc.target), 0.0) + arc.share
    return shares


def moved_share(old: HashRing, new: HashRing) -> dict[tuple[str, str], float]:
    """``(source, target) -> fraction of the hash space`` that changes shard between two rings."""
    return share_by_move(moved_arcs(old, new))


def _check_weight(shard_id: str, weight: object) -> None:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise InvalidWeightError(f"weight of shard {shard_id!r} must be > 0, got {weight!r}")
