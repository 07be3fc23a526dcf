"""The write fence inside ShardedSession flushes: every sharded row a flush writes is fenced first.

Registered by :mod:`sa_shardkit.session` for every manager-routed session. Before a flush writes,
each (shard, key) it touches gets :meth:`Placement.fence_write <sa_shardkit.placement.Placement.fence_write>`
on the session's connection to that shard, in the session's transaction; a key that moved raises
:class:`StaleRingError` before anything is written (roll back and retry the transaction: it will
route to the new shard). A fleet that stores no ring skips all of it.

:func:`fence_planned` is called by the session's ``before_flush`` with its flush plan's keys;
:func:`fence_keys` is the same fence for Core DML sent through the session
(``session.execute(update(...).where(Model.key == k))``, ``insert``, ``delete``, bulk inserts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .errors import StaleRingError
from .placement import MAX_REROUTES
from .routing import write_keys

if TYPE_CHECKING:
    from .manager import ShardManager
    from .session import ShardedSession

_FENCED = "shardkit_fenced"


def fence_planned(
    session: ShardedSession,
    manager: ShardManager,
    planned: list[tuple[str, Any]],
    fenced: set[tuple[str, Any]],
    conns: dict[str, Connection],
) -> None:
    """Before a flush writes: hold the fence for every sharded key it writes, (shard, key) as the
    session's flush plan chose them, each once per transaction (``fenced``: the session's set of
    those held). Called by the session's ``before_flush`` right after its plan, inside the flush
    (whose shard faults are named). ``conns`` gets the session's connection of each shard fenced."""
    placement = manager.placement
    if not placement.fences_writes():
        return
    for shard, key in planned:
        if (shard, key) in fenced:
            continue
        # what session.connection() does, without its calls: the flush names shard faults
        conn = conns.get(shard) or session._flush_connection(shard)
        conns[shard] = conn
        placement.fence_write(conn, shard, key, checked=True, deferrable=True)
        fenced.add((shard, key))


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
    """(shard, key) pairs fenced in the session's current transaction: a ShardedSession's own set,
    emptied when its transaction ends (``after_transaction_end``); another session's in its info."""
    own: Callable[[], set[tuple[str, Any]]] | None = getattr(session, "fenced_writes", None)
    if own is not None:
        return own()
    transaction = session.get_transaction()
    fenced: set[tuple[str, Any]] = session.info.setdefault(_FENCED, {}).setdefault(id(transaction), set())
    return fenced
