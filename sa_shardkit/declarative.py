"""Reading the shard-key declaration of a model (or a Core table).

A mapped class declares how it is sharded with a class attribute, nothing else::

    class Order(Base):
        __tablename__ = "orders"
        __shard_key__ = "customer_id"      # the mapped attribute whose value picks the shard

    class Product(Base):
        __tablename__ = "products"
        __shard_reference__ = True         # a reference table: the same rows on every shard

A Core :class:`~sqlalchemy.schema.Table` used without a mapper declares the same through its
``info``: ``Table(..., info={"shard_key": "customer_id"})`` (a column name) or
``info={"shard_reference": True}``. Anything else used through a sharded session raises
:class:`~sa_shardkit.errors.NotShardedError`.

Why the key must be in every sharded table's primary key (or a unique constraint): PostgreSQL
enforces uniqueness per server only, and the rows of one key (a customer, its orders and items) must
meet on one shard for a transaction or a join to cover them. Carrying the key in the primary key
makes both hold by construction; a warning says so when a model does not.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import UniqueConstraint, inspect
from sqlalchemy.orm import ColumnProperty, Mapper
from sqlalchemy.orm.mapper import _all_registries
from sqlalchemy.sql.expression import Alias, FromClause, TableClause

from .errors import NotShardedError

SHARD_KEY_ATTR = "__shard_key__"
REFERENCE_ATTR = "__shard_reference__"
TABLE_KEY_INFO = "shard_key"
TABLE_REFERENCE_INFO = "shard_reference"


class ShardKeyWarning(UserWarning):
    """A sharded model whose shard key is in neither its primary key nor a unique constraint."""


@dataclass(frozen=True)
class Sharding:
    """How one model or table is sharded: by a key column, or as a reference table."""

    name: str
    """The model (or table) name, for messages."""
    attribute: str | None = None
    """The mapped attribute holding the key (``None`` for reference tables and Core tables)."""
    column_name: str | None = None
    """The key's column name in the table."""
    column_key: str | None = None
    """The key column's ``.key`` (the name Core insert parameters use)."""

    @property
    def reference(self) -> bool:
        return self.column_name is None

    def describe_key(self) -> str:
        return f"{self.name}.{self.attribute or self.column_name}"


class ReferenceTable:
    """Optional mixin: ``class Country(ReferenceTable, Base)`` marks a reference table."""

    __shard_reference__: ClassVar[bool] = True


_by_mapper: weakref.WeakKeyDictionary[Mapper[Any], Sharding] = weakref.WeakKeyDictionary()
SHARDING_BY_MAPPER_REF: dict[weakref.ref[Mapper[Any]], Sharding] = _by_mapper.data  # type: ignore[attr-defined]
"""``weakref.ref(mapper)`` -> what :func:`sharding_of` found for it: the flush's lookup without a call."""
_by_table: weakref.WeakKeyDictionary[FromClause, Sharding | None] = weakref.WeakKeyDictionary()


def sharding_of(entity: Any) -> Sharding:
    """The declaration of a mapped class, mapper or instance; :class:`NotShardedError` when absent."""
    mapper = entity if isinstance(entity, Mapper) else inspect(entity).mapper
    found = _by_mapper.get(mapper)
    if found is None:
        found = _read_mapper(mapper)
        _by_mapper[mapper] = found
        for table in mapper.tables:
            _by_table.setdefault(table, _for_table(found, table))
    return found


def table_sharding(table: FromClause) -> Sharding | None:
    """The declaration covering a table (or an alias of one); ``None`` when nothing declares it."""
    try:
        return _by_table[table]
    except (KeyError, TypeError):
        pass
    base = base_table(table)
    if base is None:
        return None  # a subquery, join, function, ...: never declared
    if base is not table:
        return table_sharding(base)
    found = _table_declaration(table)
    _by_table[table] = found
    return found


