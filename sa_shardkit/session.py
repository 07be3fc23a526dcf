"""Placeholder: the sharded ORM session (issue "ShardedSession and declarative shard keys")."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.horizontal_shard import ShardedSession as _StockShardedSession


class ShardedSession(_StockShardedSession):
    """Not yet routed by a manager; see the ShardedSession issue."""

    def __init__(self, *args: Any, manager: Any = None, **kw: Any) -> None:
        raise NotImplementedError("ShardedSession(manager=...) is not built yet")
