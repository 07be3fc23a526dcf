"""Where a statement, an instance or a primary key goes: the one place that decides routing.

Every key -> shard decision funnels through :func:`shards_for_key` (which asks the manager's
placement, :mod:`sa_shardkit.placement`); the session, scatter-gather, sagas and rebalancing call the
functions here instead of deriving a shard themselves.

Statement analysis reads the WHERE clause (and the ON clauses of inner Core joins): a comparison
``key_column == value`` or ``key_column.in_(values)`` on any sharded table in the statement limits
the statement to those keys' shards, ``and_`` intersects, ``or_`` unites; values may be literals or
bound parameters (the execute-time ``params`` are consulted). Anything else goes to every shard on
the ring. Statements touching only reference tables read from one shard and write to all.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnElement,
    Grouping,
    TextClause,
)
from sqlalchemy.sql.selectable import AliasedReturnsRows, CompoundSelect, FromClause, Join, Select

from .declarative import Sharding, base_table, mapper_for_table, sharding_of, table_sharding
from .errors import InvalidShardKeyError, NotShardedError, ShardKeyMissingError

if TYPE_CHECKING:
    from .manager import ShardManager

log = logging.getLogger("sa_shardkit.routing")

_MAX_KEYS_IN_REASON = 5


@dataclass(frozen=True)
class Route:
    """The shards a statement targets and, for the debug log and users, why."""

    shard_ids: tuple[str, ...]
    reason: str
    reference: bool = False
    """Only reference tables (or no table): any shard could answer a read."""

    @property
    def scatter(self) -> bool:
        return len(self.shard_ids) > 1


class ColumnRouter(Protocol):
    """Routes ``column == value`` / ``column IN values`` for a column that is not a shard key.

    Returns the shards the matching rows can be on (``None``: no opinion, i.e. every shard) and may
    append to ``keys`` what the route's reason should show. :mod:`sa_shardkit.lookups` is one.
    """

    def __call__(
        self, manager: ShardManager, column: Any, values: list[Any], keys: list[Any], write: bool
    ) -> set[str] | None: ...


_column_routers: list[ColumnRouter] = []


def add_column_router(router: ColumnRouter) -> None:
    """Consult ``router`` for comparisons on columns other than the shard key (see ColumnRouter)."""
    if router not in _column_routers:
        _column_routers.append(router)
        _key_bind_positions.clear()  # shapes planned without it may now depend on a value


def _routed_by_column(
    manager: ShardManager, column: Any, values: list[Any], keys: list[Any], write: bool
) -> set[str] | None:
    for router in _column_routers:
        found = router(manager, column, values, keys, write)
        if found is not None:
            return found
    return None


# -- key -> shard: the single funnel -----------------------------------------------------------


def shards_for_key(manager: ShardManager, key: Any, *, write: bool = False) -> tuple[str, ...]:
    """The shard(s) holding ``key``: one shard today; the write shard first if ever more.

    The one function that maps a key to shards, for reads (``write=False``) and writes. The
    manager's placement answers (the stored ring, followed by itself): a key in a range that is
    mid-move lives on its old or its new shard; one on a shard the configuration lacks raises
    :class:`~sa_shardkit.UnknownShardError`.
    """
    return manager.placement.shards_for_key(key, write=write)


def follows_placement(manager: ShardManager | None) -> bool:
    """Whether a move is in flight now, so reads of moving keys need re-checking.

    Lets the session skip :func:`watch_moving_reads` and :func:`moving_reads_valid` entirely
    when no move is in flight, the common case.
    """
    return manager is not None and manager.placement.moving()


@contextmanager
def watch_moving_reads(manager: ShardManager | None) -> Iterator[list[Any]]:
    """Collect the read answers of :func:`shards_for_key` that a concurrent rebalance cut-over may
    invalidate (keys read from their old shard while their range moves); empty without a move.

    After running the read, :func:`moving_reads_valid` says whether it must be routed and run again.
    """
    if manager is None:
        yield []
        return
    with manager.placement.watch_reads() as watched:
        yield watched


def moving_reads_valid(manager: ShardManager | None, reads: list[Any]) -> bool:
    """Whether every watched read answer still holds after the read ran (see :func:`watch_moving_reads`)."""
    return not reads or manager is None or manager.placement.reads_still_valid(reads)


def ring_moved_on(manager: ShardManager | None, shard_ids: Sequence[str]) -> bool:
    """After a keyed read found nothing on ``shard_ids``: did the stored ring change there since
    this process routed by it (a ring stored, a move started or finished)? Then the new state is
    adopted: route and read again. One small query per shard (none on SQLite)."""
    return manager is not None and manager.placement.ring_changed(shard_ids)


def shard_for_key(manager: ShardManager, key: Any) -> str:
    """The shard a new row with ``key`` is written to."""
    return shards_for_key(manager, key, write=True)[0]


def ring_shards(manager: ShardManager) -> tuple[str, ...]:
    """Shards that may hold rows (the stored ring's members), configured ones first: where a
    scatter goes. A member the configuration lacks is included: binding it raises
    :class:`~sa_shardkit.UnknownShardError` (a scatter with ``allow_partial`` reports it missing)."""
    return manager.placement.scatter_shards()


def reference_read_shard(manager: ShardManager) -> str:
    """The shard reference tables are read from: the first configured shard on the ring."""
    shards = ring_shards(manager)
    return next((s for s in shards if manager.has_shard(s)), shards[0])


def reference_write_shards(manager: ShardManager) -> tuple[str, ...]:
    """Every configured shard and every ring member: reference rows are written everywhere (new
    shards included; a member the configuration lacks raises when bound, nothing is skipped)."""
    return _in_order(manager, set(manager.shard_ids) | set(ring_shards(manager)))


def _in_order(manager: ShardManager, wanted: set[str]) -> tuple[str, ...]:
    """``wanted`` in configuration order, then ring members the configuration lacks."""
    configured = manager.shard_ids
    if wanted.issubset(configured):
        return tuple(s for s in configured if s in wanted)
    return tuple(dict.fromkeys(s for s in (*configured, *ring_shards(manager)) if s in wanted))


# -- instances ---------------------------------------------------------------------------------


def shard_for_instance(manager: ShardManager, instance: object, mapper: Mapper[Any] | None = None) -> str:
    """The shard a pending instance is written to: its key's, or its parent's when it has none.

    Reference instances go to :func:`reference_read_shard` (the session copies them to the
    other shards). A sharded instance without a key and without a parent in a relationship
    raises :class:`ShardKeyMissingError` naming the model and attribute.
    """
    sharding = sharding_of(mapper if mapper is not None else instance)
    if sharding.reference:
        return reference_read_shard(manager)
    assert sharding.attribute is not None
    key = instance.__dict__.get(sharding.attribute)
    if key is not None:
        return shard_for_key(manager, key)
    parent_shard = parent_shard_of(manager, instance)
    if parent_shard is not None:
        return parent_shard
    raise ShardKeyMissingError(
        f"{sharding.name}.{sharding.attribute} is None: set the shard key (or attach the object to a "
        f"parent) before flushing; nothing was written"
    )


def parent_shard_of(manager: ShardManager, instance: object, _seen: set[int] | None = None) -> str | None:
    """The shard of a parent object this instance hangs from (many-to-one), if any."""
    from sqlalchemy import inspect

    state = inspect(instance)
    seen = _seen if _seen is not None else set()
    if id(instance) in seen:
        return None
    seen.add(id(instance))
    for rel in state.mapper.relationships:
        if rel.direction.name != "MANYTOONE":
            continue
        parent = state.dict.get(rel.key)
        if parent is None:
            continue
        parent_state = inspect(parent)
        if parent_state.key is not None:
            return parent_state.key[2]  # type: ignore[no-any-return]
        if parent_state.identity_token is not None:
            return parent_state.identity_token  # type: ignore[no-any-return]
        try:
            parent_sharding = sharding_of(parent_state.mapper)
        except NotShardedError:
            continue
        if parent_sharding.reference:
            continue
        assert parent_sharding.attribute is not None
        key = parent_state.dict.get(parent_sharding.attribute)
        if key is not None:
            return shard_for_key(manager, key)
        found = parent_shard_of(manager, parent, seen)
        if found is not None:
            return found
    return None


# -- primary keys ------------------------------------------------------------------------------


def route_identity(manager: ShardManager, mapper: Mapper[Any], primary_key: Sequence[Any]) -> Route:
    """Where ``session.get(Model, primary_key)`` may find its row."""
    sharding = sharding_of(mapper)
    if sharding.reference:
        return Route((reference_read_shard(manager),), f"reference table {sharding.name}", True)
    cached = _key_index_in_pk.get(mapper)
    if cached is None:
        names = [c.name for c in mapper.primary_key]
        index = names.index(sharding.column_name) if sharding.column_name in names else None
        cached = _key_index_in_pk[mapper] = (index, f"primary key holds {sharding.describe_key()}")
    index, reason = cached
    if index is not None and index < len(primary_key) and primary_key[index] is not None:
        return Route(shards_for_key(manager, primary_key[index]), reason)
    if _column_routers and len(primary_key) == len(mapper.primary_key):
        keys: list[Any] = []
        for column, value in zip(mapper.primary_key, primary_key, strict=True):
            found = _routed_by_column(manager, column, [value], keys, False) if value is not None else None
            if found is not None:
                return _keyed_route(manager, found, f"primary key of {sharding.name}: {keys[-1]!r}")
    return Route(
        ring_shards(manager),
        f"primary key of {sharding.name} lacks the shard key {sharding.attribute}: searching every shard",
    )


_key_index_in_pk: weakref.WeakKeyDictionary[Mapper[Any], tuple[int | None, str]] = weakref.WeakKeyDictionary()
"""mapper -> (position of the shard key in its primary key (None: not in it), route reason)."""


def identity_shard(manager: ShardManager, mapper: Mapper[Any], primary_key: Sequence[Any]) -> str | None:
    """The one shard ``session.get(Model, primary_key)`` reads, in the common case only: the
    primary key holds the shard key and no move is in flight. None otherwise: ask
    :func:`route_identity` (reference tables, keys outside the primary key, moves, lookups).

    The session's ``get()`` asks this first; the answer is :func:`route_identity`'s.
    """
    # kept on the mapper itself: one attribute read (a weak-keyed dict needed a weakref per call)
    try:
        index: int = mapper._sa_shardkit_key_index  # type: ignore[attr-defined]
    except AttributeError:
        index = mapper._sa_shardkit_key_index = _pk_key_index(mapper)  # type: ignore[attr-defined]
    if index < 0 or index >= len(primary_key):
        return None
    key = primary_key[index]
    return None if key is None else manager.placement.settled_shard(key)


def _pk_key_index(mapper: Mapper[Any]) -> int:
    """Where the shard key sits in ``mapper``'s primary key; -1: not there, or a reference table."""
    sharding = sharding_of(mapper)
    if sharding.reference:
        return -1
    names = [c.name for c in mapper.primary_key]
    return names.index(sharding.column_name) if sharding.column_name in names else -1


# -- statements --------------------------------------------------------------------------------


def route_statement(
    manager: ShardManager,
    statement: ClauseElement,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Route:
    """The shards ``statement`` (executed with ``params``) targets, without running it."""
    if isinstance(statement, TextClause):
        raise NotShardedError(
            "a text() statement cannot be routed: pass bind_arguments={'shard_id': ...} "
            "or execution_options(shard_id=...)"
        )
    if isinstance(statement, CompoundSelect):
        routes = [route_statement(manager, s, params) for s in statement.selects]
        return _union_routes(manager, routes)
    if isinstance(statement, Insert):
        groups = group_insert_rows(manager, statement, params)
        return Route(tuple(groups), insert_reason(groups))
    if isinstance(statement, (Update, Delete)):
        return _route_filtered(manager, [statement.table], [statement.whereclause], params, write=True)
    if isinstance(statement, Select):
        fast = _route_keyed_select(manager, statement, params)
        if fast is not None:
            return fast
        froms, criteria = _select_parts(statement)
        return _route_filtered(manager, froms, criteria, params, write=False)
    raise NotShardedError(f"cannot route a {type(statement).__name__} statement; pass a shard_id")


def _union_routes(manager: ShardManager, routes: list[Route]) -> Route:
    wanted = {s for r in routes for s in r.shard_ids}
    ordered = _in_order(manager, wanted)
    return Route(ordered, "; ".join(r.reason for r in routes))


def _route_keyed_select(manager: ShardManager, statement: Select[Any], params: Any) -> Route | None:
    """The common case cheaply: a SELECT whose WHERE names shard keys; ``None`` otherwise.

    Skips the FROM analysis (subqueries can only narrow a keyed route further, and a wider
    route stays correct); undeclared tables among the selected entities still raise.
    A SELECT limited by one shard-key comparison is analysed once per statement shape (its
    SQLAlchemy cache key, see :func:`_key_bind_position`); later ones only look up that bound
    value's shard, by the ring routing follows at that moment.
    """
    if statement._from_obj:
        return None
    cache_key = statement._generate_cache_key()  # memoized: SQLAlchemy's compile reuses it
    if cache_key is not None and (not params or isinstance(params, Mapping)):
        position = _key_bind_positions.get(cache_key.key, _UNPLANNED)
        if position is _UNPLANNED:
            position = _plan_select(statement, cache_key)
        if position is not None:
            values = _bound_values(cache_key.bindparams[position], params)
            if values is not None:
                try:
                    if len(values) == 1:
                        shards = set(shards_for_key(manager, values[0]))
                    else:
                        shards = {s for v in values for s in shards_for_key(manager, v)}
                except InvalidShardKeyError:
                    pass  # analysed in full below: such a value does not route
                else:
                    return _keyed_route(manager, shards, _keys_reason(values))
    criteria = _keyed_select_criteria(statement)
    keys: list[Any] = []
    shards_found: set[str] | None = None
    for criterion in criteria:
        found = _shards_in(manager, criterion, params, keys, False)
        if found is not None:
            shards_found = set(found) if shards_found is None else shards_found & found
    if shards_found is None:
        return None
    _check_selected_declared(statement)
    return _keyed_route(manager, shards_found, _keys_reason(keys))


def keyed_select_shard(manager: ShardManager, statement: Select[Any], params: Any) -> str | None:
    """The one shard a SELECT reads, in the common case only: its shape (SQLAlchemy cache key)
    is limited by one ``key == :value`` and no move is in flight. None otherwise: ask
    :func:`route_statement` (which gives the same shard for such a SELECT, and a reason).

    The shape is planned once (:data:`_key_bind_positions`); the value is routed by the ring
    routing follows at that moment, every time.
    """
    if statement._from_obj:
        return None
    cache_key = statement._generate_cache_key()  # memoized: SQLAlchemy's compile reuses it
    if cache_key is None:
        return None
    position = _key_bind_positions.get(cache_key.key, _UNPLANNED)
    if position is _UNPLANNED:
        position = _plan_select(statement, cache_key)
    if position is None:
        return None
    bind = cache_key.bindparams[position]
    if bind.expanding:
        return None
    if params and not isinstance(params, Mapping):
        return None  # executemany parameters: route_statement
    if params and bind.key in params:
        key = params[bind.key]
    else:
        key = bind.value if bind.callable is None else bind.callable()  # its effective_value
    if key is None:
        return None
    try:
        return manager.placement.settled_shard(key)
    except InvalidShardKeyError:
        return None  # route_statement analyses it in full: such a value does not route


def _plan_select(statement: Select[Any], cache_key: Any) -> int | None:
    position = _key_bind_position(statement, cache_key.bindparams)
    if len(_key_bind_positions) >= _MAX_PLANS:
        _key_bind_positions.clear()
    _key_bind_positions[cache_key.key] = position
    return position


def _keyed_select_criteria(statement: Select[Any]) -> list[Any]:
    """The WHERE criteria and inner-join ON clauses of a SELECT, all ANDed together."""
    criteria: list[Any] = list(statement._where_criteria)
    for _target, onclause, _from, flags in statement._setup_joins:
        if not flags.get("isouter") and isinstance(onclause, ColumnElement):
            criteria.append(onclause)
    return criteria


def _check_selected_declared(statement: Select[Any]) -> None:
    """Raise NotShardedError for an undeclared table among the selected entities and joins."""
    for column in statement._raw_columns:
        table = column if isinstance(column, FromClause) else getattr(column, "table", None)
        if table is not None:
            _declared(table)
    for target, *_ in statement._setup_joins:
        for table in _join_target_tables(target):
            _declared(table)


_UNPLANNED: Any = object()
_MAX_PLANS = 4096
_key_bind_positions: dict[Any, int | None] = {}
"""SELECT cache key -> position (in its cache key's bound parameters) of the one shard-key value
that routes it, or None: analysed in full every time. Structure only: no ring, no value is kept,
so a ring change never makes an entry stale."""


def _key_bind_position(statement: Select[Any], bindparams: Sequence[BindParameter[Any]]) -> int | None:
    """Where the one bound shard-key value that routes ``statement`` sits among ``bindparams``.

    The shape :func:`_shards_in` would route by that value alone: the criteria ANDed, exactly
    one ``key == :value`` / ``key IN :values`` among them, and nothing else whose answer
    depends on a value (an OR, a column a lookup routes). Anything else: None.
    """
    leaves: list[Any] = []
    for criterion in _keyed_select_criteria(statement):
        if not _and_leaves(criterion, leaves):
            return None
    key_bind: BindParameter[Any] | None = None
    for leaf in leaves:
        if not isinstance(leaf, BinaryExpression):
            continue  # routes nothing (see _shards_in)
        if leaf.operator is operators.eq:
            sides = [(leaf.left, leaf.right), (leaf.right, leaf.left)]
        elif leaf.operator is operators.in_op:
            sides = [(leaf.left, leaf.right)]
        else:
            continue
        for column, other in sides:
            bind = _bind_of(other)
            if _key_column(column) is None:
                if _column_routers and bind is not None:
                    return None  # a lookup's answer depends on the value
                continue
            if bind is None:
                continue
            if key_bind is not None:
                return None  # two key comparisons: their shards intersect, value by value
            key_bind = bind
            break
    if key_bind is None:
        return None
    position = next((i for i, b in enumerate(bindparams) if b is key_bind), None)
    if position is not None:
        _check_selected_declared(statement)
    return position


def _and_leaves(expr: Any, out: list[Any]) -> bool:
    """Append the ANDed parts of ``expr`` to ``out``; False when an OR (or the like) is among them."""
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BooleanClauseList):
        if expr.operator is not operators.and_:
            return False
        return all(_and_leaves(clause, out) for clause in expr.clauses)
    out.append(expr)
    return True


def _bind_of(element: Any) -> BindParameter[Any] | None:
    while isinstance(element, Grouping):
        element = element.element
    return element if isinstance(element, BindParameter) else None


def _keyed_route(manager: ShardManager, shards: set[str], reason: str) -> Route:
    if not shards:
        return Route(ring_shards(manager)[:1], f"{reason}: the conditions exclude every shard")
    if len(shards) == 1:
        return Route(tuple(shards), reason)
    return Route(_in_order(manager, shards), reason)


def _select_parts(statement: Select[Any]) -> tuple[list[FromClause], list[ColumnElement[Any] | None]]:
    froms: list[FromClause] = [*statement.columns_clause_froms, *statement._from_obj]
    criteria: list[ColumnElement[Any] | None] = list(statement._where_criteria)  # ANDed together
    for target, onclause, _from, _flags in statement._setup_joins:
        froms.extend(_join_target_tables(target))
        if not _flags.get("isouter") and isinstance(onclause, ColumnElement):
            criteria.append(onclause)
    expanded: list[FromClause] = []
    for from_ in froms:
        _flatten_from(from_, expanded, criteria)
    return expanded, criteria


def _join_target_tables(target: Any) -> list[FromClause]:
    from sqlalchemy import inspect

    if isinstance(target, FromClause):
        return [target]
    insp = inspect(target, raiseerr=False)
    if insp is None:
        return []
    prop = getattr(insp, "property", None)
    if prop is not None and hasattr(prop, "mapper"):  # a relationship attribute
        return [prop.mapper.local_table]
    selectable = getattr(insp, "selectable", None)
    return [selectable] if isinstance(selectable, FromClause) else []


def _flatten_from(
    from_: FromClause, out: list[FromClause], criteria: list[ColumnElement[Any] | None]
) -> None:
    if isinstance(from_, Join):
        _flatten_from(from_.left, out, criteria)
        _flatten_from(from_.right, out, criteria)
        if not from_.isouter and not from_.full:
            criteria.append(from_.onclause)
    else:
        out.append(from_)


def _route_filtered(
    manager: ShardManager,
    froms: Iterable[FromClause],
    criteria: Iterable[ColumnElement[Any] | None],
    params: Any,
    *,
    write: bool,
) -> Route:
    sharded: list[Sharding] = []
    reference: list[Sharding] = []
    inner: set[str] | None = None
    inner_reasons: list[str] = []
    every_shard_subquery: str | None = None
    for from_ in froms:
        # AliasedReturnsRows: subquery(), CTEs and the anonymous alias of Query.count()/from_self()
        inner_select: Any = from_
        while isinstance(inner_select, AliasedReturnsRows):
            inner_select = inner_select.element
        if isinstance(inner_select, (Select, CompoundSelect)):
            sub = route_statement(manager, inner_select, params)
            if len(sub.shard_ids) < len(ring_shards(manager)):
                inner = set(sub.shard_ids) if inner is None else inner & set(sub.shard_ids)
                inner_reasons.append(f"subquery: {sub.reason}")
            else:  # a subquery over every shard makes the whole SELECT a scatter
                every_shard_subquery = sub.reason
            continue
        declared = _declared(from_)
        if declared is None:
            continue
        (reference if declared.reference else sharded).append(declared)
    if not sharded and inner is None and every_shard_subquery is None:
        if reference and write:
            return Route(
                reference_write_shards(manager), f"reference table {reference[0].name}: every shard", True
            )
        names = ", ".join(sorted({r.name for r in reference})) or "no table"
        return Route((reference_read_shard(manager),), f"reference tables only ({names})", True)
    keys: list[Any] = []
    shards: set[str] | None = inner
    for criterion in criteria:
        if criterion is None:
            continue
        found = _shards_in(manager, criterion, params, keys, write)
        if found is not None:
            shards = set(found) if shards is None else shards & found
    if shards is None:
        if not sharded and every_shard_subquery is not None:
            return Route(ring_shards(manager), f"subquery: {every_shard_subquery}")
        names = ", ".join(sorted({s.describe_key() for s in sharded}))
        return Route(ring_shards(manager), f"no condition on the shard key ({names}): every shard")
    return _keyed_route(manager, shards, _keys_reason(keys) + "".join(f"; {r}" for r in inner_reasons))


def _declared(from_: FromClause) -> Sharding | None:
    """The declaration of a FROM element; raises for undeclared tables, skips unknown constructs."""
    table = base_table(from_)
    if table is None:
        return None
    declared = table_sharding(table)
    if declared is None:
        mapper = mapper_for_table(table)
        if mapper is not None:
            sharding_of(mapper)  # raises NotShardedError naming the model
        raise NotShardedError(
            f"table {getattr(table, 'name', table)!r} declares no shard key: map it with "
            "__shard_key__/__shard_reference__, or set Table(info={'shard_key': column}) / "
            "info={'shard_reference': True}"
        )
    return declared


def _key_column(element: Any) -> Sharding | None:
    table = getattr(element, "table", None)
    if table is None:
        return None
    declared = table_sharding(table)
    if declared is None or declared.reference or element.name != declared.column_name:
        return None
    return declared


def _bound_values(element: Any, params: Any) -> list[Any] | None:
    while isinstance(element, Grouping):
        element = element.element
    if not isinstance(element, BindParameter):
        return None
    if params and isinstance(params, Mapping) and element.key in params:
        value = params[element.key]
    else:
        value = element.effective_value
    if value is None:
        return None
    if element.expanding:
        return list(value)
    return [value]


def _shards_in(
    manager: ShardManager, expr: Any, params: Any, keys: list[Any], write: bool
) -> set[str] | None:
    """Shards the rows matching ``expr`` can be on; ``None`` when ``expr`` does not say."""
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BooleanClauseList):
        parts = [_shards_in(manager, c, params, keys, write) for c in expr.clauses]
        if expr.operator is operators.and_:
            found: set[str] | None = None
            for part in parts:
                if part is not None:
                    found = set(part) if found is None else found & part
            return found
        if expr.operator is operators.or_:
            if any(p is None for p in parts):
                return None
            return set().union(*parts)  # type: ignore[arg-type]
        return None
    sides = _comparison_sides(expr)
    if sides is None:
        return None
    for column, other in sides:
        if _key_column(column) is None:
            if _column_routers:
                values = _bound_values(other, params)
                found = _routed_by_column(manager, column, values, keys, write) if values else None
                if found is not None:
                    return found
            continue
        values = _bound_values(other, params)
        if values is None:
            continue
        try:
            shards = {s for v in values for s in shards_for_key(manager, v, write=write)}
        except InvalidShardKeyError:
            return None
        keys.extend(values)
        return shards
    return None


