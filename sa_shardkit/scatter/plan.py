"""Turning one ``select()`` into the statement each shard runs plus the recipe that merges the answers.

Two shapes of query, two plans:

* :class:`RowPlan` -- plain rows. Each shard runs the statement with ``LIMIT offset+limit`` and no
  OFFSET, and returns the ORDER BY values as extra trailing columns; the merge interleaves the sorted
  shard streams, removes cross-shard duplicates for DISTINCT, then applies OFFSET/LIMIT once.
* :class:`AggregatePlan` -- aggregates and/or GROUP BY. Each shard returns per-group partial values
  (``avg`` becomes sum and count); the merge combines the groups, evaluates HAVING, sorts and limits.

Anything the merge could not make equal to a single database's answer raises
:class:`~sa_shardkit.errors.UnsupportedScatterError` here, before any shard is queried.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import func
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnElement,
    False_,
    Grouping,
    Label,
    Null,
    True_,
    UnaryExpression,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    CompoundSelect,
    Join,
    Select,
    _CompoundSelectKeyword,
)

from .analysis import (
    OrderTerm,
    check_collation,
    check_mergeable,
    enum_ranks,
    function_name,
    int_clause,
    is_aggregate,
    order_terms,
    unlabel,
    unsupported,
)
from .joins import check_joins
from .ordering import SortTerm

HIDDEN_PREFIX = "_shardkit_"
"""Label prefix of the extra columns a shard returns for the merge (never shown to the caller)."""

Combine = Literal["first", "sum", "min", "max"]


@dataclass(frozen=True)
class RowPlan:
    """Merge plain rows: k-way merge on the ORDER BY values, de-duplicate, then OFFSET/LIMIT."""

    statement: Select[Any]
    hidden: int
    """Trailing extra columns per shard row (the ORDER BY values), removed from the output."""
    order: tuple[SortTerm, ...]
    limit: int | None
    offset: int
    distinct: bool
    lean: Select[Any] | None = None
    """The shard statement without the hidden columns, when every ORDER BY term is a table column
    the statement selects (``lean_columns``) and a LIMIT applies: the merge on the raw rows
    (:func:`.prefix.trim_to_merged_prefix`) then reads the sort keys where the rows hold them
    already, and each shard sends, parses and loads fewer columns (:mod:`.session` decides)."""
    lean_columns: tuple[ColumnElement[Any], ...] = ()
    """The ORDER BY terms' table columns (not annotated), in ORDER BY order, for ``lean``."""


@dataclass(frozen=True)
class Final:
    """One output value of a merged group: a combined partial, or ``avg`` as sum / count."""

    index: int
    count_index: int | None = None


@dataclass(frozen=True)
class AggregatePlan:
    """Combine per-shard groups, then HAVING, ORDER BY, DISTINCT, OFFSET and LIMIT in Python."""

    statement: Select[Any]
    visible: int
    combine: tuple[Combine, ...]
    group: tuple[int, ...]
    finals: tuple[Final, ...]
    order: tuple[SortTerm, ...]
    having: Callable[[Sequence[Any]], Any] | None
    limit: int | None
    offset: int
    distinct: bool


ScatterPlan = RowPlan | AggregatePlan


_planned: weakref.WeakKeyDictionary[Select[Any], ScatterPlan] = weakref.WeakKeyDictionary()


def cached_plan(statement: Select[Any]) -> ScatterPlan:
    """:func:`plan_scatter`, once per statement object (a ``select()`` is immutable; kept as long
    as the statement is). The plan's shard statement is then the same object every time, so
    SQLAlchemy finds its cache key memoized, too. A statement built anew for each query is planned
    each time: reusing another statement's plan by cache key would execute that statement's
    objects (its bound values, aliases) in place of the caller's."""
    try:
        return _planned[statement]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable
        return plan_scatter(statement)
    plan = _planned[statement] = plan_scatter(statement)
    return plan


