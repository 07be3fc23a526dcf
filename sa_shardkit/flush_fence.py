"""The write fence inside ShardedSession flushes: every sharded row a flush writes is fenced first.

Registered by :mod:`sa_shardkit.session` for every manager-routed session. Before a flush writes,
each (shard, key) it touches gets :meth:`Placement.fence_write <sa_shardkit.placement.Placement.fence_write>`
on the session's connection to that shard, in the session's transaction; a key that moved raises
:class:`StaleRingError` before anything is written (roll back and retry the transaction: it will
route to the new shard). A fleet that stores no ring skips all of it.

:func:`fence_keys` is the same fence for Core DML sent through the session
(``session.execute(update(...).where(Model.key == k))``, ``insert``, ``delete``, bulk inserts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from .declarative import sharding_of
from .errors import NotShardedError, StaleRingError
from .placement import MAX_REROUTES
from .routing import write_keys

_FENCED = "shardkit_fenced"


def fence_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """``before_flush``: hold the fence for every sharded key the flush writes (once per transaction).

    The session's flush plan (run just before) lists them as ``session._fence_keys``: (shard, key).
    """
    manager = getattr(session, "manager", None)
    if manager is None or getattr(session, "pinned_shard_id", None) is not None:
        return
    planned: list[tuple[str, Any]] | None = getattr(session, "_fence_keys", None)
    session._fence_keys = None  # type: ignore[attr-defined]
    placement = manager.placement
    if not placement.fences_writes():
        return
    fenced = _fenced(session)
    for shard, key in _flush_keys(session) if planned is None else planned:
        if (shard, key) in fenced:
            continue
        conn = session.connection(bind_arguments={"shard_id": shard})
        placement.fence_write(conn, shard, key)
        fenced.add((shard, key))


def _flush_keys(session: Session) -> Iterator[tuple[str, Any]]:
    """(shard, key) of every sharded row the flush writes, when no flush plan listed them."""
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
            yield str(state.key[2]), key
        elif state.identity_token is not None:
            yield str(state.identity_token), key
        else:
            yield session.shard_chooser(state.mapper, obj, None), key  # type: ignore[attr-defined]


def fence_keys(session: Session, shard: str, keys: Iterable[Any]) -> None:
    """Hold the fence for writing ``keys`` on ``shard`` in the session's transaction (each key once
    per transaction), before a Core INSERT / UPDATE / DELETE sent through the session runs there.

    Raises :class:`StaleRingError` naming the right shard when a key does not belong on ``shard``
    (nothing of that key was written in this transaction yet: route it again).
    """
    manager = getattr(session, "manager", None)
    if manager is None or not manager.placement.fences_writes():
        return
    conn = session.connection(bind_arguments={"shard_id": shard})  # begins the transaction if needed
    fenced = _fenced(session)
    for key in keys:
        if (shard, key) not in fenced:
            manager.placement.fence_write(conn, shard, key)
            fenced.add((shard, key))


def fence_statement(
    session: Session,
    statement: Any,
    params: Any,
    shards: tuple[str, ...],
    route: Callable[[], tuple[str, ...]],
) -> tuple[str, ...]:
    """Before a Core write sent through the session runs on ``shards`` (as routed): hold the fence
    for every shard key it names (:func:`~sa_shardkit.routing.write_keys`) on the shard that key
    is written to now, then return the shards to run it on, routed again with the fences held (so
    the two agree: a fenced key cannot be cut over until the transaction ends).

    A key that moved is routed again before anything of it is written. A write that names no keys
    (on every shard, or routed by a lookup) runs as routed, unfenced (see the rebalancing docs).
    """
    manager = getattr(session, "manager", None)
    if manager is None or not manager.placement.fences_writes():
        return shards
    for _ in range(MAX_REROUTES):
        keys = write_keys(manager, statement, params)
        if not keys:
            return shards
        try:
            for shard, values in keys.items():
                fence_keys(session, shard, values)
        except StaleRingError as stale:
            if stale.shard_id is None:
                raise
            continue  # the fence adopted where the key is now: route it again
        shards = route()
        if set(shards) <= set(keys):
            return shards
    raise StaleRingError(
        f"the ring kept changing while fencing the keys of {type(statement).__name__}; retry"
    )


def _fenced(session: Session) -> set[tuple[str, Any]]:
    """(shard, key) pairs fenced in the session's current transaction."""
    transaction = session.get_transaction()
    fenced: set[tuple[str, Any]] = session.info.setdefault(_FENCED, {}).setdefault(id(transaction), set())
    return fenced


def forget_fences(session: Session, transaction: Any) -> None:
    """``after_transaction_end``: the fences of a finished transaction are released."""
    fences = session.info.get(_FENCED)
    if fences:
        fences.pop(id(transaction), None)