def base_table(table: FromClause) -> FromClause | None:
    """The underlying table of an (annotated) table or alias; ``None`` for subqueries, joins, ..."""
    table = table._deannotate()  # type: ignore[assignment]
    while isinstance(table, Alias):
        table = table.element  # type: ignore[assignment]
    return table if isinstance(table, TableClause) else None


def mapper_for_table(table: FromClause) -> Mapper[Any] | None:
    """The first mapper persisting ``table``, if any (used only to name undeclared models)."""
    for registry in list(_all_registries()):
        for mapper in list(registry.mappers):
            if table in mapper.tables:
                return mapper
    return None


def sharded_table_names() -> list[str]:
    """Names of the tables with a shard-key column this process knows: every mapped table whose
    model declares a key, and the Core tables declared by ``info`` that routing has met."""
    tables: list[FromClause] = [
        t for registry in list(_all_registries()) for m in list(registry.mappers) for t in m.tables
    ]
    tables += [t for t, declared in list(_by_table.items()) if declared is not None]
    names = set()
    for table in tables:
        declared = table_sharding(table)
        name = getattr(table, "name", None)
        if declared is not None and declared.column_name is not None and isinstance(name, str):
            names.add(name)
    return sorted(names)


def _table_declaration(table: FromClause) -> Sharding | None:
    info = getattr(table, "info", None) or {}
    name = getattr(table, "name", str(table))
    if info.get(TABLE_REFERENCE_INFO):
        return Sharding(name)
    if info.get(TABLE_KEY_INFO):
        column = table.c[info[TABLE_KEY_INFO]]
        return Sharding(name, None, column.name, column.key)
    mapper = mapper_for_table(table)
    if mapper is None:
        return None
    try:
        declared = sharding_of(mapper)
    except NotShardedError:
        return None
    return _for_table(declared, table)


def _for_table(declared: Sharding, table: FromClause) -> Sharding | None:
    if declared.column_name is None or declared.column_name in table.c:
        return declared
    return None  # e.g. a joined-inheritance sub-table without the key column


def _read_mapper(mapper: Mapper[Any]) -> Sharding:
    cls = mapper.class_
    key = getattr(cls, SHARD_KEY_ATTR, None)
    reference = bool(getattr(cls, REFERENCE_ATTR, False))
    name = cls.__name__
    if key is not None and reference:
        raise NotShardedError(f"{name} declares both {SHARD_KEY_ATTR} and {REFERENCE_ATTR}; pick one")
    if reference:
        return Sharding(name)
    if key is None:
        raise NotShardedError(
            f"{name} declares no shard key: add {SHARD_KEY_ATTR} = '<attribute>' to the class, or "
            f"{REFERENCE_ATTR} = True if every shard holds the same rows"
        )
    if not isinstance(key, str):
        raise NotShardedError(f"{name}.{SHARD_KEY_ATTR} must be an attribute name, got {key!r}")
    prop = mapper.attrs.get(key)
    if not isinstance(prop, ColumnProperty) or len(prop.columns) != 1:
        raise NotShardedError(f"{name}.{SHARD_KEY_ATTR} = {key!r} names no mapped column attribute")
    column = prop.columns[0]
    _warn_unless_unique(name, key, column, mapper)
    return Sharding(name, key, column.name, column.key)


def _warn_unless_unique(name: str, key: str, column: Any, mapper: Mapper[Any]) -> None:
    if column in mapper.primary_key:
        return
    for constraint in getattr(mapper.local_table, "constraints", ()):
        if isinstance(constraint, UniqueConstraint) and column.name in constraint.columns:
            return
    warnings.warn(
        f"{name}.{key} is the shard key but is in neither the primary key nor a unique constraint: "
        "uniqueness holds per shard only, so include it",
        ShardKeyWarning,
        stacklevel=4,
    )


def shard_key_value(sharding: Sharding, instance: object) -> Any:
    """The instance's shard key value (``None`` when unset)."""
    assert sharding.attribute is not None
    return instance.__dict__.get(sharding.attribute)
