"""The write fence inside ShardedSession flushes: every sharded row a flush writes is fenced first.

Registered once by :class:`~sa_shardkit.rebalance.RingRouter`. Before a flush writes, each
(shard, key) it touches gets :meth:`RingRouter.fence_write` on the session's connection to that
shard, in the session's transaction; a key that moved raises :class:`StaleRingError` before
anything is written (roll back and retry the transaction: it will route to the new shard).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from ..declarative import sharding_of
from ..errors import NotShardedError
from ..session import ShardedSession

_FENCED = "shardkit_fenced"


def _fence_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if not isinstance(session, ShardedSession) or session.manager is None:
        return
    router = getattr(session.manager, "placement", None)
    if router is None or session.pinned_shard_id is not None:
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
            shard = session.shard_chooser(state.mapper, obj, None)
        if (shard, key) in fenced:
            continue
        conn = session.connection(bind_arguments={"shard_id": shard})
        router.fence_write(conn, shard, key)
        fenced.add((shard, key))


def _forget(session: Session, transaction: Any) -> None:
    session.info.get(_FENCED, {}).pop(id(transaction), None)


def install() -> None:
    """Fence every ShardedSession flush (idempotent)."""
    if not event.contains(ShardedSession, "before_flush", _fence_flush):
        event.listen(ShardedSession, "before_flush", _fence_flush)
        event.listen(ShardedSession, "after_transaction_end", _forget)
