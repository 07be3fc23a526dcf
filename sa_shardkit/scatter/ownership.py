"""Scatters during a move see each row exactly once: the ownership filter.

A batch's cut-over commits its copies on the target before it deletes the originals on the source
(and a kill can stop it in between), so for a moment -- or, after a kill, until the next run -- a
key's rows are on both shards. Every target lists the keys whose copies it committed in
:data:`~sa_shardkit.ring_state.MOVED_KEYS_TABLE`, in the same transaction as the copies. A key is
the source's until the source's watermark passes it (or the source is drained), so while a move is
in flight each shard's part of a scatter hides the rows of keys journaled for a source that has not
cut them over by the marks read before the scatter (:func:`own_rows_only`). The session re-reads
the marks afterwards and runs the scatter again if a cut-over committed meanwhile (its rows may
have left the source before the source was read, and reached the target after it was read), or,
after a few tries, holds every source's fence while it runs (:meth:`Placement.source_marks`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, and_, bindparam, cast, exists, literal, or_, true
from sqlalchemy.sql import FromClause, column, table
from sqlalchemy.sql.selectable import Join, Select

from ..declarative import table_sharding
from ..ring_state import MOVED_KEYS_TABLE, SourceMarks

_journal = table(MOVED_KEYS_TABLE, column("k"), column("version"), column("source"))


def sharded_froms(statement: Select[Any]) -> list[tuple[FromClause, str]]:
    """Each sharded table (or alias of one) the statement reads, with its shard-key column's name."""
    found: list[tuple[FromClause, str]] = []
    pending = list(statement.get_final_froms())
    while pending:
        item = pending.pop(0)
        if isinstance(item, Join):
            pending[:0] = [item.left, item.right]
            continue
        declared = table_sharding(item)
        if declared is not None and declared.column_name is not None:
            found.append((item, declared.column_name))
    return found


def own_rows_only(statement: Select[Any], marks: SourceMarks) -> Select[Any]:
    """``statement`` with, for every sharded table it reads, the rows of keys this shard holds only
    as a not-yet-cut-over copy hidden (``NOT EXISTS`` a pending journal entry). Unchanged when
    every source is drained (nothing is pending)."""
    pending = marks.pending
    if not pending:
        return statement
    for from_, key_name in sharded_froms(statement):
        key = next(c for c in from_.c if c.name == key_name)
        still_there = [
            and_(
                _journal.c.source == literal(source, String),
                true() if watermark is None else key > cast(bindparam(None, watermark, String), key.type),
            )
            for source, watermark in pending
        ]
        copy = exists().where(
            _journal.c.version == literal(marks.version),
            _journal.c.k == cast(key, String),
            or_(*still_there),
        )
        statement = statement.where(~copy)
    return statement


__all__ = ["own_rows_only", "sharded_froms"]
