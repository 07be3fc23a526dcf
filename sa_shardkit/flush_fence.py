"""The write fence inside ShardedSession flushes: every sharded row a flush writes is fenced first.

Registered by :mod:`sa_shardkit.session` for every manager-routed session. Before a flush writes,
each (shard, key) it touches gets :meth:`Placement.fence_write <sa_shardkit.placement.Placement.fence_write>`
on the session's connection to that shard, in the session's transaction; a key that moved raises
:class:`StaleRingError` before anything is written (roll back and retry the transaction: it will
route to the new shard). A fleet that stores no ring skips all of it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from .declarative import sharding_of
from .errors import NotShardedError

_FENCED = "shardkit_fenced"


def fence_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """``before_flush``: hold the fence for every sharded key the flush writes (once per transaction)."""
    manager = getattr(session, "manager", None)
    if manager is None or getattr(session, "pinned_shard_id", None) is not None:
        return
    placement = manager.placement
    if not placement.fences_writes():
        return
    transaction = session.get_transaction()
    fenced: set[tuple[str, Any]] = session.info.setdefault(_FENCED, {}).setdefault(id(transaction), set())
    for obj in [*session.new, *session.dirty, *session.deleted]:
        state = inspect(obj)
        try:
            sharding = sharding_of(state.mapper)
        except NotShardedError:
            continue
        if sharding.reference or sharding.attribute is None:
            continue
        key = obj.__dict__.get(sharding.attribute)
        if key is None:
            continue
        if state.key is not None:
            shard = str(state.key[2])
        elif state.identity_token is not None:
            shard = str(state.identity_token)
        else:
            shard = session.shard_chooser(state.mapper, obj, None)  # type: ignore[attr-defined]
        if (shard, key) in fenced:
            continue
        conn = session.connection(bind_arguments={"shard_id": shard})
        placement.fence_write(conn, shard, key)
        fenced.add((shard, key))


def forget_fences(session: Session, transaction: Any) -> None:
    """``after_transaction_end``: the fences of a finished transaction are released."""
    fences = session.info.get(_FENCED)
    if fences:
        fences.pop(id(transaction), None)
