"""Merging per-shard row streams into the one answer a single database would give.

Streams are consumed lazily: a k-way merge (:func:`heapq.merge`) holds one pending row per shard,
so with ``LIMIT k`` pushed down each shard sends at most ``offset + k`` rows and memory stays
O(k x shards). Aggregates hold one partial row per group.
"""

from __future__ import annotations

import decimal
import heapq
import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .numeric import average
from .ordering import row_key
from .plan import AggregatePlan, RowPlan

_WIDE = decimal.Context(prec=1000)  # numeric sums are exact in PostgreSQL; keep them exact here


def _freeze(value: Any) -> Any:
    """A hashable stand-in for DISTINCT and GROUP BY (JSON lists/dicts are not hashable)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _hashable(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_freeze(v) for v in row)


def _tag(stream: Iterable[Sequence[Any]], tag: Any) -> Iterator[tuple[Sequence[Any], Any]]:
    for row in stream:
        yield row, tag


def merge_rows(
    plan: RowPlan, streams: Sequence[Iterable[Sequence[Any]]], *, tags: Sequence[Any] | None = None
) -> Iterator[tuple[Any, ...]]:
    """The globally ordered, de-duplicated and limited visible rows (plus the shard tag if given)."""
    hidden = plan.hidden
    stop = None if plan.limit is None else plan.offset + plan.limit
    if tags is None and not plan.distinct:  # the common case, without a Python frame per row
        merged_rows: Iterator[Sequence[Any]] = (
            heapq.merge(*streams, key=row_key(plan.order)) if plan.order else itertools.chain(*streams)
        )
        cut = operator.itemgetter(slice(None, -hidden)) if hidden else tuple
        return itertools.islice(map(cut, merged_rows), plan.offset, stop)

    def visible(row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(row[:-hidden]) if hidden else tuple(row)

    labels = [None] * len(streams) if tags is None else list(tags)
    tagged = [_tag(stream, label) for stream, label in zip(streams, labels, strict=True)]
    if plan.order:
        key = row_key(plan.order)
        merged: Iterator[tuple[Sequence[Any], Any]] = heapq.merge(*tagged, key=lambda item: key(item[0]))
    else:
        key = None
        merged = itertools.chain.from_iterable(tagged)
    out: Iterator[tuple[tuple[Any, ...], Any]] = ((visible(row), tag) for row, tag in merged)
    if plan.distinct:
        out = _distinct(merged, visible, key)
    rows = (row if tags is None else (*row, tag) for row, tag in out)
    return itertools.islice(rows, plan.offset, stop)


def _distinct(
    merged: Iterator[tuple[Sequence[Any], Any]], visible: Any, key: Any
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    # Equal rows have equal ORDER BY values, so with an ORDER BY only rows since the last change of
    # sort key need remembering; without one every distinct row is remembered.
    seen: set[tuple[Any, ...]] = set()
    current_key: Any = object()
    for row, tag in merged:
        if key is not None:
            row_sort_key = key(row)
            if row_sort_key != current_key:
                seen.clear()
                current_key = row_sort_key
        values = visible(row)
        marker = _hashable(values)
        if marker not in seen:
            seen.add(marker)
            yield values, tag


def _combine(op: str, a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None or op == "first":
        return a
    if op == "sum":
        if isinstance(a, decimal.Decimal) or isinstance(b, decimal.Decimal):
            return _WIDE.add(decimal.Decimal(a), decimal.Decimal(b))
        return a + b
    if op == "min":
        return b if b < a else a
    return b if b > a else a


def merge_groups(
    plan: AggregatePlan, streams: Sequence[Iterable[Sequence[Any]]]
) -> Iterator[tuple[Any, ...]]:
    """Combine per-shard partial groups, then HAVING, ORDER BY, DISTINCT, OFFSET and LIMIT."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    ops = plan.combine
    for stream in streams:
        for row in stream:
            group_key = tuple(_freeze(row[i]) for i in plan.group)
            found = groups.get(group_key)
            if found is None:
                groups[group_key] = list(row)
            else:
                for i, op in enumerate(ops):
                    found[i] = _combine(op, found[i], row[i])
    finals = [
        [
            values[f.index] if f.count_index is None else average(values[f.index], values[f.count_index])
            for f in plan.finals
        ]
        for values in groups.values()
    ]
    if plan.having is not None:
        having = plan.having
        finals = [row for row in finals if having(row) is True]
    if plan.order:
        finals.sort(key=row_key(plan.order))
    rows: Iterable[tuple[Any, ...]] = (tuple(row[: plan.visible]) for row in finals)
    if plan.distinct:
        rows = _unique(rows)
    stop = None if plan.limit is None else plan.offset + plan.limit
    return itertools.islice(rows, plan.offset, stop)


def _unique(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        marker = _hashable(row)
        if marker not in seen:
            seen.add(marker)
            yield row
