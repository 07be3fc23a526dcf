"""Declaring lookups on a model, and the lookup tables the declarations create.

A sharded model names the columns that should route queries without the shard key::

    class Order(Base):
        __tablename__ = "orders"
        __shard_key__ = "customer_id"
        __shard_lookups__ = ("order_id",)                       # value -> customer_id

    class Customer(Base):
        __shard_lookups__ = (Lookup("email", unique=True),)     # and unique across the fleet

Each lookup is a table ``shardkit_lookup_<table>_<column>`` of ``(value, shard_key)`` rows, itself
sharded by the value (a row lives on the shard the ring gives the value), added to the model's own
``MetaData`` when the class is mapped: ``create_all`` and Alembic autogenerate create it, and
autogenerate never proposes dropping it. It stores the shard key, not a shard id, so moving a
customer between shards never touches its lookup rows.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Column, DateTime, MetaData, PrimaryKeyConstraint, String, Table, event, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.mapper import _all_registries
from xxhash import xxh3_64_intdigest

from ..armed import Armed
from ..declarative import REFERENCE_ATTR, SHARD_KEY_ATTR, base_table
from ..errors import NotShardedError
from ..ring import key_bytes

LOOKUPS_ATTR = "__shard_lookups__"
TABLE_PREFIX = "shardkit_lookup_"
LOOKUP_INFO = "shardkit_lookup"


@dataclass(frozen=True)
class Lookup:
    """One declared lookup: ``attribute`` routes queries; ``unique`` makes it unique fleet-wide."""

    attribute: str
    unique: bool = False


@dataclass(eq=False)
class LookupIndex:
    """A lookup as used at run time: the owner model's column and key, and the lookup table."""

    name: str
    """The lookup table's name (also the lock namespace and the state row's key)."""
    model: str
    attribute: str
    unique: bool
    owner: Table
    column: Column[Any]
    """The owner table's looked-up column."""
    key_attribute: str
    key_column: Column[Any]
    """The owner table's shard key column."""
    table: Table

    def describe(self) -> str:
        return f"{self.model}.{self.attribute}"

    def lock_id(self, value: Any) -> int:
        """The advisory lock guarding ``value``'s entry (a signed 64-bit int, as PostgreSQL wants)."""
        digest = xxh3_64_intdigest(self.name.encode() + b"\x00" + key_bytes(value))
        return digest - (1 << 64) if digest >= 1 << 63 else digest


lookup_metadata = MetaData()
"""sa_shardkit's lookup bookkeeping; include it in ``run_migrations([...])`` (``migrations/env.py``)."""

