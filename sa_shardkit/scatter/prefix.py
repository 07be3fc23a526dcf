"""Merge before loading: ORM entities are built only for the rows a LIMIT scatter returns.

With ``LIMIT k`` each shard sends up to ``offset + k`` rows, but only ``offset + k`` of all those
survive the merge. The shards' rows are already in memory (client-side cursors), so the merge is
first run on their raw ORDER BY values alone; each shard's buffered rows are then cut to the prefix
the merge uses, and the ORM loads just those. Skipped whenever rows and entities are not 1:1
(joined eager loads), for DISTINCT, and for streaming (server-side) cursors.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy

from .ordering import row_key
from .plan import HIDDEN_PREFIX, RowPlan


def trim_to_merged_prefix(plan: RowPlan, results: Mapping[str, Any], shard_order: Sequence[str]) -> bool:
    """Cut each shard's buffered rows to the part the merged LIMIT uses; False when not applicable."""
    if plan.limit is None or not plan.order or plan.distinct:
        return False
    shards = [s for s in shard_order if s in results]
    positions: dict[str, list[int]] = {}
    for shard in shards:
        result = results[shard]
        if not isinstance(result, CursorResult) or result.context._is_server_side:
            return False
        compile_state = getattr(result.context.compiled, "compile_state", None)
        if compile_state is None or getattr(compile_state, "eager_joins", None):
            return False
        keys = list(result.keys())
        names = [f"{HIDDEN_PREFIX}o{i}" for i in range(plan.hidden)]
        if not all(name in keys for name in names):
            return False
        positions[shard] = [keys.index(name) for name in names]
    rows = {shard: results[shard].cursor.fetchall() for shard in shards}
    ranked = [_keyed(plan, results[s], positions[s], rows[s], s) for s in shards]
    taken = itertools.islice(heapq.merge(*ranked, key=lambda item: item[0]), plan.offset + plan.limit)
    used = dict.fromkeys(shards, 0)
    for _, shard in taken:
        used[shard] += 1
    for shard in shards:
        result = results[shard]
        result.cursor_strategy = FullyBufferedCursorFetchStrategy(
            result.cursor, initial_buffer=rows[shard][: used[shard]]
        )
    return True


def _keyed(
    plan: RowPlan, result: Any, positions: Sequence[int], rows: Sequence[Any], shard: str
) -> Iterator[tuple[Any, str]]:
    """(sort key, shard) per raw row, computed lazily: the merge stops after offset + limit rows."""
    processors = getattr(result._metadata, "_processors", None) or []
    active = [(i, processors[i]) for i in positions if i < len(processors) and processors[i] is not None]
    key = row_key(plan.order, positions)
    if not active:  # the driver's values are the ORDER BY values (psycopg: datetimes, numbers, text)
        for row in rows:
            yield key(row), shard
        return
    for row in rows:
        yield key(_processed(row, active)), shard


def _processed(row: Sequence[Any], processors: Sequence[tuple[int, Any]]) -> list[Any]:
    values = list(row)
    for i, processor in processors:
        values[i] = processor(values[i])
    return values
