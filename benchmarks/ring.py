"""Ring lookups per second: sa_shardkit.HashRing vs uhashring (default configuration), same run.

Run: python benchmarks/ring.py
"""

from __future__ import annotations

import random
import time
import uuid

from uhashring import HashRing as UHashRing

from sa_shardkit.ring import HashRing

SHARDS = ["shard-1", "shard-2", "shard-3", "shard-4"]
N_KEYS = 200_000
ROUNDS = 5


def lookups_per_second(lookup: object, keys: list[str]) -> float:
    fn = lookup  # bound method
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for key in keys:
            fn(key)  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return len(keys) / best


def main() -> None:
    rnd = random.Random(1)
    keys = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(N_KEYS)]
    ours = HashRing(SHARDS)
    theirs = UHashRing(nodes=SHARDS)
    ours_rate = lookups_per_second(ours.get_shard, keys)
    theirs_rate = lookups_per_second(theirs.get_node, keys)
    int_keys = [rnd.getrandbits(63) for _ in range(N_KEYS)]
    ours_int = lookups_per_second(ours.get_shard, int_keys)  # type: ignore[arg-type]
    print(f"keys: {N_KEYS:,} UUID strings, best of {ROUNDS} rounds, 4 shards")
    print(f"sa_shardkit HashRing (vnodes={ours.vnodes}): {ours_rate:12,.0f} lookups/s")
    print(f"sa_shardkit HashRing, int keys:        {ours_int:12,.0f} lookups/s")
    print(f"uhashring HashRing (default):          {theirs_rate:12,.0f} lookups/s")
    print(f"ratio sa_shardkit / uhashring:         {ours_rate / theirs_rate:12.2f}x")


if __name__ == "__main__":
    main()
