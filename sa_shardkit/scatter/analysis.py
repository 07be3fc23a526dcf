"""Reading a ``select()``: its ORDER BY terms, LIMIT/OFFSET, aggregates, and what cannot be merged.

Small helpers shared by the planners; nothing here builds statements.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.sql import operators, sqltypes
from sqlalchemy.sql.elements import (
    ClauseElement,
    ColumnElement,
    Label,
    Over,
    UnaryExpression,
    WithinGroup,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import FromClause, ScalarSelect, Select, SelectBase

from ..errors import UnsupportedScatterError

MERGEABLE_AGGREGATES = frozenset({"count", "sum", "min", "max", "avg"})
"""Aggregates whose global value follows from per-shard values (``avg`` via sum and count)."""

NON_DECOMPOSABLE_AGGREGATES = frozenset(
    {
        "array_agg",
        "string_agg",
        "json_agg",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "xmlagg",
        "bool_and",
        "bool_or",
        "every",
        "bit_and",
        "bit_or",
        "bit_xor",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "variance",
        "var_pop",
        "var_samp",
        "corr",
        "covar_pop",
        "covar_samp",
        "regr_avgx",
        "regr_avgy",
        "regr_count",
        "regr_intercept",
        "regr_r2",
        "regr_slope",
        "regr_sxx",
        "regr_sxy",
        "regr_syy",
        "percentile_cont",
        "percentile_disc",
        "mode",
        "rank",
        "dense_rank",
        "percent_rank",
        "cume_dist",
        "grouping",
        "range_agg",
        "range_intersect_agg",
        "any_value",
        "rollup",
        "cube",
        "grouping_sets",
    }
)

_DIRECTIONS = {operators.asc_op: False, operators.desc_op: True}
_NULLS = {operators.nulls_first_op: True, operators.nulls_last_op: False}
_C_COLLATIONS = frozenset({"C", "POSIX", "ucs_basic", "pg_c_utf8"})


def unsupported(reason: str) -> UnsupportedScatterError:
    """The error for a statement the merger cannot make globally correct (the reason is the message)."""
    return UnsupportedScatterError(
        f"cannot run this query across shards with a globally correct result: {reason}. "
        "Name the shard key in the WHERE clause, or opt into per-shard results with "
        "execution_options(per_shard_results=True)"
    )


def walk(element: ClauseElement) -> Iterator[ClauseElement]:
    """Every element of an expression, not descending into subqueries (they run per shard)."""
    stack = [element]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, (SelectBase, ScalarSelect, FromClause)) and not isinstance(
            current, FunctionElement
        ):
            continue
        stack.extend(current.get_children())


def function_name(element: ClauseElement) -> str | None:
    if isinstance(element, FunctionElement):
        return str(getattr(element, "name", "")).lower() or None
    return None


def is_aggregate(element: ClauseElement) -> bool:
    """A call of one of the mergeable aggregates (possibly with ``FILTER (WHERE ...)``)."""
    inner = getattr(element, "func", None) if type(element).__name__ == "FunctionFilter" else element
    return function_name(inner) in MERGEABLE_AGGREGATES if inner is not None else False


def check_mergeable(element: ClauseElement, where: str) -> bool:
    """Raise for window functions and non-decomposable aggregates; True when an aggregate occurs."""
    found = False
    for part in walk(element):
        if isinstance(part, (Over, WithinGroup)):
            raise unsupported(f"the window/ordered-set function in {where} is computed per shard")
        name = function_name(part)
        if name in NON_DECOMPOSABLE_AGGREGATES:
            raise unsupported(f"{name}() in {where} is not decomposable into per-shard parts")
        if name in MERGEABLE_AGGREGATES:
            found = True
            for arg in walk(part):
                if isinstance(arg, UnaryExpression) and arg.operator is operators.distinct_op:
                    raise unsupported(
                        f"{name}(DISTINCT ...) in {where} cannot be combined from per-shard values"
                    )
    return found


@dataclass(frozen=True)
class OrderTerm:
    """One ORDER BY item: the expression (labels and direction removed) and how it sorts."""

    expression: ColumnElement[Any]
    descending: bool
    nulls_first: bool | None
    label_name: str | None = None
    """Set when the item refers to a SELECT-list label by name (``order_by("total")``)."""


def order_terms(statement: Select[Any]) -> list[OrderTerm]:
    """The statement's ORDER BY items, unwrapped into expression, direction and NULLS placement."""
    terms = []
    for item in statement._order_by_clauses:
        element: Any = item
        descending = False
        nulls_first: bool | None = None
        label_name: str | None = None
        while True:
            if isinstance(element, _textual_label_reference):
                label_name = str(element.element)
                element = _selected_by_name(statement, label_name)
                continue
            if isinstance(element, _label_reference):
                element = element.element
                continue
            if isinstance(element, UnaryExpression) and element.modifier in _DIRECTIONS:
                descending = _DIRECTIONS[element.modifier]
                element = element.element
                continue
            if isinstance(element, UnaryExpression) and element.modifier in _NULLS:
                nulls_first = _NULLS[element.modifier]
                element = element.element
                continue
            break
        if not isinstance(element, ColumnElement):
            raise unsupported(f"ORDER BY {element} is not a column expression whose values can be compared")
        if isinstance(element, Label):
            label_name = label_name or element.name
        terms.append(OrderTerm(element, descending, nulls_first, label_name))
    return terms


def _selected_by_name(statement: Select[Any], name: str) -> ColumnElement[Any]:
    for key, column in statement.selected_columns.items():
        if key == name or getattr(column, "name", None) == name:
            return column
    raise unsupported(f"ORDER BY {name!r} names no column of the SELECT list")


def unlabel(element: ColumnElement[Any]) -> ColumnElement[Any]:
    while isinstance(element, Label):
        element = element.element
    return element


def enum_ranks(element: ColumnElement[Any]) -> dict[Any, int] | None:
    """Sort positions of an ENUM's values (PostgreSQL orders enums by declaration, not by name)."""
    type_ = element.type
    if not isinstance(type_, sqltypes.Enum):
        return None
    ranks: dict[Any, int] = {label: i for i, label in enumerate(type_.enums)}
    for value, label in getattr(type_, "_valid_lookup", {}).items():
        if label in ranks and value is not None:
            try:
                ranks[value] = ranks[label]
            except TypeError:  # an unhashable value object; labels still work
                pass
    return ranks


def check_collation(element: ColumnElement[Any], where: str) -> None:
    """Text in a non-C collation sorts differently in Python than in PostgreSQL."""
    collation = getattr(element.type, "collation", None)
    if collation is not None and collation.strip('"') not in _C_COLLATIONS:
        raise unsupported(f"{where} uses collation {collation!r}; cross-shard merges compare text as 'C'")


def int_clause(statement: Select[Any], which: str) -> int | None:
    """LIMIT or OFFSET as an int (``None`` when absent); bound expressions cannot be pushed down."""
    try:
        value = statement._limit if which == "limit" else statement._offset
    except sa_exc.CompileError:
        raise unsupported(f"the {which.upper()} is not a plain integer") from None
    return value
