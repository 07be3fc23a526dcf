"""Assembling the per-shard results of one scatter into a :class:`ScatterResult`."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.engine.result import SimpleResultMetaData

from .merge import merge_groups, merge_rows
from .plan import AggregatePlan, RowPlan, ScatterPlan
from .result import ScatterResult, visible_metadata

ALLOW_PARTIAL = "allow_partial"
"""Execution option: return the healthy shards' rows when a shard is down (see ``missing_shards``)."""
PER_SHARD_RESULTS = "per_shard_results"
"""Execution option: run the statement as is on every shard and concatenate (no global merge)."""

SHARD_ID_KEY = "shard_id"


def gather(
    plan: ScatterPlan | None,
    results: Mapping[str, Result[Any]],
    shard_ids: Sequence[str],
    errors: Mapping[str, BaseException],
    *,
    with_shard_id: bool = False,
    sequence: Sequence[str] | None = None,
    lean: bool = False,
) -> ScatterResult:
    """Merge ``results`` (one per shard that answered) according to ``plan`` (``None``: concatenate).

    ``sequence``: the merge already done on the raw rows (:func:`.prefix.trim_to_merged_prefix`),
    the shard of each merged row in order; the loaded rows are then taken in that order.
    ``lean``: the shards ran the plan's statement without hidden columns (needs ``sequence``).
    """
    answered = [s for s in shard_ids if s in results]
    sources = [results[s] for s in answered]
    live = dict(zip(answered, sources, strict=True))
    first = sources[0]
    # joined eager loads of collections repeat a parent per child row: such ORM results must be
    # uniqued, per shard here and (as the stock session demands) by the caller on the merged result
    required_unique = next((s._unique_filter_state for s in sources if s._unique_filter_state), None)
    streams = [iter(source.unique() if source._unique_filter_state else source) for source in sources]
    tags = answered if with_shard_id else None
    closes_sources = False  # whether taking the rows closes the shards' results itself
    if isinstance(plan, AggregatePlan):
        metadata = visible_metadata(first, len(first.keys()) - plan.visible)
        rows: Any = merge_groups(plan, streams)
    else:
        hidden = plan.hidden if isinstance(plan, RowPlan) and not lean else 0
        assert not lean or sequence is not None, "a lean scatter's rows are merged on the raw rows"
        metadata = visible_metadata(first, hidden)
        by_shard = dict(zip(answered, streams, strict=True))
        if (
            isinstance(plan, RowPlan)
            and sequence is not None
            and tags is None
            and required_unique is None
            and by_shard.keys() >= set(sequence)
        ):
            cut = operator.itemgetter(slice(None, -hidden)) if hidden else tuple
            rows = itertools.chain.from_iterable(_in_sequence(sequence, by_shard, live, plan.offset, cut))
            closes_sources = True
        elif isinstance(plan, RowPlan):
            rows = merge_rows(plan, streams, tags=tags)
        elif tags is None:
            rows = (tuple(row) for row in itertools.chain.from_iterable(streams))
        else:
            rows = ((*row, tag) for stream, tag in zip(streams, tags, strict=True) for row in stream)
        if with_shard_id:
            assert isinstance(metadata, SimpleResultMetaData)
            metadata = SimpleResultMetaData([*metadata._keys, SHARD_ID_KEY])
    merged = ScatterResult(
        metadata,
        iter(rows),
        sources=live,
        shard_ids=answered,
        shard_errors=errors,
        closes_sources=closes_sources,
    )
    merged._unique_filter_state = required_unique
    return merged


def _in_sequence(
    sequence: Sequence[str],
    streams: dict[str, Iterator[Any]],
    live: dict[str, Result[Any]],
    offset: int,
    cut: Callable[[Any], Any],
) -> Iterator[list[Any]]:
    """The shards' rows in the merge's order (``sequence``: the shard of each), past ``offset`` and
    cut by ``cut``, as one list, made when the caller first asks for a row.

    Each shard's rows are loaded as its own result would load them, in the order the merge first
    reaches the shards, and its result is then closed and let go: its cursor, execution context
    and ORM load set-up are freed while the next shard loads, instead of all of them staying alive
    (and counted by the garbage collector) until the last row. The rows are then picked by C code
    (no Python frame per row); the caller iterates the list with ``chain.from_iterable``.
    """
    taken: dict[str, Iterator[Any]] = {}
    for shard in dict.fromkeys(sequence):
        taken[shard] = iter(list(streams.pop(shard)))
        live.pop(shard).close()
    picked = map(next, map(taken.__getitem__, sequence))
    yield list(map(cut, itertools.islice(picked, offset, None)))
