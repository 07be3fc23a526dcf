"""Merge before loading: ORM entities are built only for the rows a LIMIT scatter returns.

With ``LIMIT k`` each shard sends up to ``offset + k`` rows, but only ``offset + k`` of all those
survive the merge. The shards' rows are already in memory (client-side cursors), so the merge is
first run on their raw ORDER BY values alone; each shard's buffered rows are then cut to the prefix
the merge uses, and the ORM loads just those. Skipped whenever rows and entities are not 1:1
(joined eager loads), for DISTINCT, and for streaming (server-side) cursors.
"""

from __future__ import annotations

import datetime as dt
import heapq
import uuid
import weakref
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from itertools import chain, repeat
from operator import add, itemgetter, le
from typing import Any

from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy

from .ordering import row_key
from .plan import HIDDEN_PREFIX, RowPlan


def trim_to_merged_prefix(
    plan: RowPlan, results: Mapping[str, Any], shard_order: Sequence[str], *, lean: bool = False
) -> list[str] | None:
    """Cut each shard's buffered rows to the part the merged LIMIT uses.

    Returns the merge's answer: the shard of each of the ``offset + limit`` merged rows, in order
    (so the rows need not be merged again once loaded); ``None`` when not applicable.
    ``lean``: the shards ran ``plan.lean`` (no hidden columns): the sort keys are read from the
    selected columns ``plan.lean_columns`` (None when a row does not hold one of them).
    """
    if plan.limit is None or not plan.order or plan.distinct:
        return None
    shards = [s for s in shard_order if s in results]
    names = [f"{HIDDEN_PREFIX}o{i}" for i in range(plan.hidden)]
    positions: dict[str, list[int]] = {}
    for shard in shards:
        result = results[shard]
        if not isinstance(result, CursorResult) or result.context._is_server_side:
            return None
        compiled = result.context.compiled
        compile_state = getattr(compiled, "compile_state", None)
        if compile_state is None or getattr(compile_state, "eager_joins", None):
            return None
        if lean:
            found = lean_positions(compiled, plan.lean_columns)
            if found is None:
                return None
            positions[shard] = found
            continue
        keys = list(result.keys())
        if not all(name in keys for name in names):
            return None
        positions[shard] = [keys.index(name) for name in names]
    wanted = plan.offset + plan.limit
    chunk = wanted // len(shards) + 2 if shards else wanted
    rows = {shard: _Rows(results[shard].cursor, chunk) for shard in shards}
    sequence = _plain_merge_order(plan, results, positions, rows, shards, wanted)
    if sequence is None:
        sequence = _merge_order(plan, results, positions, rows, shards, wanted)
    used = dict.fromkeys(shards, 0)
    for shard in sequence:
        used[shard] += 1
    for shard in shards:
        result = results[shard]
        result.cursor_strategy = FullyBufferedCursorFetchStrategy(
            result.cursor, initial_buffer=rows[shard].taken(used[shard])
        )
    return sequence


def lean_positions(compiled: Any, columns: Sequence[Any]) -> list[int] | None:
    """Where each of ``columns`` (table columns, not annotated) sits in the rows of ``compiled``
    (its result columns, as SQLAlchemy matches them); None when one is not there. Kept per
    compiled statement, which SQLAlchemy caches and reuses for every execution of its shape (the
    shape fixes its ORDER BY columns, so the answer too)."""
    try:
        return _lean_positions[compiled]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: worked out each time
        return _positions(compiled, columns)
    found = _lean_positions[compiled] = _positions(compiled, columns)
    return found


def _positions(compiled: Any, columns: Sequence[Any]) -> list[int] | None:
    entries = getattr(compiled, "_result_columns", None) or []
    found = []
    for column in columns:
        index = next((i for i, entry in enumerate(entries) if _names(entry, column)), None)
        if index is None:
            return None
        found.append(index)
    return found


def _names(entry: Any, column: Any) -> bool:
    """Whether a compiled result column entry (keyname, name, objects, type) is ``column``."""
    return any(getattr(o, "_deannotate", None) is not None and o._deannotate() is column for o in entry[2])


_lean_positions: weakref.WeakKeyDictionary[Any, list[int] | None] = weakref.WeakKeyDictionary()


class _Rows:
    """One shard's rows, fetched from the driver a chunk at a time as the merge reaches them.

    The driver turns buffered rows into Python tuples only when fetched, so the rows past the
    merged LIMIT's part are never built (with 4 shards and LIMIT 50: about 60 tuples, not 200;
    fewer objects alive at once also means fewer garbage-collector passes)."""

    __slots__ = ("cursor", "chunk", "rows", "done")

    def __init__(self, cursor: Any, chunk: int) -> None:
        self.cursor = cursor
        self.chunk = chunk
        self.rows: list[Any] = []
        self.done = False

    def get(self, at: int) -> Any:
        """Row ``at`` (0-based), or None past the last one."""
        rows = self.rows
        while at >= len(rows):
            if self.done:
                return None
            more = self.cursor.fetchmany(self.chunk)
            if len(more) < self.chunk:
                self.done = True
            rows += more
        return rows[at]

    def fetch(self, size: int) -> list[Any]:
        """The next ``size`` rows (fewer at the end, none once exhausted), added to the buffered ones."""
        if self.done:
            return []
        more: list[Any] = self.cursor.fetchmany(size)
        if len(more) < size:
            self.done = True
        self.rows += more
        return more

    def taken(self, used: int) -> list[Any]:
        return self.rows[:used]


