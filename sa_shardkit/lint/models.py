"""What the application's models declare about each table: sharded (by which column) or reference.

Read from the mapped classes' ``__shard_key__`` (the attribute whose value picks the shard) and
``__shard_reference__ = True`` (same rows on every shard) through :func:`sa_shardkit.declarative.sharding_of`,
the same reader the sharded session uses. The lint compares migrations against the
models of the code being deployed: a contract step may only drop what those models no longer map.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.orm import DeclarativeBase, Mapper, registry

from ..declarative import REFERENCE_ATTR, SHARD_KEY_ATTR, sharding_of
from ..errors import ConfigError


@dataclass(frozen=True)
class DeclaredTable:
    """One mapped table: its shard key column (``None`` for a reference table) and mapped columns."""

    name: str
    model: str
    shard_key: str | None
    reference: bool
    columns: frozenset[str]


@dataclass(frozen=True)
class ShardSchema:
    """Every table the models map, by table name."""

    tables: Mapping[str, DeclaredTable]

    def shard_key(self, table: str) -> str | None:
        """The shard key column of a sharded table (``None``: reference or unknown table)."""
        declared = self.tables.get(table)
        return declared.shard_key if declared else None

    def is_reference(self, table: str) -> bool:
        declared = self.tables.get(table)
        return bool(declared and declared.reference)

    def maps_column(self, table: str, column: str) -> DeclaredTable | None:
        """The declared table when the models still map ``table.column``."""
        declared = self.tables.get(table)
        return declared if declared and column in declared.columns else None

    @classmethod
    def from_mappers(cls, mappers: Iterable[Mapper[Any]]) -> ShardSchema:
        tables: dict[str, DeclaredTable] = {}
        for mapper in mappers:
            table = mapper.local_table
            if not isinstance(table, Table) or table.name in tables:
                continue
            model = mapper.class_
            if getattr(model, SHARD_KEY_ATTR, None) is None and not getattr(model, REFERENCE_ATTR, False):
                continue  # declares nothing: the lint reports its tables as undeclared
            declared = sharding_of(mapper)  # the one reader of the declaration; raises if malformed
            tables[table.name] = DeclaredTable(
                name=table.name,
                model=model.__name__,
                shard_key=declared.column_name,
                reference=declared.reference,
                columns=frozenset(c.name for c in table.columns),
            )
        return cls(tables)

    @classmethod
    def load(cls, spec: str | ModuleType | type[Any] | registry) -> ShardSchema:
        """From ``"package.module:Base"``, a module, a declarative base class or a registry.

        A module without ``:attr`` contributes every declarative base defined or imported in it.
        """
        target: Any = spec
        if isinstance(spec, str):
            module_name, _, attr = spec.partition(":")
            try:
                target = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigError(f"cannot import models module {module_name!r}: {exc}") from None
            if attr:
                try:
                    target = getattr(target, attr)
                except AttributeError:
                    raise ConfigError(f"models module {module_name!r} has no attribute {attr!r}") from None
        return cls.from_mappers(_mappers_of(target, spec))


def _mappers_of(target: Any, spec: object) -> list[Mapper[Any]]:
    if isinstance(target, registry):
        return list(target.mappers)
    if isinstance(target, type) and issubclass(target, DeclarativeBase):
        return list(target.registry.mappers)
    if isinstance(target, type):
        try:
            return [inspect(target)]
        except Exception:  # noqa: BLE001 - not a mapped class: fall through to the error
            pass
    if isinstance(target, ModuleType):
        registries = {
            id(value.registry): value.registry
            for value in vars(target).values()
            if isinstance(value, type) and issubclass(value, DeclarativeBase) and value is not DeclarativeBase
        }
        if registries:
            return [m for reg in registries.values() for m in reg.mappers]
    raise ConfigError(
        f"models {spec!r} is not a declarative base, registry or module of mapped classes "
        "(expected e.g. 'myapp.models:Base')"
    )