# -- the keys a write names: what the rebalance fence must hold ------------------------------


def write_keys(
    manager: ShardManager,
    statement: ClauseElement,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[Any]] | None:
    """Shard -> the shard keys a Core INSERT / UPDATE / DELETE writes there, routed now.

    The keys are an INSERT's rows' keys, or the shard-key values an UPDATE's / DELETE's WHERE
    limits it to (``key == v``, ``key.in_(...)``, combined by ``and_``/``or_``). None when the
    statement names no keys (a write on every shard, or one routed by a lookup), or writes a
    reference table: such a write cannot be fenced by key.
    """
    if isinstance(statement, Insert):
        declared = _declared(statement.table)
        if declared is None or declared.reference:
            return None
        names = [n for n in (declared.attribute, declared.column_key, declared.column_name) if n]
        values = []
        for row in _insert_rows(statement, params):
            value = next((row[n] for n in names if row.get(n) is not None), None)
            if isinstance(value, BindParameter):
                value = value.effective_value
            if value is None:
                return None  # group_insert_rows raises for it
            values.append(value)
    elif isinstance(statement, (Update, Delete)):
        declared = _declared(statement.table)
        if declared is None or declared.reference or statement.whereclause is None:
            return None
        found = _key_values(statement.whereclause, params)
        if found is None:
            return None
        values = list(found)
    else:
        return None
    by_shard: dict[str, list[Any]] = {}
    for value in values:
        by_shard.setdefault(shard_for_key(manager, value), []).append(value)
    return by_shard