lookup_state_table = Table(
    "shardkit_lookup_state",
    lookup_metadata,
    Column("name", String(63), nullable=False),
    Column("state", String(16), nullable=False),  # 'building' | 'ready'
    Column("progress", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("name", name="pk_shardkit_lookup_state"),
    comment="sa_shardkit lookups: whether each lookup is built (reads use it only then), build progress",
)

_by_mapper: weakref.WeakKeyDictionary[Mapper[Any], tuple[LookupIndex, ...]] = weakref.WeakKeyDictionary()
_by_table: weakref.WeakKeyDictionary[Table, dict[str, LookupIndex]] = weakref.WeakKeyDictionary()
"""owner table -> its looked-up column names -> lookup (column objects make poor dict keys)."""
_by_name: weakref.WeakValueDictionary[str, LookupIndex] = weakref.WeakValueDictionary()
ANY_DECLARED = Armed()
"""Raised (true) once a mapped class of this process declared a lookup: until then sessions skip
the lookup work (:mod:`sa_shardkit.session_hooks`). Classes are read when mapped (and those mapped
before this module was imported, when it is)."""


def lookups_of(mapper: Mapper[Any]) -> tuple[LookupIndex, ...]:
    """The lookups a mapped class declares (empty for most models; cached)."""
    found = _by_mapper.get(mapper)
    if found is None:
        found = _declare(mapper)
    return found


def lookup_for_column(column: Any) -> LookupIndex | None:
    """The lookup whose owner column is ``column`` (also annotated, or of an alias of the table)."""
    if not _by_table:
        return None
    table = getattr(column, "table", None)
    if table is None:
        return None
    base = base_table(table)
    if base is None:
        return None
    try:
        columns = _by_table.get(base)  # type: ignore[call-overload]
    except TypeError:
        return None
    if columns is None:
        return None
    name = getattr(column, "name", None)
    return columns.get(name) if isinstance(name, str) else None


def lookup_named(target: str) -> LookupIndex:
    """A lookup by ``Model.attribute`` or table name (for the CLI and the build API)."""
    for index in list(_by_name.values()):
        if target in (index.name, index.describe()):
            return index
    known = ", ".join(sorted(i.describe() for i in _by_name.values())) or "none declared"
    raise NotShardedError(f"no lookup {target!r}; declared lookups: {known}")


def declared_lookups() -> tuple[LookupIndex, ...]:
    """Every lookup of every mapped class seen so far."""
    return tuple(sorted(_by_name.values(), key=lambda i: i.name))


def _declare(mapper: Mapper[Any]) -> tuple[LookupIndex, ...]:
    raw = getattr(mapper.class_, LOOKUPS_ATTR, None)
    if not raw:
        _by_mapper[mapper] = ()
        return ()
    name = mapper.class_.__name__
    specs = [Lookup(item) if isinstance(item, str) else item for item in raw]
    if not all(isinstance(s, Lookup) for s in specs):
        raise NotShardedError(
            f"{name}.{LOOKUPS_ATTR} holds attribute names or Lookup(...) items, got {raw!r}"
        )
    key_attribute = getattr(mapper.class_, SHARD_KEY_ATTR, None)
    if getattr(mapper.class_, REFERENCE_ATTR, False) or not isinstance(key_attribute, str):
        raise NotShardedError(
            f"{name}.{LOOKUPS_ATTR} needs a sharded model ({SHARD_KEY_ATTR} = '<attribute>'): "
            "a reference table has every row on every shard"
        )
    owner = mapper.local_table
    assert isinstance(owner, Table)
    # mapper.columns, not mapper.attrs: this runs while the class is being mapped (no configure yet)
    key_column = mapper.columns.get(key_attribute)
    if key_column is None:
        raise NotShardedError(f"{name}.{SHARD_KEY_ATTR} = {key_attribute!r} names no mapped column")
    found: list[LookupIndex] = []
    for spec in specs:
        column = mapper.columns.get(spec.attribute)
        if not isinstance(column, Column):
            raise NotShardedError(
                f"{name}.{LOOKUPS_ATTR}: {spec.attribute!r} names no mapped column attribute"
            )
        if column is key_column:
            raise NotShardedError(f"{name}.{spec.attribute} is the shard key: it routes without a lookup")
        table = _lookup_table(owner, column, key_column, spec.unique)
        index = LookupIndex(
            table.name, name, spec.attribute, spec.unique, owner, column, key_attribute, key_column, table
        )
        _by_table.setdefault(owner, {})[column.name] = index
        _by_name[index.name] = index
        found.append(index)
    if found and not ANY_DECLARED:
        ANY_DECLARED.arm()
    result = tuple(found)
    _by_mapper[mapper] = result
    return result


def _lookup_table(owner: Table, column: Column[Any], key_column: Column[Any], unique: bool) -> Table:
    name = f"{TABLE_PREFIX}{owner.name}_{column.name}"
    if len(name) > 63:  # PostgreSQL's identifier limit
        name = f"{name[:50]}_{xxh3_64_intdigest(name.encode()) % 10**12:012d}"
    existing = owner.metadata.tables.get(name)
    if existing is not None:
        return existing
    pk = ["value"] if unique else ["value", "shard_key"]
    return Table(
        name,
        owner.metadata,
        Column("value", column.type, nullable=False),
        Column("shard_key", key_column.type, nullable=False),
        PrimaryKeyConstraint(*pk, name=f"pk_{name}"[:63]),
        info={LOOKUP_INFO: f"{owner.name}.{column.name}"},
        comment=lookup_comment(owner.name, column.name, key_column.name, unique),
    )


def lookup_comment(owner: str, column: str, key: str, unique: bool) -> str:
    """The lookup table's comment: it also tells a process that never imported the model (the CLI
    mover, :mod:`.catalog`) whose lookup the table is (:func:`parse_lookup_comment`)."""
    return (
        f"sa_shardkit lookup {owner}.{column} -> {key}"
        + (UNIQUE_NOTE if unique else "")
        + ": rows live on the shard of value"
    )


UNIQUE_NOTE = " (unique across the fleet)"
_COMMENT = re.compile(r"^sa_shardkit lookup ([^ .]+)\.([^ ]+) -> ([^ :]+)( \(unique across the fleet\))?:")


def parse_lookup_comment(comment: str | None) -> tuple[str, str, str, bool] | None:
    """(owner table, looked-up column, shard key column, unique) of a :func:`lookup_comment`."""
    found = _COMMENT.match(comment or "")
    if found is None:
        return None
    return found[1], found[2], found[3], found[4] is not None


def _on_mapped(mapper: Mapper[Any], class_: type) -> None:
    if getattr(class_, LOOKUPS_ATTR, None):
        lookups_of(mapper)  # creates the tables now, so create_all and autogenerate see them


event.listen(Mapper, "after_mapper_constructed", _on_mapped)
for _registry in _all_registries():  # classes mapped before this import: sessions must not skip them
    for _mapper in list(_registry.mappers):
        _on_mapped(_mapper, _mapper.class_)
