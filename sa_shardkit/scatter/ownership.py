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

The filter goes wherever the statement reads a sharded table: its own FROM list, and every nested
SELECT (derived tables, ``IN`` / ``EXISTS`` / scalar subqueries, CTEs). An UPDATE or DELETE that
runs on several shards during a move gets it on its own table too (the session holds the
sources' fences in its transaction first: :meth:`Placement.fence_sources`). SQL text cannot be
rewritten: :func:`names_sharded_table` tells the callers, which refuse it during a move.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sqlalchemy import Delete, String, Update, and_, bindparam, cast, exists, literal, or_, true
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import ColumnElement, FromClause, column, table, visitors
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CompoundSelect, Join, Select

from ..declarative import sharded_table_names, table_sharding
from ..errors import UnfilteredScatterError
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


Statement = TypeVar("Statement", Select[Any], CompoundSelect[Any], Update, Delete)


def _not_a_copy(key: ColumnElement[Any], marks: SourceMarks) -> ColumnElement[bool]:
    """``key``'s rows here are not a copy its source has not cut over (no pending journal entry)."""
    still_there = [
        and_(
            _journal.c.source == literal(source, String),
            true() if watermark is None else key > cast(bindparam(None, watermark, String), key.type),
        )
        for source, watermark in marks.pending
    ]
    copy = exists().where(
        _journal.c.version == literal(marks.version),
        _journal.c.k == cast(key, String),
        or_(*still_there),
    )
    return ~copy


def _criteria(froms: list[tuple[FromClause, str]], marks: SourceMarks) -> list[ColumnElement[bool]]:
    return [_not_a_copy(next(c for c in f.c if c.name == name), marks) for f, name in froms]


def _written_table(statement: Update | Delete) -> list[tuple[FromClause, str]]:
    declared = table_sharding(statement.table)
    if declared is None or declared.column_name is None:
        return []
    return [(statement.table, declared.column_name)]


def _nested_selects(statement: Select[Any] | CompoundSelect[Any] | Update | Delete) -> bool:
    """Does a SELECT inside ``statement`` (not the statement itself) read a sharded table?"""
    return any(
        isinstance(element, Select) and element is not statement and sharded_froms(element)
        for element in visitors.iterate(statement)
    )


def own_rows_only(statement: Statement, marks: SourceMarks) -> Statement:
    """``statement`` with, for every sharded table it reads (at any depth) or writes, the rows of
    keys this shard holds only as a not-yet-cut-over copy hidden (``NOT EXISTS`` a pending
    journal entry). Unchanged when every source is drained (nothing is pending)."""
    if not marks.pending:
        return statement
    if not isinstance(statement, CompoundSelect) and not _nested_selects(statement):
        # the common case: no copy of the whole statement
        froms = sharded_froms(statement) if isinstance(statement, Select) else _written_table(statement)
        criteria = _criteria(froms, marks)
        return statement.where(*criteria) if criteria else statement

    def filter_select(element: Select[Any]) -> None:  # a clone: cloned_traverse lets us change it
        criteria = _criteria(sharded_froms(element), marks)
        if criteria:
            element._where_criteria += tuple(criteria)

    def filter_write(element: Update | Delete) -> None:
        criteria = _criteria(_written_table(element), marks)
        if criteria:
            element._where_criteria += tuple(criteria)

    return visitors.cloned_traverse(
        statement, {}, {"select": filter_select, "update": filter_write, "delete": filter_write}
    )


def names_sharded_table(sql: str, tables: list[str]) -> str | None:
    """The first of ``tables`` (sharded tables' names) that the SQL text ``sql`` names, if any."""
    for name in tables:
        if re.search(rf'(?<![\w$"]){re.escape(name)}(?![\w$"])|"{re.escape(name)}"', sql, re.IGNORECASE):
            return name
    return None


_READ = re.compile(r"^\s*(\(\s*)*(select|with|table|values)\b|\breturning\b", re.IGNORECASE | re.DOTALL)


def for_move(statement: Any, marks: SourceMarks) -> Any:
    """``statement`` to run on several shards while the move of ``marks`` is in flight: filtered
    (:func:`own_rows_only`), or unchanged when nothing is pending or it reads no sharded table.

    SQL text (a ``str``, ``text()``, or ``from_statement(text(...))``) that reads (SELECT, WITH, TABLE, VALUES, or RETURNING) a
    sharded table by name cannot be filtered: :class:`UnfilteredScatterError`, nothing run."""
    if not marks.pending:
        return statement
    if isinstance(statement, FromStatement) and isinstance(statement.element, TextClause):
        for_move(statement.element, marks)  # select(Model).from_statement(text(...)): the text decides
        return statement
    sql = statement if isinstance(statement, str) else getattr(statement, "text", None)
    if isinstance(statement, (str, TextClause)) and isinstance(sql, str):
        named = names_sharded_table(sql, sharded_table_names()) if _READ.search(sql) else None
        if named is not None:
            raise UnfilteredScatterError(
                f"SQL text reading sharded table {named!r} on several shards while a move (ring "
                f"version {marks.version}) is in flight: its rows of moving keys may be on two shards "
                "for a while, and text cannot be filtered to each row's owner. Write it with "
                "select(), run it per shard (bind_arguments={'shard_id': ...}), or after the move"
            )
        return statement
    filterable = isinstance(statement, (Select, CompoundSelect, Update, Delete))
    return own_rows_only(statement, marks) if filterable else statement


__all__ = ["for_move", "names_sharded_table", "own_rows_only", "sharded_froms"]
