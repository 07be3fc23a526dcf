"""Lookup tables move with their value's ring position (see :mod:`.positioned`).

A lookup row ``(value, shard_key)`` lives on the shard the ring gives ``value``; when a move
changes that shard, the row goes to the target ring's shard with the owning table's keys. A unique
lookup's conflict (another key under the same value on the target) is settled under the value's
lock by which key's owning row exists; once every row moved, the lookup is trusted under the new
ring as it was under the old one (no rebuild). The lookups are found on the shards themselves too,
so a mover that never imported their models (the CLI with another ``--models``) moves them.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection, Row

from ..lookups.build import carry_readiness, settle_move_conflict
from ..lookups.catalog import catalog_lookups
from ..lookups.declaration import LookupIndex, declared_lookups
from ..manager import ShardManager
from ..ring import HashRing
from .positioned import PositionedTable, register_positioned
from .tables import TableSet


def lookup_positioned(manager: ShardManager, tables: TableSet) -> Iterable[PositionedTable]:
    """Every lookup to move: those of the sharded tables that move, and every lookup table the
    shards hold (:func:`~sa_shardkit.lookups.catalog.catalog_lookups`: its model need not be
    imported, nor given to the mover). A declared lookup is used as declared."""
    owners = {id(spec.table) for spec in tables.sharded}
    chosen = {i.name: i for i in declared_lookups() if id(i.owner) in owners}
    declared = {i.name: i for i in declared_lookups()}
    for found in catalog_lookups(manager):
        chosen.setdefault(found.name, declared.get(found.name, found))
    for name in sorted(chosen):
        index = chosen[name]
        yield PositionedTable(
            index.table,
            "value",
            name=f"lookup {index.describe()}",
            on_conflict=partial(_conflict, index) if index.unique else None,
            on_moved=partial(_moved, index),
            create_missing=True,
        )


def _conflict(
    index: LookupIndex, manager: ShardManager, conn: Connection, source: Row[Any], target: Row[Any]
) -> bool:
    return settle_move_conflict(manager, index, conn, source.shard_key, target.shard_key, source.value)


def _moved(index: LookupIndex, manager: ShardManager, old: HashRing, new: HashRing) -> None:
    carry_readiness(manager, index, old, new)


def register() -> None:
    register_positioned(lookup_positioned)


__all__ = ["lookup_positioned", "register"]
