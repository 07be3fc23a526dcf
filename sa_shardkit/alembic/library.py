"""Autogenerate never proposes dropping sa_shardkit's own tables, whatever metadata ``env.py`` passes.

The saga log, receipts, 2PC decisions, the stored ring, sequences, lookups and the rebalancer's
staging tables live on every shard but in no model of the application, so a plain
``run_migrations(Base.metadata)`` would otherwise see them as tables to drop. A ``shardkit_*`` table
that the given metadata does map is compared as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import MetaData

from ..library_tables import is_library_table

IncludeName = Callable[[str | None, str, Mapping[str, str | None]], bool]


def _mapped_tables(metadata: MetaData | Sequence[MetaData] | None) -> set[str]:
    if metadata is None:
        return set()
    items = [metadata] if isinstance(metadata, MetaData) else list(metadata)
    return {table.name for md in items for table in md.tables.values()}


def library_table_filter(
    metadata: MetaData | Sequence[MetaData] | None, user_filter: IncludeName | None = None
) -> IncludeName:
    """An Alembic ``include_name`` hook: skip unmapped ``shardkit_*`` tables, then ask ``user_filter``."""
    mapped = _mapped_tables(metadata)

    def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
        if type_ == "table" and is_library_table(name) and name not in mapped:
            return False
        return user_filter(name, type_, parent_names) if user_filter is not None else True

    return include_name


def with_library_filter(metadata: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``context.configure()`` options with the library-table filter chained before the user's own."""
    return {**options, "include_name": library_table_filter(metadata, options.get("include_name"))}
