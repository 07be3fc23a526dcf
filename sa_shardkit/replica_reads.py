"""Which reads of a sharded session may go to a shard's replica.

A read goes to the replica when all of these hold, else to the primary:

* the session was not created with ``replica_reads=False`` and is not inside ``session.primary_reads()``;
* the statement is a SELECT without ``FOR UPDATE``/``FOR SHARE`` and without the execution option
  ``use_primary=True``;
* this session transaction has not used the shard's primary yet (no flush, write, lock or earlier
  primary read there), so a transaction that wrote reads its own writes;
* the shard's replica is usable (up, in recovery, within ``max_replica_lag``; see
  :mod:`sa_shardkit.replicas`); the replica connection is checked out here, so a replica that died
  since its last check still falls back to the primary.

After ``commit()`` a new transaction starts, and its reads may go to a replica that has not yet
replayed the commit: use ``use_primary=True`` or ``primary_reads()`` to read your own writes then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState, Session

from .errors import ShardUnavailableError

if TYPE_CHECKING:
    from .manager import ShardManager

log = logging.getLogger("sa_shardkit.session")

USE_PRIMARY = "use_primary"
"""Execution option: ``session.execute(stmt, execution_options={"use_primary": True})``."""
REPLICA_OK = "shardkit_replica_ok"
"""Bind argument the session's execute hook sets for a read that may use a replica."""

ReplicaChooser = Callable[[str], "Engine | None"]
"""The engine a read of the shard may use now (its usable replica), or None for "the primary".

The default is the manager's (``manager.replicas.usable_replica``); ``AsyncShardManager`` passes one
that answers with its async replica engines, judged by the same verdicts.
"""


def may_read_from_replica(orm_context: ORMExecuteState) -> bool:
    """Is this execution a read that the replica may serve (before looking at the transaction)?"""
    session: Any = orm_context.session
    if not getattr(session, "replica_reads", False) or session._primary_reads:
        return False
    if not orm_context.is_select or orm_context.execution_options.get(USE_PRIMARY):
        return False
    return getattr(orm_context.statement, "_for_update_arg", None) is None


def replica_bind(
    session: Session,
    manager: ShardManager,
    shard_id: str,
    primary: Any,
    choose_replica: ReplicaChooser | None = None,
) -> Engine | None:
    """The replica engine for this read of ``shard_id``, or None when it must use ``primary``."""
    if choose_replica is None:
        if manager.replica_engine(shard_id) is None:
            return None  # no replica configured: skip the transaction and freshness checks
        if primary is not manager.engine(shard_id):
            return None  # the session binds this shard elsewhere (an explicit ``shards=`` override)
        choose_replica = manager.replicas.usable_replica
    transaction = session.get_transaction()
    if transaction is not None and primary in transaction._connections:
        return None  # this transaction already works on the primary: read its own writes
    replica = choose_replica(shard_id)
    if replica is None or replica is primary:
        return None
    try:
        session.connection(bind_arguments={"bind": replica})
    except (DBAPIError, ShardUnavailableError) as error:  # the session names the shard: still ours
        source = error.__cause__ if isinstance(error, ShardUnavailableError) else error
        reason = str(getattr(source, "orig", None) or source).strip().splitlines()
        manager.replicas.mark_unusable(shard_id, f"unreachable: {reason[0] if reason else error}")
        return None
    log.debug("read on %s -> its replica", shard_id)
    return replica
