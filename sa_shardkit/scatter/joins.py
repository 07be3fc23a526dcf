"""Refusing joins whose rows live on different shards.

Each shard joins only its own rows. That is the global answer when every pair of sharded tables in
the query is joined on their shard keys (a customer's orders and items meet on the customer's shard)
or one side is a reference table. A join of two sharded tables on anything else would silently miss
every pair of rows that sit on different shards, so it raises instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, ColumnClause, ColumnElement
from sqlalchemy.sql.selectable import FromClause, Join, Select
from sqlalchemy.sql.util import join_condition

from ..declarative import Sharding, base_table, table_sharding
from .analysis import unsupported, walk


def check_joins(statement: Select[Any]) -> None:
    """Raise UnsupportedScatterError when two sharded tables are joined off their shard keys."""
    froms: list[FromClause] = []
    criteria: list[Any] = list(statement._where_criteria)
    for from_ in [*statement.columns_clause_froms, *statement._from_obj]:
        _flatten(from_, froms, criteria)
    for target, onclause, _left, _flags in statement._setup_joins:
        joined, implied = _join_target(target)
        if onclause is None and not implied:  # .join(Entity): the ORM joins along the foreign keys
            implied = _foreign_key_conditions(froms, joined)
        froms.extend(joined)
        criteria.extend(implied)
        if onclause is not None and isinstance(onclause, ColumnElement):
            criteria.append(onclause)
    sharded: dict[Any, tuple[FromClause, Sharding]] = {}
    for from_ in froms:
        sharding = _sharding(from_)
        if sharding is not None and not sharding.reference:
            sharded.setdefault(_identity(from_), (from_, sharding))
    if len(sharded) < 2:
        return
    groups = {key: key for key in sharded}

    def find(key: Any) -> Any:
        while groups[key] != key:
            key = groups[key]
        return key

    for left, right in _equalities(criteria):
        left_key, right_key = _key_owner(left, sharded), _key_owner(right, sharded)
        if left_key is not None and right_key is not None:
            groups[find(left_key)] = find(right_key)
    components: dict[Any, list[str]] = {}
    for key, (_, sharding) in sharded.items():
        components.setdefault(find(key), []).append(sharding.name)
    if len(components) > 1:
        names = sorted(names[0] for names in components.values())
        raise unsupported(
            f"{' and '.join(names)} are sharded tables joined without equating their shard keys, "
            "so rows on different shards would never meet"
        )


def _flatten(from_: Any, out: list[FromClause], criteria: list[Any]) -> None:
    if isinstance(from_, Join):
        _flatten(from_.left, out, criteria)
        _flatten(from_.right, out, criteria)
        criteria.append(from_.onclause)
    else:
        out.append(from_)


def _join_target(target: Any) -> tuple[list[FromClause], list[Any]]:
    """The FROM a ``.join(target)`` adds, and the condition a relationship target implies."""
    if isinstance(target, FromClause):
        return [target], []
    insp = inspect(target, raiseerr=False)
    prop = getattr(insp, "property", None)
    if prop is not None and hasattr(prop, "mapper"):  # a relationship attribute
        entity = getattr(insp, "_of_type", None)
        selectable = inspect(entity).selectable if entity is not None else prop.mapper.local_table
        implied = [prop.primaryjoin] + ([prop.secondaryjoin] if prop.secondaryjoin is not None else [])
        return [selectable], implied
    selectable = getattr(insp, "selectable", None)
    return ([selectable] if isinstance(selectable, FromClause) else []), []


def _foreign_key_conditions(left: list[FromClause], right: list[FromClause]) -> list[Any]:
    found = []
    for a in left:
        for b in right:
            try:
                found.append(join_condition(a, b))
            except sa_exc.ArgumentError:  # no foreign key between them (or ambiguous)
                continue
    return found


def _sharding(from_: FromClause) -> Sharding | None:
    table = base_table(from_)
    return table_sharding(table) if table is not None else None


def _identity(from_: Any) -> Any:
    return from_._deannotate()


def _equalities(criteria: Iterable[Any]) -> Iterator[tuple[ColumnClause[Any], ColumnClause[Any]]]:
    for criterion in criteria:
        if criterion is None:
            continue
        for part in walk(criterion):
            if (
                isinstance(part, BinaryExpression)
                and part.operator is operators.eq
                and isinstance(part.left, ColumnClause)
                and isinstance(part.right, ColumnClause)
            ):
                yield part.left, part.right


def _key_owner(column: ColumnClause[Any], sharded: dict[Any, tuple[FromClause, Sharding]]) -> Any:
    """The sharded FROM whose shard-key column ``column`` is, if any."""
    table = getattr(column, "table", None)
    if table is None:
        return None
    key = _identity(table)
    found = sharded.get(key)
    if found is None:
        # relationship conditions name the base tables; match them when that table appears once
        matches = [k for k, (f, _) in sharded.items() if base_table(f) is base_table(table)]
        if len(matches) != 1:
            return None
        key, found = matches[0], sharded[matches[0]]
    return key if column.name == found[1].column_name else None