def _comparison_sides(expr: Any) -> list[tuple[Any, Any]] | None:
    """(column, other side) pairs of an ``==`` (either way round) or ``IN``; None for anything else."""
    if not isinstance(expr, BinaryExpression):
        return None
    if expr.operator is operators.eq:
        return [(expr.left, expr.right), (expr.right, expr.left)]
    if expr.operator is operators.in_op:
        return [(expr.left, expr.right)]
    return None


def _key_values(expr: Any, params: Any) -> list[Any] | None:
    """The shard-key values ``expr`` limits the rows to; None when it does not limit them."""
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BooleanClauseList):
        parts = [_key_values(c, params) for c in expr.clauses]
        if expr.operator is operators.and_:
            known = [p for p in parts if p is not None]
            if not known:
                return None
            common = set(known[0]).intersection(*known[1:]) if len(known) > 1 else set(known[0])
            return [v for v in known[0] if v in common]
        if expr.operator is operators.or_:
            if any(p is None for p in parts):
                return None
            return list(dict.fromkeys(v for p in parts for v in p))  # type: ignore[union-attr]
        return None
    sides = _comparison_sides(expr)
    if sides is None:
        return None
    for column, other in sides:
        if _key_column(column) is not None:
            values = _bound_values(other, params)
            if values is not None:
                return values
    return None


