"""One transaction per shard, shards in parallel: the fleet-wide steps of a move (version bumps,
the move record) wait for the slowest shard, not for the sum of all."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.engine import Connection

from ..manager import ShardManager


def for_shards(
    manager: ShardManager, work: Callable[[Connection, str], None], shard_ids: Iterable[str]
) -> None:
    """``work(conn, shard_id)`` in one transaction per shard, shards in parallel; the first
    failure is raised after all have finished."""
    ids = list(shard_ids)
    if len(ids) <= 1:
        for shard_id in ids:
            with manager.connect(shard_id) as conn, conn.begin():
                work(conn, shard_id)
        return
    with ThreadPoolExecutor(max_workers=min(8, len(ids)), thread_name_prefix="shardkit-state") as pool:
        futures = [pool.submit(_in_transaction, manager, work, s) for s in ids]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _in_transaction(manager: ShardManager, work: Callable[[Connection, str], None], shard_id: str) -> None:
    with manager.connect(shard_id) as conn, conn.begin():
        work(conn, shard_id)


__all__ = ["for_shards"]
