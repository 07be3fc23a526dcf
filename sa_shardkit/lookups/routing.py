"""Routing a comparison on a looked-up column: one lookup query, then exactly the owners' shards.

Registered with :func:`sa_shardkit.routing.add_column_router`, so ``select(Order).where(Order.order_id
== 5)``, ``.in_([...])``, ``session.get(Order, 5)`` when ``order_id`` is the primary key, relationship
loads and ``manager.shards_for(stmt)`` all use it. An entry is only a hint: the statement itself still
filters on the column, so a stale entry (its owning row rolled back or deleted) costs one extra shard
in the route and can never add or hide a row. A lookup is used only once it is built; until then, or
when its shard cannot be reached for a read, the statement goes to every shard as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import InvalidShardKeyError, ShardUnavailableError
from ..ring import key_bytes
from ..routing import add_column_router, shards_for_key
from .declaration import lookup_for_column
from .store import is_ready, resolve

if TYPE_CHECKING:
    from ..manager import ShardManager

log = logging.getLogger("sa_shardkit.lookups")


class LookupHit:
    """How a lookup routed a comparison; its repr is what the route's reason shows."""

    def __init__(self, name: str, values: list[Any], keys: set[Any]) -> None:
        self.name, self.values, self.keys = name, values, keys

    def __repr__(self) -> str:
        shown = self.values if len(self.values) <= 5 else [*self.values[:5], "..."]
        return f"<lookup {self.name} in {shown!r} -> keys {sorted(self.keys, key=repr)!r}>"


def route_by_lookup(
    manager: ShardManager, column: Any, values: list[Any], keys: list[Any], write: bool
) -> set[str] | None:
    """The shards holding rows whose looked-up ``column`` is one of ``values``; None: no lookup."""
    index = lookup_for_column(column)
    if index is None or not values:
        return None
    try:
        for value in values:
            key_bytes(value)
    except InvalidShardKeyError:
        return None
    try:
        if not is_ready(manager, index):
            return None
        hits = resolve(manager, index, values)
    except ShardUnavailableError as error:
        if write:
            raise
        log.warning("lookup %s unavailable, reading every shard: %s", index.describe(), error)
        return None
    found_keys = {k for ks in hits.values() for k in ks}
    shards = {s for k in found_keys for s in shards_for_key(manager, k, write=write)}
    keys.append(LookupHit(index.describe(), values, found_keys))
    return shards


add_column_router(route_by_lookup)
