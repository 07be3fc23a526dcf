"""Checking where rows physically are: every key's rows on the shard the ring assigns."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..manager import ShardManager
from ..ring import HashRing
from .tables import TableSource, table_set


def misplaced_rows(
    manager: ShardManager, ring: HashRing, tables: TableSource, shard_ids: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """``{shard: {table: rows}}`` of rows stored on a shard that ``ring`` does not assign their key to.

    Empty when every row is where it belongs. Scans every shard's keys (not for hot paths).
    """
    spec = table_set(tables)
    ids = shard_ids or list(manager.shard_ids)

    def scan(conn: Connection) -> dict[str, list[tuple[Any, int]]]:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t.key, func.count()).group_by(t.key))]  # type: ignore[misc]
            for t in spec.sharded
        }

    found = manager.run_on_all(scan, shard_ids=ids)
    report: dict[str, dict[str, int]] = {}
    for shard_id, per_table in found.items():
        for table, counts in per_table.items():
            wrong = sum(n for key, n in counts if ring.get_shard(key) != shard_id)
            if wrong:
                report.setdefault(shard_id, {})[table] = wrong
    return report
