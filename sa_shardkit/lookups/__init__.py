"""Lookup indexes: route by a column other than the shard key, and unique columns across the fleet.

Declare them on a model (``__shard_lookups__ = ("order_id", Lookup("email", unique=True))``, see
:mod:`.declaration`); the sharded session maintains them (:mod:`.maintain`), routing uses them
(:mod:`.routing`), and :mod:`.build` backfills and repairs them (``shardkit lookups build|repair``).
"""

from __future__ import annotations

from . import routing as _routing  # noqa: F401 - registers the column router
from .declaration import (
    Lookup,
    LookupIndex,
    declared_lookups,
    lookup_for_column,
    lookup_metadata,
    lookup_named,
    lookup_state_table,
    lookups_of,
)

__all__ = [
    "Lookup",
    "LookupIndex",
    "declared_lookups",
    "lookup_for_column",
    "lookup_metadata",
    "lookup_named",
    "lookup_state_table",
    "lookups_of",
]