PLAIN_TYPES = frozenset({int, bool, str, bytes, dt.datetime, dt.date, uuid.UUID})
"""Types whose Python order is PostgreSQL's and that have no NaN (text: the plan checked its collation)."""


def _plain_merge_order(
    plan: RowPlan,
    results: Mapping[str, Any],
    positions: Mapping[str, Sequence[int]],
    rows: Mapping[str, _Rows],
    shards: Sequence[str],
    wanted: int,
) -> list[str] | None:
    """What :func:`_merge_order` answers, worked out by C code (``itemgetter``, ``sort``, ``bisect``)
    instead of a Python key call and heap step per row; ``None`` (the caller falls back to the heap
    merge, on the rows fetched so far) unless every term is ascending with NULLs last, no result
    processor applies and every key value seen is non-NULL, of a :data:`PLAIN_TYPES` type and in
    order within its shard. Then the sort key is the ORDER BY values themselves.

    The shards' rows are fetched a chunk at a time: a fetched row is final once its key is below
    every unfinished shard's last fetched key (all that shard's later rows sort after it); more
    is fetched only from the shards holding that bound back, a share of the rows still missing
    (each row fetched is a tuple the driver builds).
    """
    if any(term.descending or term.nulls_first or term.ranks is not None for term in plan.order):
        return None
    if any(_active(results[shard], positions[shard]) for shard in shards):
        return None
    single = len(plan.order) == 1
    getters = [itemgetter(*positions[shard]) for shard in shards]
    sources = [rows[shard] for shard in shards]
    last: list[Any] = [None] * len(shards)
    entries: list[tuple[Any, ...]] = []  # (*key, shard position, row index): the merge order, flat
    pending: Sequence[int] = range(len(shards))
    size = sources[0].chunk if sources else 0
    while True:
        for order in pending:
            source = sources[order]
            start = len(source.rows)
            fetched = source.fetch(size)
            if not fetched:
                continue
            keys = list(map(getters[order], fetched))
            values = keys if single else chain.from_iterable(keys)
            if not PLAIN_TYPES.issuperset(map(type, values)):
                return None
            ordered = keys if start == 0 else [last[order], *keys]
            if not all(map(le, ordered, ordered[1:])):
                return None
            last[order] = keys[-1]
            indexes = range(start, start + len(keys))
            if single:  # a scalar key: (value, shard position, row index)
                entries += zip(keys, repeat(order), indexes)
            else:
                entries += map(add, keys, zip(repeat(order), indexes))
        entries.sort()
        open_ = [order for order, source in enumerate(sources) if not source.done]
        if not open_:
            break
        bound = min(last[order] for order in open_)
        final = bisect_left(entries, (bound,) if single else bound)  # the entries below the bound
        if final >= wanted:
            break
        pending = [order for order in open_ if last[order] == bound]
        size = (wanted - final) // len(shards) + 2  # the rest is spread over the shards, too
    return [shards[entry[-2]] for entry in entries[:wanted]]


def _active(result: Any, positions: Sequence[int]) -> bool:
    """Whether a result processor applies to one of the sort-key columns."""
    processors = getattr(result._metadata, "_processors", None) or []
    return any(i < len(processors) and processors[i] is not None for i in positions)


def _merge_order(
    plan: RowPlan,
    results: Mapping[str, Any],
    positions: Mapping[str, Sequence[int]],
    rows: Mapping[str, _Rows],
    shards: Sequence[str],
    wanted: int,
) -> list[str]:
    """The shard of each of the first ``wanted`` rows of the k-way merge of ``rows`` (sorted per
    shard), ties to the earlier shard as :func:`heapq.merge` breaks them; a key only for each row
    the merge looks at, and no other allocation per row."""
    heap: list[list[Any]] = []  # [key, shard position, next row index, key function]
    for order, shard in enumerate(shards):
        first = rows[shard].get(0)
        if first is not None:
            key = _shard_key(plan, results[shard], positions[shard])
            heap.append([key(first), order, 1, key])
    heapq.heapify(heap)
    sequence: list[str] = []
    while heap and len(sequence) < wanted:
        head = heap[0]
        order = head[1]
        sequence.append(shards[order])
        if len(sequence) == wanted:
            break
        at = head[2]
        row = rows[shards[order]].get(at)
        if row is not None:
            head[0] = head[3](row)
            head[2] = at + 1
            heapq.heapreplace(heap, head)
        else:
            heapq.heappop(heap)
    return sequence


def _shard_key(plan: RowPlan, result: Any, positions: Sequence[int]) -> Callable[[Sequence[Any]], Any]:
    """The sort key of one shard's raw rows (result processors applied where the type has one)."""
    processors = getattr(result._metadata, "_processors", None) or []
    active = [(i, processors[i]) for i in positions if i < len(processors) and processors[i] is not None]
    key = row_key(plan.order, positions)
    if not active:  # the driver's values are the ORDER BY values (psycopg: datetimes, numbers, text)
        return key
    return lambda row: key(_processed(row, active))


def _processed(row: Sequence[Any], processors: Sequence[tuple[int, Any]]) -> list[Any]:
    values = list(row)
    for i, processor in processors:
        values[i] = processor(values[i])
    return values
