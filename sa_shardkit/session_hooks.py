"""Flush-time work added to :class:`~sa_shardkit.session.ShardedSession` by features above it.

Kept apart from session.py so the session's own routing stays one readable module: fleet-wide ids
(:mod:`sa_shardkit.sequences`) are assigned here before the session routes the new rows (a
sequence can feed the shard key itself), and lookup entries (:mod:`sa_shardkit.lookups`) are
written during each flush (those of new rows whose values are known start before it, beside it),
committed before it returns, and finished when the transaction ends.

Each runs through the session's own listeners (:func:`~sa_shardkit.session.add_session_hook`), and
only once the feature is in use (a sequence or a lookup declared in this process): a session of
models that use neither pays no call for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .lookups import maintain
from .lookups.declaration import ANY_DECLARED
from .sequences import _declared as _sequences_declared
from .sequences import assign_sequence_ids
from .session import ShardedSession, add_session_hook, listen_execute

if TYPE_CHECKING:
    from .manager import ShardManager


def _assign_ids(session: ShardedSession, manager: ShardManager, instances: Any) -> None:
    assign_sequence_ids(manager.sequences, session.new)
    if instances is None:  # a whole flush: new rows' lookup entries start now, beside the flush
        maintain.before_flush(session, manager)


# before the session routes the new rows by their (now set) keys
add_session_hook("prepare_flush", _assign_ids, armed=_sequences_declared)
add_session_hook("after_flush", maintain.after_flush, armed=ANY_DECLARED)
add_session_hook("after_commit", maintain.after_commit, armed=ANY_DECLARED)
add_session_hook("transaction_end", maintain.after_transaction_end, armed=ANY_DECLARED)
# insert=True: before the session routes (and runs) the statement
listen_execute(maintain.before_execute, insert=True)