def plan_scatter(statement: Select[Any]) -> ScatterPlan:
    """Analyse ``statement`` and build its plan; raises UnsupportedScatterError with the reason."""
    if not isinstance(statement, Select):
        raise unsupported(f"only SELECT statements are merged, not {type(statement).__name__}")
    if statement._distinct_on or statement._pre_columns_clause is not None:
        raise unsupported("DISTINCT ON picks one row per key on each shard")
    for extension in ("_post_select_clause", "_post_criteria_clause", "_post_body_clause"):
        if getattr(statement, extension, None) is not None:
            raise unsupported("a dialect syntax extension (select().ext(...)) cannot be merged")
    if statement._fetch_clause is not None:
        raise unsupported("FETCH FIRST ... WITH TIES is evaluated per shard")
    if statement._for_update_arg is not None and statement._limit_clause is not None:
        raise unsupported("FOR UPDATE with LIMIT would lock up to LIMIT rows on every shard")
    _check_from_subqueries(statement)
    check_joins(statement)
    has_aggregate = False
    for column in statement.selected_columns:
        has_aggregate |= check_mergeable(column, "the SELECT list")
    terms = order_terms(statement)
    for term in terms:
        has_aggregate |= check_mergeable(term.expression, "ORDER BY")
    for criterion in statement._where_criteria:
        if check_mergeable(criterion, "WHERE"):
            raise unsupported("an aggregate in WHERE")
    if has_aggregate or statement._group_by_clauses or statement._having_criteria:
        return _AggregatePlanner(statement, terms).build()
    return _row_plan(statement, terms)


def _check_from_subqueries(statement: Select[Any]) -> None:
    # the statement as written (get_final_froms() would show the ORM's own eager-load wrapping)
    stack: list[Any] = [*statement.columns_clause_froms, *statement._from_obj]
    stack += [target for target, *_ in statement._setup_joins]
    while stack:
        item = stack.pop()
        if isinstance(item, Join):
            stack += [item.left, item.right]
        elif isinstance(item, AliasedReturnsRows) and isinstance(item.element, CompoundSelect):
            if item.element.keyword is not _CompoundSelectKeyword.UNION_ALL:
                raise unsupported(f"a FROM subquery using {item.element.keyword.name} is evaluated per shard")
            stack += [s.subquery() for s in item.element.selects]
        elif isinstance(item, AliasedReturnsRows) and isinstance(item.element, Select):
            inner = item.element
            grouped = any(check_mergeable(c, "a FROM subquery") for c in inner.selected_columns)
            if (
                inner._limit_clause is not None
                or inner._offset_clause is not None
                or inner._group_by_clauses
                or inner._distinct
                or grouped
            ):
                raise unsupported(
                    "a FROM subquery with LIMIT, OFFSET, DISTINCT, GROUP BY or aggregates is evaluated "
                    "per shard"
                )
            stack += [*inner.columns_clause_froms, *inner._from_obj]
            stack += [target for target, *_ in inner._setup_joins]


def _sort_term(term: OrderTerm, index: int) -> SortTerm:
    check_collation(term.expression, "ORDER BY")
    return SortTerm(index, term.descending, term.nulls_first, enum_ranks(term.expression))


def _row_plan(statement: Select[Any], terms: list[OrderTerm]) -> RowPlan:
    limit = int_clause(statement, "limit")
    offset = int_clause(statement, "offset") or 0
    hidden = [unlabel(t.expression).label(f"{HIDDEN_PREFIX}o{i}") for i, t in enumerate(terms)]
    order = tuple(_sort_term(t, i - len(terms)) for i, t in enumerate(terms))
    shard_statement = statement
    if hidden:
        shard_statement = shard_statement.add_columns(*hidden)
    lean = statement  # the shard statement without the hidden columns, for a lean LIMIT scatter
    if limit is not None:
        shard_statement = shard_statement.limit(limit + offset)
        lean = lean.limit(limit + offset)
    if offset:
        shard_statement = shard_statement.offset(None)
        lean = lean.offset(None)
    distinct = bool(statement._distinct)
    lean_columns = None if limit is None or distinct else _selected_table_columns(statement, terms)
    return RowPlan(
        shard_statement,
        len(hidden),
        order,
        limit,
        offset,
        distinct,
        None if lean_columns is None else lean,
        lean_columns or (),
    )


def _selected_table_columns(statement: Select[Any], terms: list[OrderTerm]) -> tuple[Column[Any], ...] | None:
    """The ORDER BY terms as the table columns they are, when each is one the statement selects
    (an ORM entity's columns count); None when any term is anything else (an expression, a label,
    an aliased entity's column, a column not selected)."""
    if not terms:
        return None
    columns = []
    for term in terms:
        expression = unlabel(term.expression)
        if not isinstance(expression, Column):
            return None
        columns.append(expression._deannotate())
    selected = {id(unlabel(c)._deannotate()) for c in statement.selected_columns}
    if not all(id(column) in selected for column in columns):
        return None
    return tuple(columns)  # type: ignore[arg-type]


