"""The LIMIT scatter's merge on raw rows (``scatter.prefix``) and the gather of its loaded rows.

No database: fake cursors hand out sorted rows. The C-level merge order must be the heap merge's
exactly (ties to the earlier shard), or decline so the heap merge runs; a merged result releases
each shard's result once its rows are loaded, not at the end.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData

from sa_shardkit.scatter.gather import gather
from sa_shardkit.scatter.ordering import SortTerm, row_key
from sa_shardkit.scatter.plan import RowPlan
from sa_shardkit.scatter.prefix import _merge_order, _plain_merge_order, _Rows


class _Cursor:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = list(rows)

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        taken, self.rows = self.rows[:size], self.rows[size:]
        return taken


class _Result:
    """What the merge reads of a shard's CursorResult: the processors of its columns."""

    class _Metadata:
        _processors = None

    _metadata = _Metadata()


def _plan(order: tuple[SortTerm, ...], limit: int, offset: int = 0) -> RowPlan:
    return RowPlan(statement=None, hidden=len(order), order=order, limit=limit, offset=offset, distinct=False)  # type: ignore[arg-type]


def _orders(
    plan: RowPlan, shards: dict[str, list[tuple[Any, ...]]], chunk: int
) -> tuple[list[str] | None, list[str]]:
    names = list(shards)
    positions = {s: [1 + i for i in range(len(plan.order))] for s in names}
    results = {s: _Result() for s in names}
    wanted = plan.offset + (plan.limit or 0)
    plain_rows = {s: _Rows(_Cursor(rows), chunk) for s, rows in shards.items()}
    plain = _plain_merge_order(plan, results, positions, plain_rows, names, wanted)
    heap_rows = {s: _Rows(_Cursor(rows), chunk) for s, rows in shards.items()}
    heap = _merge_order(plan, results, positions, heap_rows, names, wanted)
    return plain, heap


def _sorted_shards(values: list[list[tuple[Any, ...]]], order: tuple[SortTerm, ...]) -> dict[str, list[Any]]:
    key = row_key(order, [1 + i for i in range(len(order))])
    return {
        f"shard-{n}": sorted(((n, *v) for v in shard), key=key) for n, shard in enumerate(values, start=1)
    }


TWO_INTS = (SortTerm(-2), SortTerm(-1))
small = st.integers(0, 6)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.lists(st.tuples(small, small), max_size=30), min_size=1, max_size=5),
    limit=st.integers(1, 60),
    offset=st.integers(0, 5),
    chunk=st.integers(1, 20),
)
def test_plain_merge_is_the_heap_merge(
    values: list[list[tuple[int, int]]], limit: int, offset: int, chunk: int
) -> None:
    plan = _plan(TWO_INTS, limit, offset)
    plain, heap = _orders(plan, _sorted_shards(values, TWO_INTS), chunk)
    assert plain is not None  # plain ascending ints: the C path always applies
    assert plain == heap


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.lists(st.one_of(st.none(), st.integers(0, 5), st.floats(allow_nan=True)), max_size=20),
        min_size=1,
        max_size=4,
    ),
    descending=st.booleans(),
    limit=st.integers(1, 40),
)
def test_plain_merge_declines_nulls_nan_and_descending(
    values: list[list[Any]], descending: bool, limit: int
) -> None:
    order = (SortTerm(-1, descending=descending),)
    plan = _plan(order, limit)
    shards = _sorted_shards([[(v,) for v in shard] for shard in values], order)
    plain, heap = _orders(plan, shards, 4)
    assert plain is None or plain == heap
    # every shard's first chunk (4 rows) is always fetched and checked; a NULL or float further
    # down a shard may lie past the merged prefix, never looked at (and then harmless)
    first_chunks = [row[1] for rows in shards.values() for row in rows[:4]]
    if descending or any(v is None or isinstance(v, float) for v in first_chunks):
        assert plain is None


def test_plain_merge_declines_rows_out_of_python_order() -> None:
    """A shard whose order is not Python's (a collation the plan did not see): the heap merge runs,
    as before, rather than a sort that would pick rows out of the shard's order."""
    plan = _plan((SortTerm(-1),), 3)
    shards = {"a": [(1, "b"), (1, "a")], "b": [(2, "c")]}
    plain, heap = _orders(plan, shards, 5)
    assert plain is None
    assert heap == ["a", "a", "b"]


def test_plain_merge_on_timestamps_and_text() -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    order = (SortTerm(-2), SortTerm(-1))
    shards = {
        "a": [(1, base, "x"), (1, base, "y"), (1, base + dt.timedelta(seconds=2), "a")],
        "b": [(2, base, "x"), (2, base + dt.timedelta(seconds=1), "a")],
    }
    plain, heap = _orders(_plan(order, 4), shards, 1)
    assert plain == heap == ["a", "b", "a", "b"]


class _Source(IteratorResult[Any]):
    def __init__(self, rows: list[tuple[Any, ...]], log: list[str] | None = None, name: str = "") -> None:
        super().__init__(SimpleResultMetaData(["v", "_shardkit_o0"]), self._logged(rows, log, name))
        self._log, self._name = log, name

    @staticmethod
    def _logged(rows: list[tuple[Any, ...]], log: list[str] | None, name: str) -> Any:
        for row in rows:
            if log is not None:
                log.append(f"load {name}")
            yield row

    def close(self) -> None:
        if self._log is not None:
            self._log.append(f"close {self._name}")
        super().close()


def test_gather_releases_each_shard_once_its_rows_are_loaded() -> None:
    plan = _plan((SortTerm(-1),), 3)
    log: list[str] = []
    a, b = _Source([(1, 1), (3, 3)], log, "a"), _Source([(2, 2)], log, "b")
    merged = gather(plan, {"a": a, "b": b}, ["a", "b"], {}, sequence=["a", "b", "a"])
    assert not log and list(merged._sources) == ["a", "b"]  # nothing loaded before the first row
    assert next(merged) == (1,)
    # each shard's result is closed once its rows are loaded, before the next shard loads
    assert log == ["load a", "load a", "close a", "load b", "close b"]
    assert a._soft_closed and b._soft_closed and not merged._sources
    assert [tuple(r) for r in merged] == [(2,), (3,)]


def test_gather_closing_before_any_row_closes_every_shard() -> None:
    plan = _plan((SortTerm(-1),), 3)
    a, b = _Source([(1, 1), (3, 3)]), _Source([(2, 2)])
    merged = gather(plan, {"a": a, "b": b}, ["a", "b"], {}, sequence=["a", "b", "a"])
    merged.close()
    assert a._soft_closed and b._soft_closed and not merged._sources
