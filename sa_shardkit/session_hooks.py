"""Flush-time work added to :class:`~sa_shardkit.session.ShardedSession` by features above it.

Kept apart from session.py so the session's own routing stays one readable module: fleet-wide ids
(:mod:`sa_shardkit.sequences`) are assigned here before the session routes the new rows (a
sequence can feed the shard key itself), and lookup entries (:mod:`sa_shardkit.lookups`) are
written during each flush (those of new rows whose values are known start before it, beside it),
committed before it returns, and finished when the transaction ends.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from .lookups import maintain
from .sequences import any_sequence_declared, assign_sequence_ids
from .session import ShardedSession, listen_execute


def _assign_ids(session: Session, flush_context: Any, instances: Any) -> None:
    manager = getattr(session, "manager", None)
    if manager is not None and any_sequence_declared() and session.new:
        assign_sequence_ids(manager.sequences, session.new)
        if instances is None:  # a whole flush: new rows' lookup entries start now, beside the flush
            maintain.before_flush(session, manager)


# insert=True: before the session's own before_flush, which routes rows by their (now set) keys
event.listen(ShardedSession, "before_flush", _assign_ids, insert=True)
event.listen(ShardedSession, "after_flush", maintain.after_flush)
event.listen(ShardedSession, "after_commit", maintain.after_commit)
event.listen(ShardedSession, "after_transaction_end", maintain.after_transaction_end)
# insert=True: before the session routes (and runs) the statement
listen_execute(maintain.before_execute, insert=True)