@dataclass
class _AggregatePlanner:
    statement: Select[Any]
    terms: list[OrderTerm]
    columns: list[ColumnElement[Any]] = field(default_factory=list)
    combine: list[Combine] = field(default_factory=list)
    finals: list[Final] = field(default_factory=list)
    group_exprs: list[ColumnElement[Any]] = field(default_factory=list)
    group_index: list[int] = field(default_factory=list)

    def build(self) -> AggregatePlan:
        statement = self.statement
        for raw in statement._raw_columns:
            if not isinstance(raw, ColumnElement):
                raise unsupported("an aggregate query that selects whole entities or tables")
        keys = list(statement.selected_columns.keys())
        selected = list(statement.selected_columns)
        visible = len(selected)
        pending_counts: list[tuple[int, ColumnElement[Any]]] = []
        for i, column in enumerate(selected):
            core = unlabel(column)
            if is_aggregate(core):
                if _aggregate_name(core) == "avg":
                    total, count = _avg_parts(core)
                    self._add(total.label(keys[i]), "sum")
                    pending_counts.append((i, count))
                    self.finals.append(Final(i))  # count index patched below
                else:
                    self._add(column, _combine_for(core))
                    self.finals.append(Final(i))
            elif check_mergeable(column, "the SELECT list"):
                raise unsupported(
                    f"column {keys[i]!r} computes with an aggregate; select the aggregates themselves "
                    "and compute in Python"
                )
            else:
                self._add(column, "first")
                self.finals.append(Final(i))
        for i, count in pending_counts:
            self.finals[i] = Final(i, self._add(count.label(f"{HIDDEN_PREFIX}c{i}"), "sum"))
        for j, item in enumerate(statement._group_by_clauses):
            expression = self._resolve_group(item)
            self.group_exprs.append(expression)
            self.group_index.append(self._add(expression.label(f"{HIDDEN_PREFIX}g{j}"), "first"))
        order = tuple(_sort_term(t, self._final_for(t.expression, t.label_name)) for t in self.terms)
        having = self._having() if statement._having_criteria else None
        shard_statement = statement.with_only_columns(*self.columns, maintain_column_froms=True)
        shard_statement = shard_statement.order_by(None).limit(None).offset(None)._generate()
        shard_statement._having_criteria = ()  # evaluated after merging (groups span shards)
        shard_statement._distinct = False
        return AggregatePlan(
            statement=shard_statement,
            visible=visible,
            combine=tuple(self.combine),
            group=tuple(self.group_index),
            finals=tuple(self.finals),
            order=order,
            having=having,
            limit=int_clause(statement, "limit"),
            offset=int_clause(statement, "offset") or 0,
            distinct=bool(statement._distinct),
        )

    def _add(self, column: ColumnElement[Any], combine: Combine) -> int:
        self.columns.append(column)
        self.combine.append(combine)
        return len(self.columns) - 1

    def _resolve_group(self, item: Any) -> ColumnElement[Any]:
        while isinstance(item, (_label_reference, _textual_label_reference)):
            if isinstance(item, _textual_label_reference):
                name = str(item.element)
                matches = [c for k, c in self.statement.selected_columns.items() if k == name]
                if not matches:
                    raise unsupported(f"GROUP BY {name!r} names no column of the SELECT list")
                item = matches[0]
            else:
                item = item.element
        if not isinstance(item, ColumnElement):
            raise unsupported(f"GROUP BY {item!r} is not a column expression")
        if function_name(unlabel(item)) in {"rollup", "cube", "grouping sets"}:
            raise unsupported("GROUP BY ROLLUP/CUBE/GROUPING SETS")
        return unlabel(item)

    def _final_for(self, expression: ColumnElement[Any], label_name: str | None = None) -> int:
        """The index in a merged row of ``expression`` (adding hidden per-shard columns as needed)."""
        keys = list(self.statement.selected_columns.keys())
        if label_name is not None and label_name in keys:
            return keys.index(label_name)
        core = unlabel(expression)
        for i, column in enumerate(self.statement.selected_columns):
            if column is expression or unlabel(column).compare(core):
                return i
        n = len(self.columns)
        if is_aggregate(core):
            if _aggregate_name(core) == "avg":
                total, count = _avg_parts(core)
                self._add(total.label(f"{HIDDEN_PREFIX}a{n}"), "sum")
                self.finals.append(Final(n, self._add(count.label(f"{HIDDEN_PREFIX}a{n}c"), "sum")))
            else:
                self.finals.append(Final(self._add(core.label(f"{HIDDEN_PREFIX}a{n}"), _combine_for(core))))
            return len(self.finals) - 1
        if check_mergeable(core, "ORDER BY/HAVING"):
            raise unsupported("an expression computed from aggregates in ORDER BY or HAVING")
        for group_expression, index in zip(self.group_exprs, self.group_index, strict=True):
            if group_expression.compare(core):
                self.finals.append(Final(index))
                return len(self.finals) - 1
        raise unsupported(f"ORDER BY/HAVING on {core} that is neither selected, grouped by, nor an aggregate")

    def _having(self) -> Callable[[Sequence[Any]], Any]:
        parts = [self._predicate(c) for c in self.statement._having_criteria]
        return lambda row: _and([p(row) for p in parts])

    def _predicate(self, element: Any) -> Callable[[Sequence[Any]], Any]:
        if isinstance(element, Grouping):
            return self._predicate(element.element)
        if isinstance(element, BooleanClauseList):
            parts = [self._predicate(c) for c in element.clauses]
            combine = _and if element.operator is operators.and_ else _or
            return lambda row: combine([p(row) for p in parts])
        if isinstance(element, UnaryExpression) and element.operator is operators.inv:
            inner = self._predicate(element.element)
            return lambda row: None if (v := inner(row)) is None else not v
        if isinstance(element, BinaryExpression) and element.operator in _COMPARISONS:
            compare = _COMPARISONS[element.operator]
            left, right = self._value(element.left), self._value(element.right)
            return lambda row: compare(left(row), right(row))
        raise unsupported(f"HAVING {element} cannot be evaluated after merging (use =, <, >, AND, OR, NOT)")

    def _value(self, element: Any) -> Callable[[Sequence[Any]], Any]:
        if isinstance(element, Grouping):
            return self._value(element.element)
        if isinstance(element, BindParameter):
            value = element.effective_value
            return lambda row: value
        if isinstance(element, (Null, True_, False_)):
            constant = {Null: None, True_: True, False_: False}[type(element)]
            return lambda row: constant
        if isinstance(element, Label):
            return self._value(element.element)
        index = self._final_for(element)
        return lambda row: row[index]