def _keys_reason(keys: list[Any]) -> str:
    if len(keys) <= _MAX_KEYS_IN_REASON:
        return f"shard key in {keys!r}"
    return f"shard key in {keys[:_MAX_KEYS_IN_REASON]!r} and {len(keys) - _MAX_KEYS_IN_REASON} more"


# -- inserts -----------------------------------------------------------------------------------


def group_insert_rows(
    manager: ShardManager,
    statement: Insert,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
) -> dict[str, list[int]]:
    """Shard -> indexes of the rows of an INSERT (``params`` list, or ``.values()``) it holds.

    Reference tables: every shard, all rows. A row without the key raises
    :class:`ShardKeyMissingError` before anything runs.
    """
    declared = _declared(statement.table)
    if declared is None:
        raise NotShardedError(f"cannot route an INSERT into {statement.table}")
    rows = _insert_rows(statement, params)
    if declared.reference:
        return {s: list(range(len(rows))) for s in reference_write_shards(manager)}
    names = [n for n in (declared.attribute, declared.column_key, declared.column_name) if n]
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        value = next((row[n] for n in names if row.get(n) is not None), None)
        if isinstance(value, BindParameter):
            value = value.effective_value
        if value is None:
            raise ShardKeyMissingError(
                f"INSERT into {declared.name}: row {index} has no value for the shard key "
                f"{declared.attribute or declared.column_name}; nothing was written"
            )
        groups.setdefault(shard_for_key(manager, value), []).append(index)
    return groups


def _insert_rows(statement: Insert, params: Any) -> list[dict[str, Any]]:
    values: dict[str, Any] = {}
    for column, value in (statement._values or {}).items():
        values[column if isinstance(column, str) else column.key] = value
    multi = statement._multi_values
    if multi:
        rows: list[dict[str, Any]] = []
        for batch in multi:
            for row in batch:
                if isinstance(row, Mapping):
                    rows.append({(c if isinstance(c, str) else c.key): v for c, v in row.items()})
                else:
                    cols = list(statement.table.c)
                    rows.append({cols[i].key: v for i, v in enumerate(row)})
        return rows
    if isinstance(params, Mapping):
        return [{**values, **params}]
    if params:
        return [{**values, **p} for p in params]
    return [values]


def insert_reason(groups: Mapping[str, list[int]]) -> str:
    """How an INSERT's rows were split, for the debug log."""
    return "rows by shard key: " + ", ".join(f"{len(rows)} -> {shard}" for shard, rows in groups.items())
