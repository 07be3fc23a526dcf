"""The lookup tables the shards hold, read from their catalogs (no model imported).

A process that never imported the application's models (``shardkit rebalance`` from the CLI with
another ``--models``) still has to move every lookup's rows with their values' ring positions.
Every lookup table is named ``shardkit_lookup_<table>_<column>`` and carries the comment
:func:`~.declaration.lookup_comment` wrote (``create_all`` and Alembic autogenerate both keep it),
which names its owner table, looked-up column and shard key column: :func:`catalog_lookups`
reflects each such table and rebuilds its :class:`~.declaration.LookupIndex` (same name, so the
same advisory locks and state row as the application's). A table without that comment is still
moved, but a unique conflict on its target cannot be settled by its owning rows (the mover then
stops with ``RebalanceError``, nothing lost).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, Table, text

from .declaration import TABLE_PREFIX, LookupIndex, lookup_state_table, parse_lookup_comment

if TYPE_CHECKING:
    from ..manager import ShardManager

log = logging.getLogger("sa_shardkit.lookups")

_LISTED = text(
    "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class AS c "
    "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() "
    "AND left(c.relname, length(:prefix)) = :prefix AND c.relname <> :state ORDER BY 1"
)


def catalog_lookups(manager: ShardManager, shard_ids: list[str] | None = None) -> list[LookupIndex]:
    """Every lookup table on ``shard_ids`` (default: every configured shard), by name, each
    reflected once (on the first shard that has it)."""
    ids = list(manager.shard_ids if shard_ids is None else shard_ids)
    # the listings in one parallel round (a move asks twice: 5-25 ms one shard after the other)
    listed = manager.run_on_all(
        _LISTED.text, {"prefix": TABLE_PREFIX, "state": lookup_state_table.name}, shard_ids=ids
    )
    found: dict[str, LookupIndex] = {}
    for shard_id in ids:
        missing = [(name, comment) for name, comment in listed[shard_id] if name not in found]
        if not missing:
            continue
        with manager.connect(shard_id) as conn:
            for name, comment in missing:
                found[name] = _index(Table(name, MetaData(), autoload_with=conn), comment)
            conn.rollback()
    return [found[name] for name in sorted(found)]


def _index(table: Table, comment: str | None) -> LookupIndex:
    value, key = table.c.value, table.c.shard_key
    unique = [c.name for c in table.primary_key.columns] == ["value"]
    described = parse_lookup_comment(comment)
    if described is None:
        log.warning("lookup table %s has no sa_shardkit comment: its owner is unknown", table.name)
        return LookupIndex(table.name, table.name, "value", unique, table, value, "shard_key", key, table)
    owner_name, column_name, key_name, _ = described
    owner = Table(owner_name, MetaData(), _column(column_name, value), _column(key_name, key))
    return LookupIndex(
        table.name,
        owner_name,
        column_name,
        unique,
        owner,
        owner.c[column_name],
        key_name,
        owner.c[key_name],
        table,
    )


def _column(name: str, like: Column[Any]) -> Column[Any]:
    return Column(name, like.type)


__all__ = ["catalog_lookups"]
