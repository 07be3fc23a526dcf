"""Cross-shard (scatter-gather) queries: parallel fan-out and a globally correct merge.

``execute_scatter(orm_context, shard_ids)`` is what the sharded session calls for a SELECT that
targets several shards; ``ShardManager.query_all_shards`` is the same machinery without a session.
Modules: ``plan`` (statement analysis and rewrite), ``ordering`` (PostgreSQL sort semantics),
``merge`` (k-way merge, aggregates), ``numeric`` (avg rounding), ``fanout`` (threads and failure
policy), ``connected`` (one checkout per shard, greenlet hubs), ``lean`` (SQL text on warm shards
at the libpq level), ``gather``/``result`` (the merged Result), ``session`` and ``core`` (the two
entry points), ``writes`` (a session's UPDATE/DELETE on more shards than the connection budget).
"""

from __future__ import annotations

from .gather import ALLOW_PARTIAL, PER_SHARD_RESULTS
from .plan import AggregatePlan, RowPlan, plan_scatter
from .result import ScatterResult
from .session import execute_scatter

__all__ = [
    "ALLOW_PARTIAL",
    "PER_SHARD_RESULTS",
    "AggregatePlan",
    "RowPlan",
    "ScatterResult",
    "execute_scatter",
    "plan_scatter",
]
