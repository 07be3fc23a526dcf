"""Which tables a rebalance moves, by which key column, in which order.

Sharded tables are copied parents first (the metadata's foreign-key order) and deleted children
first. Reference tables (the same rows on every shard) are copied whole to a shard that joins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, MetaData, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, registry

from ..declarative import REFERENCE_ATTR, SHARD_KEY_ATTR, sharding_of, table_sharding
from ..errors import RebalanceError


@dataclass(frozen=True)
class ShardedTable:
    """A table whose rows live on the shard of the value in ``key``."""

    table: Table
    key: Column[Any]

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def key_sql_type(self) -> str:
        return str(self.key.type.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class TableSet:
    """The sharded tables in foreign-key order (parents first) and the reference tables."""

    sharded: tuple[ShardedTable, ...]
    reference: tuple[Table, ...] = ()

    def __post_init__(self) -> None:
        if not self.sharded:
            raise RebalanceError("no sharded tables to move: declare __shard_key__ on the models")
        types = {t.key_sql_type for t in self.sharded}
        if len(types) != 1:
            detail = ", ".join(f"{t.name}.{t.key.name}: {t.key_sql_type}" for t in self.sharded)
            raise RebalanceError(f"every sharded table's key column must have one SQL type; got {detail}")
        for spec in self.sharded:
            if not spec.table.primary_key.columns:
                raise RebalanceError(f"sharded table {spec.name!r} has no primary key; it cannot be moved")

    @property
    def key_sql_type(self) -> str:
        return self.sharded[0].key_sql_type

    @property
    def key_sources(self) -> tuple[ShardedTable, ...]:
        """The tables whose keys are all the keys: a table whose key column is a declared foreign
        key to another sharded table's key holds no key its parent lacks, so it is not scanned."""
        by_table = {s.table: s for s in self.sharded}
        roots = []
        for spec in self.sharded:
            covered = any(
                element.parent is spec.key
                and parent is not None
                and parent is not spec
                and element.column is parent.key
                for fk in spec.table.foreign_key_constraints
                for parent in [by_table.get(fk.referred_table)]
                for element in fk.elements
            )
            if not covered:
                roots.append(spec)
        return tuple(roots)

    @property
    def tables(self) -> list[Table]:
        """Every table a new shard needs (sharded and reference)."""
        return [*(t.table for t in self.sharded), *self.reference]


TableSource = type[DeclarativeBase] | registry | MetaData | TableSet | Sequence[ShardedTable]


def table_set(source: Any) -> TableSet:
    """The tables to move, from a declarative base/registry (``__shard_key__`` and
    ``__shard_reference__``), a MetaData (``Table.info["shard_key"]``/``["shard_reference"]``),
    or an explicit list of :class:`ShardedTable`."""
    if isinstance(source, TableSet):
        return source
    if isinstance(source, MetaData):
        return _from_metadata(source)
    if isinstance(source, registry) or (isinstance(source, type) and hasattr(source, "registry")):
        reg = source if isinstance(source, registry) else source.registry
        return _from_registry(reg)
    specs = list(source)
    if not all(isinstance(s, ShardedTable) for s in specs):
        raise RebalanceError("tables must be a declarative base, a MetaData or a list of ShardedTable")
    return TableSet(tuple(_fk_order(specs)))


def _fk_order(specs: Iterable[ShardedTable]) -> list[ShardedTable]:
    specs = list(specs)
    metadatas = {s.table.metadata for s in specs}
    order: dict[Table, int] = {}
    for metadata in metadatas:
        for i, table in enumerate(metadata.sorted_tables):
            order[table] = i
    return sorted(specs, key=lambda s: order.get(s.table, 0))


def _from_registry(reg: registry) -> TableSet:
    """Every mapped table, as :mod:`sa_shardkit.declarative` reads its model (undeclared ones are
    not moved; a sub-table without the key column cannot be)."""
    sharded: list[ShardedTable] = []
    reference: list[Table] = []
    for mapper in reg.mappers:
        table = mapper.local_table
        seen = [*reference, *(s.table for s in sharded)]
        if not isinstance(table, Table) or any(t is table for t in seen) or not _declares(mapper.class_):
            continue
        declared = sharding_of(mapper)  # a malformed declaration raises NotShardedError naming the model
        if declared.reference:
            reference.append(table)
        elif declared.column_name is not None and declared.column_name in table.c:
            sharded.append(ShardedTable(table, table.c[declared.column_name]))
    return TableSet(tuple(_fk_order(sharded)), tuple(_sorted_reference(reference)))


def _declares(cls: type) -> bool:
    return any(hasattr(cls, name) for name in (SHARD_KEY_ATTR, REFERENCE_ATTR))


def _from_metadata(metadata: MetaData) -> TableSet:
    """Every table of ``metadata``, as :func:`sa_shardkit.declarative.table_sharding` reads it
    (``Table.info``, or the model mapping it)."""
    sharded: list[ShardedTable] = []
    reference: list[Table] = []
    for table in metadata.sorted_tables:
        declared = table_sharding(table)
        if declared is None:
            continue
        if declared.reference:
            reference.append(table)
        elif declared.column_name is not None:
            sharded.append(ShardedTable(table, table.c[declared.column_name]))
    return TableSet(tuple(sharded), tuple(reference))


def _sorted_reference(tables: list[Table]) -> list[Table]:
    order = {t: i for m in {t.metadata for t in tables} for i, t in enumerate(m.sorted_tables)}
    return sorted(tables, key=lambda t: order.get(t, 0))