def _aggregate_name(element: Any) -> str:
    inner = element.func if type(element).__name__ == "FunctionFilter" else element
    return function_name(inner) or ""


def _combine_for(element: Any) -> Combine:
    name = _aggregate_name(element)
    return "sum" if name in ("count", "sum") else name  # type: ignore[return-value]


def _avg_parts(element: Any) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """``avg(x)`` -> ``sum(x)``, ``count(x)`` (keeping a FILTER clause)."""
    criterion = None
    if type(element).__name__ == "FunctionFilter":
        criterion = element.criterion
        element = element.func
    args = list(element.clauses.clauses)
    total: ColumnElement[Any] = func.sum(*args)
    count: ColumnElement[Any] = func.count(*args)
    if criterion is not None:
        total, count = func.sum(*args).filter(criterion), func.count(*args).filter(criterion)
    return total, count


def _and(values: list[Any]) -> Any:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _or(values: list[Any]) -> Any:
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _null_safe(compare: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda a, b: None if a is None or b is None else bool(compare(a, b))


_COMPARISONS: dict[Any, Callable[[Any, Any], Any]] = {
    operators.eq: _null_safe(lambda a, b: a == b),
    operators.ne: _null_safe(lambda a, b: a != b),
    operators.lt: _null_safe(lambda a, b: a < b),
    operators.le: _null_safe(lambda a, b: a <= b),
    operators.gt: _null_safe(lambda a, b: a > b),
    operators.ge: _null_safe(lambda a, b: a >= b),
    operators.is_: lambda a, b: a is b,
    operators.is_not: lambda a, b: a is not b,
}
